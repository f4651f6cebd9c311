"""The reaper fails a dead worker's trial once, and never a live one that an outage kept silent."""

from __future__ import annotations

import time

import optuna
import pytest
from optuna.trial import TrialState

from hpo import attrs
from hpo.search import storage as storage_mod
from hpo.search import study as study_mod
from hpo.search.locks import slot_lock
from hpo.search.optuna_compat import stale_trial_ids, trial_id
from hpo.search.reaper import Reaper, fail, lost_requeues, requeue_orphans
from hpo.search.storage import StorageSettings
from hpo.settings import config

pytestmark = pytest.mark.filterwarnings(
    "ignore:Heartbeat of storage:UserWarning"
)  # ask() outside optimize(), as workers do
SETTINGS = StorageSettings(heartbeat_interval=1, grace_period=1, max_retry=1)


@pytest.fixture
def shared(tmp_path):
    store = storage_mod.open_storage(f"sqlite:///{tmp_path / 'r.db'}", SETTINGS)
    study, _ = study_mod.create_or_load(store, config.load("tiny"))
    return study, store


def running_trial(study: optuna.Study, store) -> int:
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})
    store.set_trial_user_attr(trial_id(trial), "pid", 4242)
    store.record_heartbeat(trial_id(trial))
    return trial_id(trial)


def wait_until_stale(study: optuna.Study, store, tid: int) -> None:
    """SQLite's clock has whole seconds, so a heartbeat turns stale between 1 and 2 grace periods on."""
    deadline = time.monotonic() + 30
    while tid not in stale_trial_ids(store, study):
        assert time.monotonic() < deadline, "the trial never turned stale"
        time.sleep(0.2)


def test_a_silent_trial_is_reaped_only_after_it_stays_silent_while_watched(shared):
    """On the real clock; the tests below step `now` instead of sleeping."""
    study, store = shared
    dead = running_trial(study, store)
    reaper = Reaper(study, store)
    wait_until_stale(study, store, dead)
    assert reaper() == []  # seen stale once: a suspect, not yet dead
    assert store.get_trial(dead).state == TrialState.RUNNING
    time.sleep(reaper.confirm_s)
    assert reaper() == [dead]
    failed = store.get_trial(dead)
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["fail_reason"].startswith("stale heartbeat: its worker (host ?, pid 4242) sent none")
    assert failed.user_attrs["fail_reason"].endswith("re-queued")
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].params == failed.params
    assert "fail_reason" not in waiting[0].user_attrs  # the copy does not inherit the failure
    # A second reaper that watched the same trial finds it finished and queues nothing more.
    assert reaper() == [] and len(study.get_trials(states=(TrialState.WAITING,))) == 1


def test_a_heartbeat_after_an_outage_clears_the_suspicion(shared):
    study, store = shared
    live = running_trial(study, store)
    reaper = Reaper(study, store)
    wait_until_stale(study, store, live)
    now = time.monotonic()
    assert reaper(now) == []
    store.record_heartbeat(live)  # the worker reaches the database again
    assert reaper(now + reaper.confirm_s) == [] and store.get_trial(live).state == TrialState.RUNNING


def test_what_was_watched_across_this_process_s_own_outage_does_not_count(shared):
    study, store = shared
    trial = running_trial(study, store)
    reaper = Reaper(study, store)
    wait_until_stale(study, store, trial)
    now = time.monotonic()
    assert reaper(now) == []
    store.last_error_at = now + 1  # this process lost the database meanwhile
    assert reaper(now + reaper.confirm_s) == []  # the watch starts again now
    assert reaper(now + 2 * reaper.confirm_s) == [trial]


def test_retries_stop_at_max_retry_and_the_reason_says_so(shared):
    study, store = shared
    reaper = Reaper(study, store)
    first = current = running_trial(study, store)
    for attempt in range(2):
        wait_until_stale(study, store, current)
        now = time.monotonic()
        reaper(now)
        assert reaper(now + reaper.confirm_s) == [current]
        if attempt == 0:
            current = trial_id(study.ask())  # pops the WAITING copy, as a worker would
            store.record_heartbeat(current)
    reasons = [t.user_attrs["fail_reason"] for t in study.get_trials(states=(TrialState.FAIL,))]
    assert len(reasons) == 2 and reasons[0].endswith("re-queued")
    assert reasons[1].endswith("not re-queued: this configuration has run 2 times"), reasons
    assert study.get_trials(states=(TrialState.WAITING,)) == [] and store.get_trial(first).state == TrialState.FAIL


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_reaped_and_retried(shared):
    """Optuna's stale query skips a RUNNING trial with no heartbeat row, so a worker that died between
    ask() and its first beat left it RUNNING for ever (holding a budget slot). The reaper watches it
    stay silent for the grace period plus two intervals, then fails and re-queues it."""
    study, store = shared
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})
    reaper = Reaper(study, store)
    now = time.monotonic()
    assert reaper(now) == []  # first seen: watched, not failed
    wait = reaper.grace_s + reaper.confirm_s
    assert reaper(now + wait / 2) == [] and store.get_trial(trial_id(trial)).state == TrialState.RUNNING
    assert reaper(now + wait) == [trial_id(trial)]
    failed = store.get_trial(trial_id(trial))
    assert failed.state == TrialState.FAIL and "no heartbeat ever" in failed.user_attrs["fail_reason"]
    assert failed.user_attrs["fail_reason"].endswith("re-queued")
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["failed_trial"] for t in waiting] == [trial.number]


def test_a_live_trial_that_sends_its_first_heartbeat_is_never_taken_for_silent(shared):
    study, store = shared
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})
    reaper = Reaper(study, store)
    now = time.monotonic()
    reaper(now)
    store.record_heartbeat(trial_id(trial))  # the first beat comes: it is a normal running trial now
    assert reaper(now + reaper.grace_s + reaper.confirm_s) == []
    assert store.get_trial(trial_id(trial)).state == TrialState.RUNNING


def test_a_fail_whose_requeue_was_lost_gets_its_copy_once(shared):
    """The FAIL committed, then the worker died (or lost the database) before queuing the copy: the
    reason says re-queued but no copy exists. A reaper queues it, once, however often it looks."""
    study, store = shared
    tid = running_trial(study, store)
    number = store.get_trial(tid).number
    store.set_trial_user_attr(tid, "fail_reason", "worker stopped by SIGTERM; re-queued")
    store.set_trial_system_attr(tid, attrs.REQUEUE, True)
    store.set_trial_state_values(tid, TrialState.FAIL)  # ... and the process is gone here
    unmarked = running_trial(study, store)  # a failure that is not retried: left alone
    fail(study, unmarked, "error in the worker: boom", retry=False)
    assert [t.number for t in lost_requeues(study)] == [number]

    reaper = Reaper(study, store)
    lock = slot_lock(store, study.study_name)
    now = time.monotonic()
    assert reaper.repair(lock, now) == []  # seen once: the failing worker may still be queuing it
    assert reaper.repair(lock, now + reaper.confirm_s) == [number]
    for later in (2, 3):
        assert reaper.repair(lock, now + later * reaper.confirm_s) == [] and lost_requeues(study) == []
    copies = study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["retry_history"] for t in copies] == [[number]]
    assert attrs.REQUEUE not in copies[0].system_attrs  # the mark stays with the failed trial


def test_a_worker_leaving_on_the_time_budget_queues_a_copy_owed_even_if_only_just_seen(shared):
    """The last workers leave at the deadline: nobody would come back for a copy that went missing
    seconds before, so the leaving worker waits out the confirmation once and queues it."""
    study, store = shared
    tid = running_trial(study, store)
    number = store.get_trial(tid).number
    store.set_trial_user_attr(tid, "fail_reason", "worker stopped by SIGTERM; re-queued")
    store.set_trial_system_attr(tid, attrs.REQUEUE, True)
    store.set_trial_state_values(tid, TrialState.FAIL)
    reaper = Reaper(study, store)
    assert reaper.settle() == [number] and lost_requeues(study) == []
    assert reaper.settle() == []  # nothing owed: no wait
    assert [t.system_attrs["retry_history"] for t in study.get_trials(states=(TrialState.WAITING,))] == [[number]]


def test_repair_waits_while_another_process_holds_the_study_lock(shared):
    study, store = shared
    tid = running_trial(study, store)
    store.set_trial_user_attr(tid, "fail_reason", "worker stopped by SIGTERM; re-queued")
    store.set_trial_system_attr(tid, attrs.REQUEUE, True)
    store.set_trial_state_values(tid, TrialState.FAIL)
    reaper = Reaper(study, store)
    now = time.monotonic()
    reaper.repair(now=now)
    later = now + reaper.confirm_s
    with slot_lock(store, study.study_name):  # another worker counting slots
        assert reaper.repair(slot_lock(store, study.study_name), later) == []
    assert len(reaper.repair(slot_lock(store, study.study_name), later)) == 1


def test_telling_a_trial_that_was_reaped_meanwhile_drops_the_result_instead_of_crashing(shared):
    """A worker paused past the grace period comes back to a trial a reaper failed: Optuna raises
    ValueError("Cannot tell a FAIL trial"), which must read as 'finished elsewhere'."""
    from hpo.search import worker as worker_mod

    study, store = shared
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})
    fail(study, trial_id(trial), "stale heartbeat; re-queued", retry=True)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        worker_mod.tell(study, trial, values=0.9)
    assert store.get_trial(trial_id(trial)).state == TrialState.FAIL


def test_a_study_keeps_the_heartbeat_settings_it_was_created_with(tmp_path, caplog):
    """A host started with another HPO_GRACE_PERIOD judges the study's trials by the study's settings,
    so it cannot reap another host's live trial between that host's heartbeats."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    first = storage_mod.open_storage(url, StorageSettings(heartbeat_interval=10, grace_period=30, max_retry=2))
    study_mod.create_or_load(first, config.load("tiny"))
    other = storage_mod.open_storage(url, StorageSettings(heartbeat_interval=1, grace_period=2, max_retry=5))
    assert (other.heartbeat_interval, other.grace_period, other.max_retry) == (1, 2, 5)
    with caplog.at_level("WARNING"):
        study, _ = study_mod.create_or_load(other, config.load("tiny"))
    assert (other.heartbeat_interval, other.grace_period, other.max_retry) == (10, 30, 2)
    assert "judges its trials by its own heartbeat settings (heartbeat every 10s, grace period 30s" in caplog.text
    assert Reaper(study, other).grace_s == 30
    reader = storage_mod.open_storage(url, StorageSettings(heartbeat_interval=3, grace_period=4))
    study_mod.load(reader, "tiny")  # status, delete: the same judgement of which trials are live
    assert (reader.heartbeat_interval, reader.grace_period) == (10, 30)


def test_optimize_requeues_at_once_only_the_trials_of_its_own_workers_that_ended(shared):
    """`hpo optimize` saw its workers end (one killed after ignoring a signal): their RUNNING trials
    are failed and re-queued at once; another host's trial with the same pid and a live worker's stay."""
    study, store = shared
    ours, live, elsewhere = (running_trial(study, store) for _ in range(3))
    for tid, host, pid in ((ours, "here", 4242), (live, "here", 4343), (elsewhere, "there", 4242)):
        store.set_trial_user_attr(tid, attrs.HOST, host)
        store.set_trial_user_attr(tid, attrs.PID, pid)
    ending = "worker did not stop within 30s of SIGINT and was killed"
    numbers = requeue_orphans(study, store.max_retry, "here", {4242: ending, 4444: "worker exited with code 1"})
    assert numbers == [store.get_trial(ours).number]
    failed = store.get_trial(ours)
    assert failed.state == TrialState.FAIL and failed.user_attrs[attrs.REASON] == f"{ending}; re-queued"
    assert [t.system_attrs["failed_trial"] for t in study.get_trials(states=(TrialState.WAITING,))] == numbers
    assert {store.get_trial(live).state, store.get_trial(elsewhere).state} == {TrialState.RUNNING}
