"""`hpo optimize` on one machine: check the time budget, create the study once, then spawn the local
workers, forward signals to them, watch them and show their progress."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from hpo import attrs
from hpo.errors import HpoError
from hpo.learn import sources
from hpo.learn.seeds import derive_seed
from hpo.learn.sources import DataSet
from hpo.paths import log_dir
from hpo.search import budget, horizon, progress
from hpo.search.outages import first_line
from hpo.search.reaper import requeue_orphans
from hpo.search.session import Opened
from hpo.search.status import study_status
from hpo.search.study import create_or_load, exists, load
from hpo.search.trials import FINISHED
from hpo.settings import config
from hpo.settings.config import StudyConfig
from hpo.settings.durations import format_duration

log = logging.getLogger(__name__)

KILL_AFTER_S = 30  # a worker that ignores SIGTERM this long is killed


@dataclasses.dataclass(frozen=True)
class Request:
    """What `hpo optimize` was asked for, as its options gave it."""

    study_arg: str  # a study name or a study file's path
    workers: int
    time_s: float | None  # --time, parsed; None: the study file's own time budget, if any
    run_final: bool  # --final: the finalizer runs inside the budget once the search ends
    storage: str | None
    data_dir: str | None
    device: str | None
    artifacts: str | None
    started_at: float  # unix seconds: the clock covers the command's own start-up


@dataclass(frozen=True)
class Local:
    """This machine's share of a search: its worker processes, each one's CPU threads, and the device."""

    workers: int
    threads: int
    device: str | None

    def finalizer_threads(self) -> int:
        from hpo.learn.devices import finalizer_threads

        return finalizer_threads((self.device or "").startswith("cuda"), self.threads)


@dataclass(frozen=True)
class Clock:
    """A search's time budget as the command gives it: its seconds (None: no time budget), whether it
    starts again now (`--time`; a file's time starts when the study is created), and when the
    command started (unix seconds: the clock covers the command's own start-up)."""

    time_s: float | None
    restart: bool
    started_at: float


def optimize(request: Request, echo: Callable[[str], None]) -> None:
    """`hpo optimize`: check the data and the time budget, create the study once, run the local
    workers, print the status, and with --final run the finalizer inside the budget."""
    from hpo.learn.devices import place, threads_per_worker
    from hpo.paths import final_dir
    from hpo.results import final, report
    from hpo.search import session
    from hpo.search.storage import mask
    from hpo.search.trials import finished_count

    cfg = config.load(request.study_arg)
    time_s = request.time_s if request.time_s is not None else cfg.budget.time_s
    dataset = sources.open_for(cfg, request.data_dir)  # bad data stops here, before anything is stored
    opened = session.open_storage(request.storage)
    location, artifact_store = opened.artifact_store(request.artifacts)  # fail here, not in every worker
    local = Local(request.workers, threads_per_worker(request.workers), request.device)
    clock = Clock(time_s, request.time_s is not None, request.started_at)
    study, cfg = prepare(cfg, opened, dataset, local, clock)
    dataset = sources.for_study(dataset, cfg, request.data_dir)  # the study's stored [data] win over the file's
    log.info(
        f"study {cfg.name!r}: {local.workers} workers x {local.threads} thread(s), storage {mask(opened.url)}, "
        f"artifacts {location}{report.time_note(budget.get_deadline(study))}"
    )
    if (line := outlook(study, cfg, local)) is not None:
        log.info(line)
    args = worker_args(request.study_arg, opened.url, Path(dataset.origin), location, request.device)
    finished_before = finished_count(study)
    try:
        run_workers(study, cfg, opened.storage, local.workers, local.threads, args)
    finally:
        echo(report.status_text(study_status(study, cfg, opened.storage)))
    if request.run_final:
        workspace = session.Workspace(opened.storage, artifact_store, place(request.device), dataset)
        metrics = final.after_search(study, cfg, workspace, finished_before)
        echo(report.final_text(metrics, final_dir(cfg.name), cfg.name))
    echo(f"wall time {time.time() - request.started_at:.0f}s")


def prepare(
    cfg: StudyConfig, opened: Opened, dataset: DataSet, local: Local, clock: Clock
) -> tuple[optuna.Study, StudyConfig]:
    """Create (or load) the study once, so the workers only ever load it, and start its clock.

    `--time` restarts the clock; a file's time starts it when the study is created. A budget that
    cannot hold one trial plus the finalizer is refused before the study is touched."""
    time_s = clock.time_s if clock.restart or not exists(opened.storage, cfg.name) else None
    calibrated = None
    if time_s:
        cfg, calibrated = check_time_budget(cfg, time_s, opened.storage, dataset, local)
    study, cfg = create_or_load(opened.storage, cfg)
    sources.check(study, sources.for_study(dataset, cfg, dataset.origin))
    if time_s is not None:
        budget.set_deadline(study, time_s, now=clock.started_at)
        if calibrated is not None and budget.calibration(study) is None:
            study.set_user_attr(attrs.CALIBRATION, dataclasses.asdict(calibrated))
    else:
        refuse_spent_budget(study, cfg)
    return study, cfg


def refuse_spent_budget(study: optuna.Study, cfg: StudyConfig) -> None:
    """A study whose time budget has run out starts no trial, and a finalizer would train only the
    seconds that are left, replacing the published model with a worse one: refuse, changing nothing."""
    deadline = budget.get_deadline(study)
    if deadline is None or deadline.left() > 0:
        return
    ended = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(deadline.at))
    kept = " (the published model stays as it is)" if study.user_attrs.get(attrs.FINAL) else ""
    raise HpoError(
        f"study {cfg.name!r}: its time budget of {format_duration(deadline.time_s)} is spent (it ended at "
        f"{ended}), so nothing was run{kept}. Give it more time: `hpo extend --study {cfg.name} --time 10m`, "
        "or run again with --time 10m."
    )


def check_time_budget(
    cfg: StudyConfig, time_s: float, storage: Any, dataset: DataSet, local: Local
) -> tuple[StudyConfig, budget.EpochCost | None]:
    """Refuse a budget that cannot hold one trial plus the finalizer, measured on this machine; a new
    study with `[budget] fit_epochs` gets the horizon fitted to the time instead (fit_horizon),
    and says so.

    Returns the study's settings (the fitted ones, or `cfg`) and the calibration it measured (None
    when the study had measured epochs to go by)."""
    cost, calibrated = _epoch_cost(cfg, storage, dataset, local)
    final_threads = local.finalizer_threads()
    needed = horizon.minimum_budget(cfg, cost, final_threads, calibrated=calibrated is not None)
    if cfg.budget.fit_epochs and calibrated is not None:  # a new study only
        fitted = horizon.fit_horizon(cfg, cost, final_threads, time_s, local.workers, calibrated=True)
        if fitted is not None and fitted.budget.epochs > cfg.budget.epochs:
            _say_grown(cfg, fitted, cost, local, time_s)
            return fitted, calibrated
        if fitted is not None and fitted.budget.epochs < cfg.budget.epochs:
            _say_shrunk(cfg, fitted, cost, time_s, needed)
            return fitted, calibrated
    if time_s < needed:
        source = (
            "the first trial, calibrated on this machine"
            if calibrated is not None
            else "the slowest the study measured, any host"
        )
        raise HpoError(
            f"--time {format_duration(time_s)} is shorter than one trial plus the finalizer, about "
            f"{format_duration(needed)} ({cost.epoch_s:.1f}s per trial epoch, {source}). "
            f"Give at least --time {format_duration(math.ceil(needed / 60) * 60)}, or lower [budget] "
            "epochs or [final] epochs in the study file."
        )
    return cfg, calibrated


def _epoch_cost(
    cfg: StudyConfig, storage: Any, dataset: DataSet, local: Local
) -> tuple[budget.EpochCost, budget.EpochCost | None]:
    """What a trial epoch costs: the slowest the study measured, any host; for a new study, the
    first trial calibrated on this machine (also returned, to be recorded)."""

    from hpo.search.objective import calibrate_here

    costs: list[budget.EpochCost] = []
    try:
        costs = budget.measured(load(storage, cfg.name)[0])
    except HpoError:
        pass  # a new study: calibrate below
    if costs:
        return max(costs, key=lambda c: c.epoch_s), None
    calibrated = calibrate_here(cfg, dataset, local.device, local.threads)
    return calibrated, calibrated


def outlook(study: optuna.Study, cfg: StudyConfig, local: Local) -> str | None:
    """The line that says what a timed study's time left holds (horizon.outlook); None without a clock."""
    deadline = budget.get_deadline(study)
    if deadline is None or deadline.left() <= 0:
        return None
    line = horizon.outlook(study, cfg, local.workers, local.finalizer_threads(), deadline.left())
    return None if line is None else f"study {cfg.name!r}: {line}"


def _say_grown(cfg: StudyConfig, fitted: StudyConfig, cost: budget.EpochCost, local: Local, time_s: float) -> None:
    holds = horizon.search_holds(fitted, cost, local.finalizer_threads(), time_s, local.workers, calibrated=True)
    log.info(
        "study %r: --time %s holds a %d-epoch horizon here (%.1fs per trial epoch, calibrated on this machine): "
        "%.1f whole trials across %d worker(s) besides the finalizer's %d member(s) "
        "([budget] fit_epochs: the file's %d epochs, up to max_epochs %d)",
        cfg.name,
        format_duration(time_s),
        fitted.budget.epochs,
        cost.epoch_s,
        holds,
        local.workers,
        cfg.final.ensemble,
        cfg.budget.epochs,
        cfg.budget.max_epochs,
    )


def _say_shrunk(cfg: StudyConfig, fitted: StudyConfig, cost: budget.EpochCost, time_s: float, needed: float) -> None:
    log.warning(
        "study %r: %d epochs of one trial plus the finalizer need about %s here (%.1fs per trial epoch, "
        "calibrated on this machine), more than --time %s: it trains a %d-epoch horizon instead "
        "([budget] fit_epochs; give more time for more epochs)",
        cfg.name,
        cfg.budget.epochs,
        format_duration(needed),
        cost.epoch_s,
        format_duration(time_s),
        fitted.budget.epochs,
    )


def worker_args(study_arg: str, url: str, directory: Path, artifacts: str, device: str | None) -> list[str]:
    """What every local `hpo worker` is started with: the same study, storage, data and artifacts."""
    args = ["--study", study_arg, "--storage", url, "--data-dir", str(directory), "--artifacts", artifacts]
    return args + (["--device", device] if device else [])


def run_workers(
    study: optuna.Study, cfg: StudyConfig, storage: Any, workers: int, threads: int, args: list[str]
) -> None:
    """Run `workers` local `hpo worker` processes (each given `args` and its own sampler seed) to the
    end, with a progress bar on a terminal. SIGINT and SIGTERM are forwarded as SIGTERM to every
    worker, which fails and re-queues its trial and exits. Raises HpoError if a signal stopped
    them or one exited with an error."""
    from hpo.learn.devices import CPU_SHARE_ENV, CpuShare

    share = CpuShare.create(workers)
    try:
        _run_workers(study, cfg, storage, workers, args, {"HPO_THREADS": str(threads), CPU_SHARE_ENV: str(share)})
    finally:
        shutil.rmtree(share, ignore_errors=True)


def _run_workers(
    study: optuna.Study, cfg: StudyConfig, storage: Any, workers: int, args: list[str], env: dict[str, str]
) -> None:
    children, logs = _spawn(cfg, workers, args, env)
    stopped_by: list[str] = []

    def forward(signum: int, _frame: Any) -> None:
        stopped_by.append(signal.Signals(signum).name)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    # Ctrl-C and SIGTERM both stop every worker the same way: fail, re-queue, exit.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        _watch(study, cfg, storage, children, stopped_by, bar_mode=bool(logs))
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    codes = [child.returncode for child in children]
    exits = {child.pid: _ending(child.returncode, stopped_by) for child in children}
    try:
        requeue_orphans(study, storage.max_retry, socket.gethostname(), exits)
    except Exception as e:  # the database went too: the next run's reapers re-queue them after the grace period
        log.warning("could not re-queue the trials the workers left RUNNING (%s)", first_line(e))
    if stopped_by:
        raise HpoError(
            f"stopped by {stopped_by[0]}: all {workers} workers exited and their running trials were "
            f"re-queued. Run the same command to carry on."
        )
    if any(codes):
        where = (
            (" Their logs: " + ", ".join(str(logs[i]) for i, c in enumerate(codes) if c) + ".")
            if logs
            else (" See their log lines above.")
        )
        raise HpoError(
            f"{sum(1 for c in codes if c)} of {workers} workers exited with an error (exit codes {codes}).{where}"
        )


def _ending(code: int, stopped_by: list[str]) -> str:
    """How a worker ended, as the reason of a trial it left RUNNING."""
    if code == -signal.SIGKILL and stopped_by:
        return f"worker did not stop within {KILL_AFTER_S}s of {stopped_by[0]} and was killed"
    return f"worker ended by {signal.Signals(-code).name}" if code < 0 else f"worker exited with code {code}"


def _spawn(
    cfg: StudyConfig, workers: int, args: list[str], env: dict[str, str]
) -> tuple[list[subprocess.Popen], list[Path]]:
    """Start the workers with `env` added (HPO_THREADS, each one's first share of the cores, and the
    folder of their devices.CpuShare); on a terminal each one's output goes to runs/STUDY/logs/worker-N.log."""
    env = {**os.environ, "OMP_NUM_THREADS": env["HPO_THREADS"], **env}
    base = [sys.executable, "-m", "hpo", "worker", *args]
    logs: list[Path] = []
    if progress.interactive():
        folder = log_dir(cfg.name)
        folder.mkdir(parents=True, exist_ok=True)
        logs = [folder / f"worker-{i}.log" for i in range(workers)]
        print(f"worker logs: {folder}/worker-N.log", file=sys.stderr)
    children = []
    for i in range(workers):
        # Distinct sampler seeds: identical ones would make every worker propose the same first trials.
        out = open(logs[i], "ab") if logs else None
        children.append(
            subprocess.Popen(
                base + ["--sampler-seed", str(derive_seed(cfg.seed, i))],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
            )
        )
        if out:
            out.close()  # the child holds its own descriptor
    return children, logs


def _watch(
    study: optuna.Study,
    cfg: StudyConfig,
    storage: Any,
    children: list[subprocess.Popen],
    stopped_by: list[str],
    bar_mode: bool,
) -> None:
    """Wait for every child, killing them KILL_AFTER_S after a forwarded signal, and keep the bar current."""
    kill_at = None
    # Trials finished before this run are counted, not announced again.
    reported = {t.number for t in study.get_trials(deepcopy=False) if t.state in FINISHED}
    deadline = budget.get_deadline(study)
    # A time-budgeted search is ended by the clock, not the count: its bar is the time, the trials beside it.
    total, unit = (round(deadline.time_s), "s") if deadline else (cfg.budget.n_trials, "trials")
    with progress.Progress(total, f"study {cfg.name}", unit, initial=0 if deadline else len(reported)) as bar:
        while any(child.poll() is None for child in children):
            if stopped_by and kill_at is None:
                kill_at = time.monotonic() + KILL_AFTER_S
            if kill_at is not None and time.monotonic() > kill_at:
                for child in children:
                    if child.poll() is None:
                        child.kill()
            if bar_mode:
                progress.show_study(bar, study, cfg, storage, reported)
            time.sleep(1.0)
        if bar_mode:
            progress.show_study(bar, study, cfg, storage, reported)
