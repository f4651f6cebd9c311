"""Chaos run: workers share a PostgreSQL study while a seeded schedule injects faults; then the study is checked.

    .venv/bin/python scripts/chaos.py --minutes 15 --seed 1          # a private PostgreSQL server
    .venv/bin/python scripts/chaos.py --minutes 15 --storage postgresql+psycopg2://... \\
        --restart-db "docker compose restart postgres"               # your own database

The study is time-budgeted (`[budget] time`), so the search ends by itself with nothing killed. Until
shortly before that, every `--every` seconds one fault hits, in a seeded order that covers each kind:

    kill      SIGKILL of a worker that runs a trial; a new worker replaces it (as a restart policy would)
    pause     SIGSTOP of such a worker past the grace period, then SIGCONT
    db        PostgreSQL stopped for 3-10 s, then started again
    nan       a trial whose loss becomes NaN (SGD at lr 1e6), queued with enqueue_trial
    noheart   a process that joins the study, creates a trial and dies before its first heartbeat
    requeue   a process that fails a trial for a retry and dies between the FAIL and the copy
              (what a connection dropped at that moment leaves)

At the end it prints one table of checks and exits 1 if any fails: no trial RUNNING or WAITING, no
FAIL without a reason, no FAIL whose reason says re-queued without its copy (a lost retry), no
configuration run more than 1 + max_retry times, no trial retried twice, no duplicate finished
copies, and every worker that was not killed exited 0.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna

from hpo import attrs
from hpo.search.trials import first_run, retry_history
from hpo.settings import config
from hpo.settings.writer import to_toml

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT_S, GRACE_S, MAX_RETRY = 1, 4, 2


def chaos_study(seed: int, seconds: float) -> str:
    """The shipped `tiny` study (small CNNs, seconds per trial), ended by the clock, as a study file."""
    tiny = config.load("tiny")
    cfg = dataclasses.replace(
        tiny,
        name="chaos",
        seed=seed,
        final=dataclasses.replace(tiny.final, ensemble=1, tta="none"),
        budget=config.TrialBudget(n_trials=10000, epochs=3, train_subset=2000, val_fraction=0.05, time_s=seconds),
    )
    return to_toml(cfg)


NAN_TRIAL = {"n_conv": 1, "filters_0": 8, "fc_size": 16, "optimizer": "sgd", "lr": 1e6}
KINDS = ("kill", "pause", "db", "nan", "noheart", "requeue")

# The two faults that need a process to die at one exact line: it runs hpo's own code up to there.
_DIE_AFTER_ASK = """
import os, signal, sys
from hpo.search import storage, study
opened = storage.open_storage(sys.argv[1])
chaotic, _ = study.load(opened, "chaos")
trial = chaotic.ask()
print(trial.number, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # before any heartbeat, as a worker killed right after ask()
"""
_DIE_BEFORE_REQUEUE = """
import os, sys
from hpo.search import reaper, storage, study
from hpo.search.optuna_compat import trial_id
opened = storage.open_storage(sys.argv[1])
chaotic, _ = study.load(opened, "chaos")
trial = chaotic.ask()
opened.record_heartbeat(trial_id(trial))
print(trial.number, flush=True)
reaper.requeue = lambda *args: os._exit(137)  # the process ends between the FAIL and the copy
reaper.fail(chaotic, trial_id(trial), "worker stopped by SIGTERM; re-queued", retry=True)
"""


class Chaos:
    def __init__(self, url: str, restart_db, study_file: Path, data_dir: str | None, logs: Path, seed: int):
        self.url, self.restart_db, self.study_file = url, restart_db, study_file
        self.data_dir, self.logs = data_dir, logs
        self.rng = random.Random(seed)
        self.own_db = False  # True: restart_db(down) keeps the server down for `down` seconds
        self.procs: list[subprocess.Popen] = []
        self.killed: set[int] = set()
        self.faults: collections.Counter[str] = collections.Counter()

    def start_worker(self) -> None:
        env = {
            **os.environ,
            "HPO_STORAGE": self.url,
            "HPO_HEARTBEAT_INTERVAL": str(HEARTBEAT_S),
            "HPO_GRACE_PERIOD": str(GRACE_S),
            "HPO_MAX_RETRY": str(MAX_RETRY),
            "HPO_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        cmd = [sys.executable, "-m", "hpo", "worker", "--study", str(self.study_file)]
        if self.data_dir:
            cmd += ["--data-dir", self.data_dir]
        log = (self.logs / f"worker-{len(self.procs)}.log").open("w")
        self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.logs))

    def study(self) -> optuna.Study | None:
        try:
            return optuna.load_study(study_name="chaos", storage=self.url)
        except Exception:  # not created yet, or the database is restarting
            return None

    def busy_worker(self) -> subprocess.Popen | None:
        """A live worker of ours that is running a trial."""
        study = self.study()
        pids = (
            set()
            if study is None
            else {
                t.user_attrs.get(attrs.PID)
                for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            }
        )
        mine = [p for p in self.procs if p.poll() is None and p.pid in pids]
        return self.rng.choice(mine) if mine else None

    def inject(self, kind: str) -> str:
        if kind in ("kill", "pause"):
            victim = self.busy_worker()
            if victim is None:
                return "no worker was running a trial; skipped"
            if kind == "kill":
                victim.kill()
                self.killed.add(victim.pid)
                self.start_worker()
                self.faults[kind] += 1
                return f"SIGKILL pid {victim.pid}, started a replacement"
            paused = GRACE_S + 2 * HEARTBEAT_S + 1 + self.rng.uniform(2, 6)
            victim.send_signal(signal.SIGSTOP)
            time.sleep(paused)
            victim.send_signal(signal.SIGCONT)
            self.faults[kind] += 1
            return f"SIGSTOP pid {victim.pid} for {paused:.0f}s, then SIGCONT"
        if kind == "db":
            if self.restart_db is None:
                return "no way to restart the database (--restart-db); skipped"
            down = self.rng.uniform(3, 10)
            self.restart_db(down)
            self.faults[kind] += 1
            return f"database stopped for {down:.0f}s and started" if self.own_db else "database restarted"
        if kind in ("noheart", "requeue"):
            script = _DIE_AFTER_ASK if kind == "noheart" else _DIE_BEFORE_REQUEUE
            env = {**os.environ, "HPO_HEARTBEAT_INTERVAL": str(HEARTBEAT_S), "HPO_GRACE_PERIOD": str(GRACE_S)}
            env["HPO_MAX_RETRY"] = str(MAX_RETRY)
            done = subprocess.run(
                [sys.executable, "-c", script, self.url], env=env, capture_output=True, text=True, timeout=120
            )
            if not done.stdout.strip():  # the database was down, say: nothing was created
                return f"could not reach the study ({done.stderr.strip().splitlines()[-1:]}); skipped"
            self.faults[kind] += 1
            what = "before its first heartbeat" if kind == "noheart" else "between its FAIL and its copy"
            return f"trial {done.stdout.strip()}: its process died {what} (exit {done.returncode})"
        study = self.study()
        if study is None:
            return "study not reachable; skipped"
        study.enqueue_trial(NAN_TRIAL, skip_if_exists=False)
        self.faults[kind] += 1
        return "queued a trial whose loss becomes NaN"


def check(study: optuna.Study, chaos: Chaos) -> list[tuple[str, str, bool]]:
    trials = study.get_trials(deepcopy=False)
    states = collections.Counter(t.state.name for t in trials)
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    no_reason = [t.number for t in failed if not t.user_attrs.get(attrs.REASON)]
    # Retries: every copy names the first trial of its configuration and the trial it copies (the
    # last entry of its retry history).
    runs = collections.Counter(first_run(t) for t in trials)
    too_many = {n: k for n, k in runs.items() if k > 1 + MAX_RETRY}
    copies = collections.Counter(retry_history(t)[-1] for t in trials if retry_history(t))
    twice = {n: k for n, k in copies.items() if k > 1}
    done = collections.Counter(
        first_run(t) for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    )
    duplicates = {n: k for n, k in done.items() if k > 1}
    codes = {p.pid: p.returncode for p in chaos.procs}
    bad_exit = {pid: code for pid, code in codes.items() if pid not in chaos.killed and code != 0}
    reasons = collections.Counter(t.user_attrs.get(attrs.REASON, "").split(":")[0] for t in failed)
    lost = [
        t.number for t in failed if t.user_attrs.get(attrs.REASON, "").endswith("re-queued") and not copies[t.number]
    ]
    finished = states["COMPLETE"] + states["PRUNED"]
    return [
        (
            "trials",
            f"{len(trials)}: {finished} finished ({states['COMPLETE']} complete, {states['PRUNED']} pruned), "
            f"{states['FAIL']} failed",
            finished > 0,
        ),
        ("RUNNING or WAITING", str(states["RUNNING"] + states["WAITING"]), states["RUNNING"] + states["WAITING"] == 0),
        ("FAIL without a reason", str(no_reason or 0), not no_reason),
        ("lost retries (FAIL says re-queued, no copy)", str(lost or 0), not lost),
        ("FAIL reasons", ", ".join(f"{r or '(none)'} x{k}" for r, k in sorted(reasons.items())) or "none", True),
        (f"configurations run more than 1 + {MAX_RETRY} times", str(too_many or 0), not too_many),
        ("trials retried more than once", str(twice or 0), not twice),
        ("configurations finished twice", str(duplicates or 0), not duplicates),
        ("workers not killed that exited non-zero", str(bad_exit or 0), not bad_exit),
        ("faults injected", ", ".join(f"{k} x{chaos.faults[k]}" for k in KINDS), True),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="the study's time budget [15]")
    parser.add_argument("--seed", type=int, default=1, help="seeds the fault schedule and the study [1]")
    parser.add_argument("--workers", type=int, default=4, help="worker processes [4]")
    parser.add_argument("--every", type=float, default=20.0, help="seconds between faults [20]")
    parser.add_argument("--storage", help="a PostgreSQL URL [default: start a private server]")
    parser.add_argument("--restart-db", help="shell command that restarts --storage's server (none: no db faults)")
    parser.add_argument("--data-dir", help="Fashion-MNIST directory [default: hpo's search order]")
    parser.add_argument("--out", default="runs/chaos", help="directory for the study file and worker logs")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("worker-*.log"):
        old.unlink()
    server = None
    if args.storage:
        url = args.storage
        # An outside server restarts as its own command does; the drawn downtime does not apply.
        restart = (
            None if not args.restart_db else (lambda _down: subprocess.run(shlex.split(args.restart_db), check=True))
        )
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from pg import PostgresServer  # the test suite's private server: Debian's binaries on 127.0.0.1

        server = PostgresServer()
        url = server.url()
        restart = server.restart
    study_file = out / "chaos.toml"
    study_file.write_text(chaos_study(args.seed, round(args.minutes * 60)))
    chaos = Chaos(url, restart, study_file, args.data_dir, out, args.seed)
    chaos.own_db = server is not None
    started = time.monotonic()
    print(
        f"chaos: {args.workers} workers, {args.minutes:g} min, a fault every {args.every:g}s, seed {args.seed}; "
        f"logs in {out}",
        flush=True,
    )
    try:
        for _ in range(args.workers):
            chaos.start_worker()
        kinds: list[str] = []
        # Faults stop 45 s before the end, so that the last retries have time to run.
        while time.monotonic() - started < args.minutes * 60 - 45:
            time.sleep(args.every * chaos.rng.uniform(0.7, 1.3))
            if all(p.poll() is not None for p in chaos.procs):
                break  # the search ended early, or the workers could not start (their logs say why)
            if not kinds:
                kinds = list(KINDS)
                chaos.rng.shuffle(kinds)
            kind = kinds.pop()
            before = chaos.faults[kind]
            print(f"  {time.monotonic() - started:6.0f}s  {kind:<6} {chaos.inject(kind)}", flush=True)
            possible = kind != "db" or chaos.restart_db is not None
            if chaos.faults[kind] == before and possible:
                kinds.append(kind)  # skipped (no busy worker yet, or no study yet): try it next
        for p in chaos.procs:
            p.wait(timeout=max(60.0, args.minutes * 60 - (time.monotonic() - started) + 300))
        study = chaos.study()
        if study is None:
            print(f"no study was created; the first worker's log says:\n{(out / 'worker-0.log').read_text()[-2000:]}")
            return 1
        rows = check(study, chaos)
    finally:
        for p in chaos.procs:
            if p.poll() is None:
                p.kill()
        if server is not None:
            server.stop()
    width = max(len(name) for name, _, _ in rows)
    print(f"\nchaos run after {time.monotonic() - started:.0f}s:")
    for name, value, ok in rows:
        print(f"  {'ok ' if ok else 'BAD'}  {name:<{width}}  {value}")
    failed = [name for name, _, ok in rows if not ok]
    print("all checks passed" if not failed else f"{len(failed)} check(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
