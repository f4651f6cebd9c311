"""Failure modes that need real processes, signals or PostgreSQL, and one run with every fault at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch

from hpo.launch import KILL_AFTER_S
from hpo.search.artifacts import listed
from hpo.search.heartbeat import Heartbeat
from hpo.search.optuna_compat import study_id, study_storage, trial_id
from hpo.search.outages import connection_error
from hpo.search.storage import StorageSettings, open_storage
from hpo.search.study import create_or_load
from hpo.settings import config
from integration.test_postgres import (
    Workers,
    assert_exact_budget,
    count,
    load,
    running_trial_in_epoch,
    study_file,
    wait_for,
)
from integration.test_results import FINAL_FILES
from pg import PASSWORD

pytestmark = pytest.mark.integration


def hpo(*args: str, cwd: Path, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hpo", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def test_wrong_credentials_exit_at_once_without_printing_the_password(postgres, tmp_path):
    started = time.monotonic()
    proc = hpo("status", "--study", "pg", "--storage", postgres.url(password="not-the-password"), cwd=tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and time.monotonic() - started < 15
    assert out.strip().startswith("Error: the database refused the credentials") and out.count("\n") == 1, out
    assert "not-the-password" not in out and "hpo:***@" in out


def optimize_long(tmp_path: Path, data_dir: Path, group: bool = False) -> tuple[subprocess.Popen, str]:
    """`hpo optimize` with 2 workers on a study long enough to be stopped, once a trial has run an epoch."""
    study = tmp_path / "long.toml"
    study.write_text(study_file(tmp_path, n_trials=20, epochs=8, subset=4000).read_text().replace('"pg"', '"long"'))
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    proc = hpo(
        "optimize",
        "--study",
        str(study),
        "--workers",
        "2",
        "--storage",
        url,
        "--data-dir",
        str(data_dir),
        cwd=tmp_path,
        start_new_session=group,  # its own process group, like a foreground job of a shell
    )
    wait_for(lambda: running_trial_in_epoch(url, study="long"), 120, "a running trial", interval=0.5)
    return proc, url


def assert_stopped_and_requeued(url: str) -> list[optuna.trial.FrozenTrial]:
    """Nothing is left RUNNING, and every trial the stop failed has its WAITING copy; the failed ones."""
    trials = optuna.load_study(study_name="long", storage=url).trials
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    stopped = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    waiting = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    assert stopped and sorted(t.system_attrs["failed_trial"] for t in waiting) == sorted(t.number for t in stopped)
    return stopped


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, "ctrl-c"])
def test_a_signal_to_optimize_stops_every_worker_and_leaves_nothing_running(tmp_path, real_data_dir, sig):
    """SIGINT or SIGTERM to `hpo optimize`; "ctrl-c": SIGINT to its whole process group, as a
    terminal sends it, so each worker gets the terminal's SIGINT and then the parent's SIGTERM."""
    group = sig == "ctrl-c"
    sig = signal.SIGINT if group else sig
    proc, url = optimize_long(tmp_path, real_data_dir, group)
    sent = time.monotonic()
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    # Every worker stopped itself: `hpo optimize` kills those still running KILL_AFTER_S after a signal.
    stopped_s = time.monotonic() - sent
    assert stopped_s < KILL_AFTER_S, f"stopped {stopped_s:.1f}s after the signal\n{out}"
    assert proc.returncode == 1, out
    assert f"Error: stopped by {sig.name}: all 2 workers exited" in out
    # Every stopped trial is queued again, so running the command again loses nothing.
    stopped = assert_stopped_and_requeued(url)
    assert all("worker stopped" in t.user_attrs["fail_reason"] for t in stopped)


def test_a_worker_killed_after_ignoring_the_signal_has_its_trial_requeued_by_optimize(tmp_path, real_data_dir):
    """A worker that cannot stop (here: paused) is killed KILL_AFTER_S after the signal; `hpo optimize`
    then fails and re-queues the trial it left RUNNING, instead of leaving it to the next run's reaper."""
    proc, url = optimize_long(tmp_path, real_data_dir)
    frozen = running_trial_in_epoch(url, study="long")
    os.kill(frozen.user_attrs["pid"], signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=KILL_AFTER_S + 90)
    assert proc.returncode == 1 and "Error: stopped by SIGINT: all 2 workers exited" in out, out
    stopped = {t.number: t for t in assert_stopped_and_requeued(url)}
    reason = stopped[frozen.number].user_attrs["fail_reason"]
    assert reason == f"worker did not stop within {KILL_AFTER_S}s of SIGINT and was killed; re-queued", out
    assert all(
        "worker stopped by SIGTERM" in t.user_attrs["fail_reason"] for n, t in stopped.items() if n != frozen.number
    )


def test_two_final_trains_at_once_leave_whole_files(tmp_path, real_data_dir):
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    first = hpo(
        "optimize",
        "--study",
        "tiny",
        "--workers",
        "2",
        "--storage",
        url,
        "--data-dir",
        str(real_data_dir),
        cwd=tmp_path,
    )
    assert first.wait(timeout=300) == 0, first.stdout.read()
    out = tmp_path / "final"
    # One thread each: two processes with a thread per core each would oversubscribe a small machine
    # several times over, and the point here is the files, not the speed.
    one_thread = {"HPO_THREADS": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        hpo(
            "final-train",
            "--study",
            "tiny",
            "--storage",
            url,
            "--data-dir",
            str(real_data_dir),
            "--out",
            str(out),
            cwd=tmp_path,
            env=one_thread,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    metrics = json.loads((out / "metrics.json").read_text())
    model = torch.load(out / "model.pt", weights_only=True)
    assert model["study"] == "tiny" and metrics["test_accuracy"] == model["test_accuracy"]
    assert sorted(p.name for p in out.iterdir()) == sorted(FINAL_FILES)  # no temporary leftovers
    # The study holds one set of final artifacts, the last writer's, and the store nothing else.
    study = optuna.load_study(study_name="tiny", storage=url)
    live = listed(study_storage(study).get_study_system_attrs(study_id(study)))
    assert sorted(m["filename"] for m in live) == sorted(FINAL_FILES)
    assert {m["artifact_id"] for m in live} == set(study.user_attrs["hpo:final"]["artifacts"].values())
    kept = [
        m["artifact_id"] for t in study.trials for m in listed(t.system_attrs)
    ]  # COMPLETE trials' val outputs and models
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == sorted([m["artifact_id"] for m in live] + kept)


def test_every_fault_at_once(tmp_path, postgres, pg_url, real_data_dir):
    """4 workers; one is SIGKILLed, PostgreSQL restarts, one trial's loss goes NaN; then final-train."""
    n_trials = 10
    w = Workers(tmp_path, pg_url, study_file(tmp_path, n_trials=n_trials, epochs=3, subset=2000), real_data_dir)
    create = hpo("create", "--study", str(w.study), "--storage", pg_url, cwd=tmp_path)
    assert create.wait(timeout=60) == 0, create.stdout.read()
    # A real divergence: SGD at lr 1e6 turns the loss into NaN within the first epoch.
    load(pg_url).enqueue_trial({"n_conv": 1, "filters_0": 8, "fc_size": 16, "optimizer": "sgd", "lr": 1e6})
    try:
        w.start(4)
        victim = wait_for(lambda: running_trial_in_epoch(pg_url), 120, "a trial in its second epoch")
        os.kill(victim.user_attrs["pid"], signal.SIGKILL)
        wait_for(lambda: count(pg_url)["COMPLETE"] + count(pg_url)["PRUNED"] >= 3, 180, "three finished trials")
        postgres.restart(down_s=2)
        codes = w.wait(timeout=400)
    finally:
        w.kill()
    assert sorted(codes) == [-signal.SIGKILL, 0, 0, 0], w.output()
    assert_exact_budget(pg_url, n_trials)
    trials = load(pg_url).trials
    reasons = [t.user_attrs.get("fail_reason", "") for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert any("training loss became nan" in r for r in reasons), reasons
    assert all(reasons), f"a FAIL trial without a reason: {reasons}"
    killed = trials[victim.number]
    assert killed.state == optuna.trial.TrialState.FAIL and killed.user_attrs["fail_reason"].startswith(
        "stale heartbeat"
    )
    assert [t.state.is_finished() for t in trials if t.system_attrs.get("failed_trial") == victim.number] == [True]
    assert PASSWORD not in w.output()

    final = hpo(
        "final-train",
        "--study",
        "pg",
        "--storage",
        pg_url,
        "--data-dir",
        str(real_data_dir),
        "--out",
        str(tmp_path / "final"),
        cwd=tmp_path,
    )
    out, _ = final.communicate(timeout=300)
    assert final.returncode == 0, out
    assert PASSWORD not in out
    metrics = json.loads((tmp_path / "final" / "metrics.json").read_text())
    assert metrics["best_trial"] == load(pg_url).best_trial.number and metrics["test_accuracy"] > 0.5


def failures(url: str) -> list[optuna.trial.FrozenTrial]:
    return [t for t in load(url).trials if t.state == optuna.trial.TrialState.FAIL]


def test_a_15s_database_outage_creates_no_trial_and_fails_none(tmp_path, postgres, pg_url, real_data_dir):
    """4 workers ride out PostgreSQL being down for 15 s, far past the 4 s grace period: the trials
    that were training go on, none is reaped or failed, and no trial is created on the way."""
    n_trials = 8
    w = Workers(tmp_path, pg_url, study_file(tmp_path, n_trials=n_trials, epochs=3, subset=2000), real_data_dir)
    try:
        w.start(4)
        wait_for(lambda: running_trial_in_epoch(pg_url), 120, "a trial in its second epoch")
        postgres.restart(down_s=15)
        codes = w.wait(timeout=400)
    finally:
        w.kill()
    assert codes == [0, 0, 0, 0], w.output()
    logs = "".join(log.read_text() for log in w.logs)
    assert "heartbeat for trial id" in logs and "sent again after" in logs, logs
    assert_exact_budget(pg_url, n_trials)
    assert failures(pg_url) == [], [(t.number, t.user_attrs.get("fail_reason")) for t in failures(pg_url)]
    assert len(load(pg_url).trials) == n_trials  # numbered 0..n-1: nothing created and thrown away


def test_reads_through_optuna_s_cache_ride_out_an_outage(postgres, pg_url):
    """A Study reads its trials through Optuna's cache, which calls RDBStorage's private `_get_trials`
    and `_get_best_trial_id`, not the public reads: a trial's should_prune and best-trial reads must
    wait for the database like the public ones do, not fail the trial."""
    store = open_storage(pg_url, StorageSettings(heartbeat_interval=1, grace_period=4))
    store.ride_out_s = 120  # as a worker sets it
    study, _ = create_or_load(store, config.load("tiny"))
    study.tell(study.ask(), 0.5)
    postgres.stop()
    back = threading.Timer(3.0, postgres.start)
    back.start()
    try:
        started = time.monotonic()
        assert len(study.get_trials(deepcopy=False)) == 1
        assert study.best_trial.value == 0.5
        assert time.monotonic() - started >= 2.0, "the reads did not wait for the database"
    finally:
        back.join()  # the server is up again for the next test


def test_reaping_in_the_heartbeat_thread_fails_fast_so_the_next_beat_keeps_its_time(postgres, pg_url):
    """A worker reaps in its heartbeat thread, between beats. Were those storage calls to ride out an
    outage (waits growing to 8 s), the trial's next beat would come seconds after the database was
    back, and another worker's reaper, which confirms a death 2 intervals + 1 s after it sees the
    database again, would take the live trial. Here the reaping call loses the database: it must
    raise at once (the next beat tries again), not wait for the server to return."""
    store = open_storage(pg_url, StorageSettings(heartbeat_interval=1, grace_period=4))
    store.ride_out_s = 120  # as a worker sets it: a ride-out would outlast the wait below
    study, _ = create_or_load(store, config.load("tiny"))
    trial = study.ask()
    outcomes: list[BaseException | None] = []

    def reap() -> None:
        if not outcomes:
            postgres.stop()  # the database goes away just as this reaping starts
        try:
            store.get_all_trials(study_id(study))  # REPEATABLE: it rides out an outage elsewhere
        except Exception as e:
            outcomes.append(e)
            raise
        outcomes.append(None)

    try:
        with Heartbeat(store, trial_id(trial), 1, also=reap):
            wait_for(lambda: outcomes and not store.beating, 30, "the reaping to fail and the next beat to fail")
    finally:
        postgres.start()
    assert connection_error(outcomes[0]) is not None, outcomes
    store.ride_out_s = 0
    with Heartbeat(store, trial_id(trial), 1):  # the database is back: the beats go through again
        wait_for(lambda: store.beating, 30, "a heartbeat after the restart")


def test_a_paused_worker_is_reaped_once_and_reports_nothing_after_it_wakes(tmp_path, pg_url, real_data_dir):
    """SIGSTOP past the grace period, as a VM stall or a debugger would: the trial is failed and
    retried once elsewhere; woken by SIGCONT, the worker drops its stale result and carries on."""
    n_trials = 6
    w = Workers(tmp_path, pg_url, study_file(tmp_path, n_trials=n_trials, epochs=4, subset=2000), real_data_dir)
    try:
        w.start(2)
        victim = wait_for(lambda: running_trial_in_epoch(pg_url), 120, "a trial in its second epoch")
        pid = victim.user_attrs["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            reaped = wait_for(
                lambda: next((t for t in failures(pg_url) if t.number == victim.number), None),
                120,
                f"trial {victim.number} to be reaped",
            )
        finally:
            os.kill(pid, signal.SIGCONT)
        codes = w.wait(timeout=400)
    finally:
        w.kill()
    assert codes == [0, 0], w.output()
    assert_exact_budget(pg_url, n_trials)
    trials = load(pg_url).trials
    after = trials[victim.number]
    assert (
        reaped.user_attrs["fail_reason"].startswith("stale heartbeat")
        and "re-queued" in reaped.user_attrs["fail_reason"]
    )
    # Nothing the paused worker did after it woke reached the trial it had lost.
    assert after.state == optuna.trial.TrialState.FAIL and after.intermediate_values == reaped.intermediate_values
    assert after.user_attrs == reaped.user_attrs
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state.is_finished() and retries[0].params == victim.params
    assert "finished elsewhere" in w.output(), w.output()
    assert [t.number for t in failures(pg_url)] == [victim.number]
