"""The reaper fails a dead worker's trial once, and never a live one that an outage kept silent."""

from __future__ import annotations

import time

import optuna
import pytest
from optuna.trial import TrialState

from hpo import config
from hpo import storage as storage_mod
from hpo import study as study_mod
from hpo.storage import StorageSettings

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
    store.set_trial_user_attr(trial._trial_id, "pid", 4242)
    store.record_heartbeat(trial._trial_id)
    return trial._trial_id


def wait_until_stale(study: optuna.Study, store, trial_id: int) -> None:
    """SQLite's clock has whole seconds, so a heartbeat turns stale between 1 and 2 grace periods on."""
    deadline = time.monotonic() + 30
    while trial_id not in store._get_stale_trial_ids(study._study_id):
        assert time.monotonic() < deadline, "the trial never turned stale"
        time.sleep(0.2)


def test_a_silent_trial_is_reaped_only_after_it_stays_silent_while_watched(shared):
    study, store = shared
    dead = running_trial(study, store)
    reaper = study_mod.Reaper(study, store, SETTINGS)
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
    reaper = study_mod.Reaper(study, store, SETTINGS)
    wait_until_stale(study, store, live)
    assert reaper() == []
    store.record_heartbeat(live)  # the worker reaches the database again
    time.sleep(reaper.confirm_s)
    assert reaper() == [] and store.get_trial(live).state == TrialState.RUNNING


def test_what_was_watched_across_this_process_s_own_outage_does_not_count(shared):
    study, store = shared
    trial = running_trial(study, store)
    reaper = study_mod.Reaper(study, store, SETTINGS)
    wait_until_stale(study, store, trial)
    assert reaper() == []
    time.sleep(reaper.confirm_s)
    store.last_error_at = time.monotonic()  # this process lost the database meanwhile
    assert reaper() == []  # the watch starts again now
    time.sleep(reaper.confirm_s)
    assert reaper() == [trial]


def test_retries_stop_at_max_retry_and_the_reason_says_so(shared):
    study, store = shared
    reaper = study_mod.Reaper(study, store, SETTINGS)
    first = current = running_trial(study, store)
    for attempt in range(2):
        wait_until_stale(study, store, current)
        reaper()
        time.sleep(reaper.confirm_s)
        assert reaper() == [current]
        if attempt == 0:
            current = study.ask()._trial_id  # pops the WAITING copy, as a worker would
            store.record_heartbeat(current)
    reasons = [t.user_attrs["fail_reason"] for t in study.get_trials(states=(TrialState.FAIL,))]
    assert len(reasons) == 2 and reasons[0].endswith("re-queued")
    assert reasons[1].endswith("not re-queued: this configuration has run 2 times"), reasons
    assert study.get_trials(states=(TrialState.WAITING,)) == [] and store.get_trial(first).state == TrialState.FAIL
