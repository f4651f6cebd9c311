"""The distributed service against a real PostgreSQL server: real worker processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from conftest import chromium, free_port, page_text

pytestmark = pytest.mark.integration

STUDY = """
name = "pg"
seed = 3
[budget]
n_trials = {n_trials}
epochs = {epochs}
train_subset = {subset}
val_fraction = 0.05
[sampler]
name = "tpe"
multivariate = true
constant_liar = true
n_startup_trials = 4
[pruner]
name = "median"
n_startup_trials = 2
n_warmup_steps = 1
[augment]
crop_padding = 2
hflip = true
[final]
epochs = 1
[space]
n_conv = {{ low = 1, high = 2 }}
filters = {{ choices = [8, 16] }}
kernel_size = 3
n_fc = 1
fc_size = {{ low = 16, high = 64, log = true }}
dropout = 0.1
optimizer = {{ choices = ["adam", "sgd", "rmsprop"] }}
lr = {{ low = 1e-3, high = 1e-1, log = true }}
batch_size = 64
weight_decay = 1e-5
"""
GRACE_S = 4  # heartbeat every second; a trial silent for 4 s counts as dead


def study_file(tmp_path: Path, n_trials: int = 8, epochs: int = 3, subset: int = 1500) -> Path:
    path = tmp_path / "pg.toml"
    path.write_text(STUDY.format(n_trials=n_trials, epochs=epochs, subset=subset))
    return path


class Workers:
    """`hpo worker` processes with their logs in files."""

    def __init__(self, tmp_path: Path, url: str, study: Path, data_dir: Path):
        self.tmp_path, self.url, self.study, self.data_dir = tmp_path, url, study, data_dir
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start(self, n: int = 1, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> None:
        """`n` more workers; `env` adds to (or overrides) their environment, `prefix` goes before the
        command (faketime, say)."""
        env = {
            **os.environ,
            "HPO_HEARTBEAT_INTERVAL": "1",
            "HPO_GRACE_PERIOD": str(GRACE_S),
            "HPO_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "HPO_STORAGE": self.url,
            **(env or {}),
        }
        for _ in range(n):
            log = self.tmp_path / f"worker-{len(self.procs)}.log"
            self.logs.append(log)
            self.procs.append(
                subprocess.Popen(
                    [
                        *prefix,
                        sys.executable,
                        "-m",
                        "hpo",
                        "worker",
                        "--study",
                        str(self.study),
                        "--data-dir",
                        str(self.data_dir),
                    ],
                    cwd=self.tmp_path,
                    env=env,
                    stdout=log.open("w"),
                    stderr=subprocess.STDOUT,
                )
            )

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"workers did not finish in {timeout}s:\n{self.output()}") from None
        return codes

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()

    def output(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in self.logs if log.exists())


@pytest.fixture
def workers(tmp_path, pg_url, real_data_dir):
    w = Workers(tmp_path, pg_url, study_file(tmp_path), real_data_dir)
    yield w
    w.kill()


def load(url: str, study: str = "pg") -> optuna.Study:
    return optuna.load_study(study_name=study, storage=url)


def count(url: str) -> dict[str, int]:
    found = {s.name: 0 for s in optuna.trial.TrialState}
    for t in load(url).trials:
        found[t.state.name] += 1
    return found


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def running_trial_in_epoch(url: str, epoch: int = 1, study: str = "pg"):
    """A RUNNING trial that has finished at least `epoch` epochs, or None."""
    try:
        trials = load(url, study).get_trials(states=(optuna.trial.TrialState.RUNNING,))
    except KeyError:  # study not created yet
        return None
    return next((t for t in trials if t.user_attrs.get("epoch", 0) >= epoch), None)


def assert_exact_budget(url: str, n_trials: int) -> dict[str, int]:
    c = count(url)
    assert c["COMPLETE"] + c["PRUNED"] == n_trials, c
    assert c["RUNNING"] == 0 and c["WAITING"] == 0, c
    return c


def test_four_workers_exact_budget_and_bounded_connections(workers, postgres, pg_url):
    workers.start(4)
    database = pg_url.rsplit("/", 1)[1]
    most = 0
    while any(p.poll() is None for p in workers.procs):
        rows = postgres.sql(
            "SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = "
            f"'{database}' AND application_name LIKE 'hpo-worker-%' GROUP BY 1"
        )
        most = max([most] + [n for _, n in rows])
        time.sleep(0.3)
    assert workers.wait() == [0, 0, 0, 0], workers.output()
    assert 1 <= most <= 3, f"a worker held {most} connections"  # pool of 2 + 1 overflow
    c = assert_exact_budget(pg_url, 8)
    pids = {t.user_attrs.get("pid") for t in load(pg_url).trials} - {None}
    assert len(pids) >= 2, "the workers did not share the study"
    assert c["PRUNED"] >= 0


def test_sigkill_mid_trial_is_failed_within_grace_and_retried(workers, pg_url):
    workers.start(2)
    victim = wait_for(lambda: running_trial_in_epoch(pg_url), 120, "a trial in its second epoch")
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(
        lambda: load(pg_url).trials[victim.number].state == optuna.trial.TrialState.FAIL,
        30,
        f"trial {victim.number} to be marked FAIL",
    )
    failed_after = time.monotonic() - killed_at
    assert failed_after < GRACE_S + 8, f"the dead worker's trial was failed only after {failed_after:.1f}s"
    codes = [p.wait(timeout=300) for p in workers.procs]
    assert codes[[p.pid for p in workers.procs].index(victim.user_attrs["pid"])] == -signal.SIGKILL
    assert sorted(codes) == [-signal.SIGKILL, 0], workers.output()
    assert_exact_budget(pg_url, 8)
    retries = [t for t in load(pg_url).trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state.is_finished()
    assert retries[0].params == victim.params


def test_postgres_restart_mid_study(workers, postgres, pg_url):
    workers.start(2)
    wait_for(lambda: running_trial_in_epoch(pg_url), 120, "a running trial")
    postgres.restart(down_s=3)
    assert workers.wait() == [0, 0], workers.output()
    assert_exact_budget(pg_url, 8)
    assert "storage error" in workers.output() or "heartbeat for trial" in workers.output()


def test_sigterm_stops_within_15s_and_leaves_nothing_running(workers, pg_url, tmp_path):
    workers.study = study_file(tmp_path, n_trials=8, epochs=8, subset=4000)
    workers.start(1)
    trial = wait_for(lambda: running_trial_in_epoch(pg_url), 120, "a trial in its second epoch")

    status = subprocess.run(
        [sys.executable, "-m", "hpo", "status", "--study", "pg", "--storage", pg_url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    running = json.loads(status.stdout)["running"]
    assert len(running) == 1 and running[0]["epoch"] >= 1
    assert running[0]["pid"] == workers.procs[0].pid and running[0]["device"].startswith("cpu")
    assert running[0]["heartbeat_age_s"] is not None and running[0]["heartbeat_age_s"] < GRACE_S

    trial = wait_for(lambda: running_trial_in_epoch(pg_url), 120, "a trial in its second epoch")
    sent = time.monotonic()
    workers.procs[0].send_signal(signal.SIGTERM)
    code = workers.procs[0].wait(timeout=30)
    assert time.monotonic() - sent < 15
    assert code == 128 + signal.SIGTERM, workers.output()
    c = count(pg_url)
    assert c["RUNNING"] == 0, c
    stopped = load(pg_url).trials[trial.number]
    assert stopped.state == optuna.trial.TrialState.FAIL
    assert "worker stopped" in stopped.user_attrs["fail_reason"]
    queued = [t for t in load(pg_url).trials if t.system_attrs.get("failed_trial") == trial.number]
    assert [t.state for t in queued] == [optuna.trial.TrialState.WAITING] and queued[0].params == trial.params


def test_sixteen_workers_at_once_on_an_empty_database(tmp_path, pg_url, real_data_dir):
    w = Workers(tmp_path, pg_url, study_file(tmp_path, n_trials=2, epochs=1, subset=300), real_data_dir)
    try:
        w.start(16)
        codes = w.wait(timeout=400)
    finally:
        w.kill()
    output = w.output()
    assert codes == [0] * 16, output
    assert "Traceback" not in output and "Error" not in output
    assert [s.study_name for s in optuna.get_all_study_summaries(pg_url)] == ["pg"]
    assert_exact_budget(pg_url, 2)


def test_wrong_credentials_fail_at_once_with_the_password_masked(postgres):
    from hpo.errors import StorageError
    from hpo.search.storage import open_storage

    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        open_storage(postgres.url(password="wrong-pw"))
    assert time.monotonic() - started < 10
    assert "refused the credentials" in str(info.value) and "wrong-pw" not in str(info.value)


def test_unreachable_database_waits_then_fails(monkeypatch):
    from hpo.errors import StorageError
    from hpo.search.storage import open_storage

    monkeypatch.setenv("HPO_DB_WAIT", "3")
    started = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach the database at .* after waiting 3s"):
        open_storage("postgresql+psycopg2://hpo:pw@127.0.0.1:9/none")
    assert 2 < time.monotonic() - started < 15


def test_dashboard_in_headless_chromium_shows_the_study_and_its_trials(workers, pg_url, tmp_path):
    browser = chromium()
    workers.start(1)
    assert workers.wait() == [0], workers.output()
    port = free_port()
    dash = subprocess.Popen(
        [sys.executable, "-m", "hpo", "dashboard", "--study", "pg", "--storage", pg_url, "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/dashboard/studies/1/trials"
        text = page_text(browser, url, tmp_path / "chromium", until="Trial 0")[1]
        assert "pg (id=1)" in text, text[:2000]
        assert "8 Trials" in text or f"{len(load(pg_url).trials)} Trials" in text, text[:2000]
        best = load(pg_url).best_trial
        assert f"Trial {best.number}" in text and "Best Trial" in text
        assert "Pruned" in text or "Complete" in text
    finally:
        dash.terminate()
        dash.wait(timeout=10)
