"""Local workers for `hpo optimize`: spawn them, forward signals, watch them, show their progress."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from hpo import progress
from hpo.config import StudyConfig
from hpo.errors import HpoError
from hpo.objective import derive_seed
from hpo.storage import RUNS_DIR
from hpo.trials import FINISHED

KILL_AFTER_S = 30  # a worker that ignores SIGTERM this long is killed


def run_workers(study: optuna.Study, cfg: StudyConfig, workers: int, threads: int, args: list[str]) -> None:
    """Run `workers` local `hpo worker` processes (each given `args` and its own sampler seed) to the
    end, with a progress bar on a terminal. SIGINT and SIGTERM are forwarded as SIGTERM to every
    worker, which fails and re-queues its trial and exits. Raises HpoError if a signal stopped
    them or one exited with an error."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HPO_THREADS": str(threads)}
    base = [sys.executable, "-m", "hpo", "worker", *args]
    bar_mode = progress.interactive()
    logs: list[Path] = []
    if bar_mode:
        log_dir = RUNS_DIR / cfg.name / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        logs = [log_dir / f"worker-{i}.log" for i in range(workers)]
        print(f"worker logs: {log_dir}/worker-N.log", file=sys.stderr)
    children = []
    for i in range(workers):
        # Distinct sampler seeds: identical ones would make every worker propose the same first trials.
        out = open(logs[i], "ab") if bar_mode else None
        children.append(subprocess.Popen(base + ["--sampler-seed", str(derive_seed(cfg.seed, i))], env=env,
                                         stdout=out, stderr=subprocess.STDOUT if out else None))
        if out:
            out.close()  # the child holds its own descriptor

    stopped_by: list[str] = []

    def forward(signum: int, _frame: Any) -> None:
        stopped_by.append(signal.Signals(signum).name)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    # Ctrl-C and SIGTERM both stop every worker the same way: fail, re-queue, exit.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    kill_at = None
    # Trials finished before this run are counted, not announced again.
    reported = {t.number for t in study.get_trials(deepcopy=False) if t.state in FINISHED}
    try:
        with progress.Progress(cfg.budget.n_trials, f"study {cfg.name}", "trials", initial=len(reported)) as bar:
            while any(child.poll() is None for child in children):
                if stopped_by and kill_at is None:
                    kill_at = time.monotonic() + KILL_AFTER_S
                if kill_at is not None and time.monotonic() > kill_at:
                    for child in children:
                        if child.poll() is None:
                            child.kill()
                if bar_mode:
                    update_bar(bar, study, reported)
                time.sleep(1.0)
            if bar_mode:
                update_bar(bar, study, reported)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    codes = [child.returncode for child in children]
    if stopped_by:
        raise HpoError(f"stopped by {stopped_by[0]}: all {workers} workers exited and their running trials were "
                       f"re-queued. Run the same command to carry on.")
    if any(codes):
        where = (" Their logs: " + ", ".join(str(logs[i]) for i, c in enumerate(codes) if c) + ".") if logs else (
            " See their log lines above.")
        raise HpoError(f"{sum(1 for c in codes if c)} of {workers} workers exited with an error "
                       f"(exit codes {codes}).{where}")


def update_bar(bar: progress.Progress, study: optuna.Study, reported: set[int]) -> None:
    """Move the study's bar to the finished count and announce each newly finished trial."""
    try:
        trials = study.get_trials(deepcopy=False)
    except Exception:  # a database blip: the workers ride it out, the bar waits for the next poll
        return
    finished = [t for t in trials if t.state in FINISHED]
    for t in sorted(finished, key=lambda t: t.number):
        if t.number not in reported:
            reported.add(t.number)
            last = max(t.intermediate_values) if t.intermediate_values else 0
            value = t.value if t.state == TrialState.COMPLETE else t.intermediate_values.get(last)
            bar.write(f"trial {t.number} {t.state.name.lower()} at epoch {last}: {value:.4f}" if value is not None
                      else f"trial {t.number} {t.state.name.lower()}")
    complete = [t.value for t in finished if t.state == TrialState.COMPLETE and t.value is not None]
    best = (max if study.direction.name == "MAXIMIZE" else min)(complete, default=None)
    bar.set(len(finished), best="-" if best is None else f"{best:.4f}",
            pruned=sum(t.state == TrialState.PRUNED for t in finished),
            running=sum(t.state == TrialState.RUNNING for t in trials))
