"""Hosts that disagree: one whose clock is off, one started with other heartbeat settings. Real
worker processes on a real PostgreSQL server; the clock skew is real too (libfaketime, Debian's
`faketime`, shifts the worker's own clock while the server keeps the true one)."""

from __future__ import annotations

import shutil
import time

import optuna
import pytest

from conftest import IN_CI
from integration.test_postgres import STUDY, Workers, count, load, wait_for

pytestmark = pytest.mark.integration


def faketime(offset: str) -> tuple[str, ...]:
    """The command prefix that runs a process with its clock `offset` ("+10m", "-10m") from the truth."""
    if shutil.which("faketime") is None:
        if IN_CI:
            pytest.fail("CI needs faketime (apt-get install faketime) for the clock-skew test")
        pytest.skip("faketime is not installed")
    return ("faketime", "-f", f"{offset[0]}{int(offset[1:-1]) * 60}s")


def timed_study(tmp_path, seconds: int):
    source = STUDY.format(n_trials=10000, epochs=2, subset=1500).replace(
        "[budget]\n", f'[budget]\ntime = "{seconds}s"\n'
    )
    path = tmp_path / "pg.toml"
    path.write_text(source)
    return path


def test_hosts_with_skewed_clocks_stop_at_the_same_database_deadline(tmp_path, pg_url, real_data_dir):
    """One host's clock 10 minutes fast, another's 10 minutes slow. By their own clocks the first
    would start nothing (its deadline long past) and the second would search 10 minutes too long;
    by the database's clock both search, and both stop starting trials at the study's deadline."""
    budget_s = 120
    study = timed_study(tmp_path, budget_s)
    fast, slow = faketime("+10m"), faketime("-10m")
    workers = Workers(tmp_path, pg_url, study, real_data_dir)
    try:
        # The default heartbeat settings: this test is about clocks, not about reaping under load.
        liveness = {"HPO_HEARTBEAT_INTERVAL": "10", "HPO_GRACE_PERIOD": "30"}
        workers.start(1, env=liveness, prefix=fast)  # creates the study: its clock starts now, by the database
        wait_for(lambda: _exists(pg_url), 120, "the study")
        created = time.monotonic()
        workers.start(1, env=liveness, prefix=slow)
        codes = workers.wait(timeout=budget_s + 240)
    finally:
        workers.kill()
    ended_s = time.monotonic() - created
    assert codes == [0, 0], workers.output()
    out = workers.output()
    assert out.count("time budget: a trial's first epoch needs about") == 2, out  # both stopped for the budget
    trials = load(pg_url).trials
    deadline = load(pg_url).user_attrs["hpo:deadline"]
    pids = {t.user_attrs["pid"] for t in trials}
    assert len(pids) == 2, (pids, out)  # both hosts ran trials (the fast one ran none by its own clock)
    for t in trials:  # every start was decided by the database's clock, before the deadline
        plan = t.user_attrs["budget"]
        assert plan["deadline"] == deadline["at"]
        assert plan["decided_at"] + plan["estimate_s"] + plan["reserve_s"] <= deadline["at"], plan
    # The slow host did not go on for its own 10 minutes: both ended within the budget (the longest
    # trial after the last decision is bounded by the estimate the plan made for it).
    assert ended_s < budget_s + max(t.user_attrs["budget"]["estimate_s"] for t in trials) + 30, (ended_s, out)
    c = count(pg_url)
    reasons = [t.user_attrs.get("fail_reason") for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert c["RUNNING"] == 0 and c["WAITING"] == 0 and c["FAIL"] == 0, (c, reasons)


def _exists(url: str) -> bool:
    try:
        load(url)
    except KeyError:
        return False
    return True


def test_workers_with_other_heartbeat_settings_never_reap_each_others_live_trials(tmp_path, pg_url, real_data_dir):
    """The study was created by a worker that beats every 10 s with a 30 s grace period; a second
    worker is started with a 1 s beat and a 2 s grace period. Judged by its own numbers it would
    reap the first worker's live trials between their heartbeats; judged by the study's, never."""
    study = tmp_path / "pg.toml"
    # No pruning: every trial runs its epochs, long past the 10 s heartbeat of the first worker.
    source = STUDY.format(n_trials=4, epochs=30, subset=4000)  # 0.5-1 s an epoch on 2 cores: trials of 15 s and more
    study.write_text(source.replace('name = "median"\nn_startup_trials = 2\nn_warmup_steps = 1', 'name = "none"'))
    workers = Workers(tmp_path, pg_url, study, real_data_dir)
    try:
        workers.start(1, env={"HPO_HEARTBEAT_INTERVAL": "10", "HPO_GRACE_PERIOD": "30"})
        wait_for(lambda: _exists(pg_url), 120, "the study")
        workers.start(1, env={"HPO_HEARTBEAT_INTERVAL": "1", "HPO_GRACE_PERIOD": "2"})
        codes = workers.wait(timeout=600)
    finally:
        workers.kill()
    out = workers.output()
    assert codes == [0, 0], out
    trials = load(pg_url).trials
    assert not [t for t in trials if t.state == optuna.trial.TrialState.FAIL], [
        (t.number, t.user_attrs.get("fail_reason")) for t in trials
    ]
    # Each worker ran trials that outlived the other's heartbeat interval.
    by_pid = {t.user_attrs["pid"] for t in trials}
    assert len(by_pid) == 2, out
    whole = "".join(log.read_text() for log in workers.logs)  # output() keeps only each log's tail
    assert "judges its trials by its own heartbeat settings (heartbeat every 10s, grace period 30s" in whole, out
    # A 2 s grace period plus 3 s of watching: a trial beating every 10 s would be reaped after ~5 s.
    first = workers.procs[0].pid
    assert max(t.duration.total_seconds() for t in trials if t.user_attrs["pid"] == first) > 8, "too short to tell"
