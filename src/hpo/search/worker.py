"""One worker process: run trials of a shared study until its budget of finished trials is met.

The budget is exact however many workers share the study. Holding a study-wide lock (slot_lock), a
worker counts the trials that are finished, running or waiting, asks for a trial only if one of
the `n_trials` slots is free, and lets go once the trial exists; so two workers can never both
take the last slot. As a second line of defence, a trial numbered beyond the budget is failed at
once (reason in its `fail_reason` attribute) and does not count. While the remaining slots are
held by other workers' running trials, a worker waits and reaps trials whose worker died (their
retries come back as WAITING trials that any worker may pick up).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from hpo import attrs
from hpo.errors import StorageError
from hpo.learn.data import TrialData
from hpo.learn.devices import Placement, finalizer_threads
from hpo.learn.train import TrainingDiverged
from hpo.search import budget
from hpo.search.heartbeat import Heartbeat
from hpo.search.interrupts import Shutdown, install_signal_handlers, uninterrupted
from hpo.search.join import Reserved
from hpo.search.locks import DatabaseLock, slot_lock
from hpo.search.objective import OutOfMemory, OverBudget, calibrate, make_objective
from hpo.search.optuna_compat import ArtifactStore, study_storage, trial_id
from hpo.search.outages import Backoff, connection_error, first_line, lost_database
from hpo.search.reaper import Reaper, fail, retry_note
from hpo.search.session import Opened, Workspace
from hpo.search.storage import Storage, StorageSettings
from hpo.search.study import current_budget
from hpo.search.trials import FINISHED, counts
from hpo.settings.config import StudyConfig

log = logging.getLogger(__name__)

HOLDS_A_SLOT = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)


def over_budget(study: optuna.Study, n_trials: int, trial: optuna.Trial) -> bool:
    ahead = [t for t in study.get_trials(deepcopy=False, states=HOLDS_A_SLOT) if t.number < trial.number]
    return len(ahead) >= n_trials


@dataclass
class WorkerResult:
    trials_run: int = 0
    reason: str = ""


# Failures that end the trial, not the worker: each sets the trial's reason before it is raised.
TRIAL_FAILURES = (OverBudget, TrainingDiverged, OutOfMemory)


def run_trial(
    study: optuna.Study, storage: Storage, objective: Callable[[optuna.Trial], float], reaper: Reaper
) -> None:
    """Ask for a trial, run it with a heartbeat, and tell its outcome: Optuna's ask-and-tell, with
    the failure handling a shared study needs.

    - A database outage while the trial trains does not fail it: its storage calls wait for the
      database (Storage.ride_out_s) and the trial goes on.
    - If the trial was finished elsewhere meanwhile (reaped while this worker was paused or cut
      off), its result is dropped with one log line; its retry is already queued.
    - Any other failure leaves a reason on the trial. A signal re-queues it before the worker exits.
    """
    trial = _ask(study, storage)
    try:
        interval = storage.heartbeat_interval or StorageSettings.heartbeat_interval
        with Heartbeat(storage, trial_id(trial), interval, also=reaper):
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                tell(study, trial, state=TrialState.PRUNED)
            except TRIAL_FAILURES as e:
                log.warning("trial %d failed: %s", trial.number, e)
                tell(study, trial, state=TrialState.FAIL)
            else:
                tell(study, trial, values=value)
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning(
            "trial %d was finished elsewhere while this worker was out of touch (its retry is "
            "queued); dropping its result",
            trial.number,
        )
    except Shutdown as e:
        _requeue_on_stop(study, storage, trial, e)
        raise
    except Exception as e:
        if connection_error(e) is not None or isinstance(e, StorageError):
            raise  # the trial stays RUNNING without heartbeats; a reaper fails it and queues its retry
        fail(study, trial_id(trial), f"error in the worker: {type(e).__name__}: {first_line(e)}", retry=False)
        raise


def _ask(study: optuna.Study, storage: Storage) -> optuna.Trial:
    """study.ask(). A signal inside it (once the trial's row exists, before anything else marks the
    trial as this worker's) takes effect when ask has returned, and the trial is failed and re-queued
    instead of being left RUNNING with no heartbeat for another run's reaper."""
    trial: optuna.Trial | None = None
    try:
        with warnings.catch_warnings(), uninterrupted():  # Optuna warns that heartbeats belong to study.optimize
            warnings.simplefilter("ignore", UserWarning)
            trial = study.ask()
    except Shutdown as e:
        if trial is not None:
            _requeue_on_stop(study, storage, trial, e)
        raise
    return trial


def _requeue_on_stop(study: optuna.Study, storage: Storage, trial: optuna.Trial, e: Shutdown) -> None:
    reason = f"worker stopped by {e.signal.name}; {retry_note(storage.get_trial(trial_id(trial)), storage.max_retry)}"
    if fail(study, trial_id(trial), reason, retry=True):
        log.warning("trial %d failed and re-queued: worker stopped by %s", trial.number, e.signal.name)


def tell(study: optuna.Study, trial: optuna.Trial, **outcome) -> None:
    """study.tell, repeated across a lost connection (a repeat finds the trial finished by the first try).

    A trial that a reaper failed meanwhile (this worker was paused past the grace period) makes
    Optuna raise ValueError("Cannot tell a FAIL trial"); that is UpdateFinishedTrialError here, which
    run_trial handles: the result is dropped, the retry is queued already."""
    try:
        study.tell(trial, **outcome)
    except Exception as e:
        if connection_error(e) is None:
            if study_storage(study).get_trial(trial_id(trial)).state.is_finished():
                raise optuna.exceptions.UpdateFinishedTrialError(
                    f"trial {trial.number} was finished elsewhere before its result came"
                ) from e
            raise
        log.warning("database unreachable while finishing trial %d (%s); trying again", trial.number, first_line(e))
        study_storage(study).get_trial(trial_id(trial))  # rides out the outage
        study.tell(trial, skip_if_finished=True, **outcome)


def run(
    study: optuna.Study,
    cfg: StudyConfig,
    data: TrialData,
    workspace: Workspace,
    poll_s: float = 2.0,
    outage_s: float = 120.0,
) -> WorkerResult:
    """Run trials until the budget is met, riding out database outages of up to `outage_s`."""
    assert workspace.storage is not None, "a worker runs a stored study"
    workspace.storage.ride_out_s = outage_s
    last_error = -1e9
    backoff = Backoff(outage_s, first=1.0, cap=15.0)
    result = WorkerResult()  # survives the restarts of _run after an outage
    while True:
        try:
            _run(study, cfg, data, workspace, poll_s, result)
            return result
        except Exception as e:
            cause = connection_error(e)
            if cause is None:
                raise
            now = time.monotonic()
            if now - last_error > 30:  # errors less than 30 s apart belong to one outage
                backoff = Backoff(outage_s, first=1.0, cap=15.0)
            last_error = now
            wait = backoff.next_wait()
            if wait is None:
                raise lost_database(outage_s, cause) from e
            log.warning("storage error (%s); retrying in %.0fs", first_line(cause), wait)
            time.sleep(wait)


def _run(
    study: optuna.Study, cfg: StudyConfig, data: TrialData, workspace: Workspace, poll_s: float, result: WorkerResult
) -> None:
    storage = workspace.storage
    assert storage is not None
    final_threads = finalizer_threads(workspace.placement.device.type == "cuda", workspace.placement.threads)
    lock = slot_lock(storage, cfg.name)
    reaper = Reaper(study, storage)
    slots = _Slots(cfg.budget.n_trials)  # re-read before every trial: `hpo extend` may raise it
    slots.members = Reserved(study, cfg, data.val.y, workspace.artifact_store)
    objective = _objective(study, cfg, data, workspace, lock, slots)
    ensure_calibrated(study, cfg, data, workspace.placement)
    waiting_logged = False
    while True:
        reaper()
        reaper.repair(lock)
        # Count and ask under the lock: a slot seen free here is still free when the trial is created.
        lock.acquire()
        try:
            free = _free_slot(study, cfg, slots, reaper, result, final_threads)
            if free is None:
                return
            if free:
                waiting_logged = False
                run_trial(study, storage, objective, reaper)
                result.trials_run += 1
        finally:
            lock.release()
        if not free:
            if not waiting_logged:
                log.info(
                    "all %d slots are taken (%d running); waiting for them to finish", slots.n_trials, slots.running
                )
                waiting_logged = True
            time.sleep(poll_s)


@dataclass
class _Slots:
    """The budget as last read under the slot lock, the time-budget decision that let the latest
    trial start (read by the objective it let start), and the members its reserve counts."""

    n_trials: int
    running: int = 0
    plan: budget.Plan | None = None
    members: Callable[[], list[optuna.trial.FrozenTrial] | None] = lambda: None  # the reserve's (join.Reserved)


def _objective(
    study: optuna.Study, cfg: StudyConfig, data: TrialData, workspace: Workspace, lock: DatabaseLock, slots: _Slots
) -> Callable[[optuna.Trial], float]:
    """The trial objective, with its slot claim (which lets the other workers ask once the trial
    exists) and its per-epoch time check."""
    placement = workspace.placement
    final_threads = finalizer_threads(placement.device.type == "cuda", placement.threads)

    def claim(trial: optuna.Trial) -> bool:
        """Called by the objective first: is this trial within the budget? Then let others ask."""
        try:
            return not over_budget(study, slots.n_trials, trial)
        finally:
            lock.release()

    def epoch_plan(ask: budget.NextEpoch) -> budget.Plan | None:
        deadline = budget.get_deadline(study)
        if deadline is None:
            return None
        return budget.plan_epoch(study, cfg, deadline, final_threads, ask, chosen=slots.members())

    return make_objective(cfg, data, workspace, claim, lambda: slots.plan, epoch_plan)


def _free_slot(
    study: optuna.Study, cfg: StudyConfig, slots: _Slots, reaper: Reaper, result: WorkerResult, final_threads: int
) -> bool | None:
    """Under the slot lock: True if a trial may start now, False while every slot is held by a
    running trial, None once the budget is met or the time left holds no trial (`result.reason` says
    which)."""
    slots.n_trials = current_budget(study)
    states = counts(study)
    finished, slots.running = states["COMPLETE"] + states["PRUNED"], states["RUNNING"]
    if finished >= slots.n_trials:
        result.reason = f"budget met: {finished}/{slots.n_trials} trials finished"
        return None
    deadline = budget.get_deadline(study)
    if deadline is not None:
        plan = slots.plan = budget.plan_trial(study, cfg, deadline, final_threads, chosen=slots.members())
        if not plan.fits:
            result.reason = f"time budget: {plan.describe()}, so no trial starts"
            reaper.settle()  # a copy owed now is failed below with the reason, not lost
            fail_waiting(study, f"over budget: the time ran out before this retry could start ({plan.describe()})")
            return None
    return states["WAITING"] > 0 or finished + states["RUNNING"] < slots.n_trials


@dataclass(frozen=True)
class Request:
    """What `hpo worker` was asked for, as its options gave it."""

    study_arg: str  # a study name or a study file's path
    storage: str | None
    data_dir: str | None
    device: str | None
    artifacts: str | None  # a directory or s3://BUCKET; None: the storage's default store
    threads: int | None
    sampler_seed: int | None
    trials_per_gpu: int | None


def start(request: Request) -> WorkerResult:
    """`hpo worker`: the artifact store is opened first (a bad location fails before the storage is
    touched), then the study file (an invalid one writes nothing), then the storage; then `serve`."""
    from hpo.learn.devices import trials_per_gpu
    from hpo.search.artifacts import open_for
    from hpo.search.session import worker_config
    from hpo.search.storage import resolve_url

    slots = trials_per_gpu(request.trials_per_gpu)
    _, artifact_store = open_for(request.artifacts, resolve_url(request.storage))
    cfg, opened = worker_config(request.study_arg, request.storage)
    return serve(request, cfg, opened, artifact_store, slots)


def serve(
    request: Request, cfg: StudyConfig, opened: Opened, artifact_store: ArtifactStore | None, slots: int
) -> WorkerResult:
    """`hpo worker`: claim a device, load the data once, join the study (creating it if this worker is
    first) and run trials until the budget says stop. Raises Shutdown on SIGTERM/SIGINT."""
    from hpo.learn import data, sources
    from hpo.learn.devices import CpuShare, place
    from hpo.search.storage import mask
    from hpo.search.study import create_or_load

    install_signal_handlers()
    placement = place(request.device, request.threads, claim=True, slots=slots)
    # Data problems surface before the study is touched; data that differs from the study's, before a trial.
    # A worker never opens the source's own test files (a held-out test split is set apart, unused).
    dataset = sources.open_for(cfg, request.data_dir, with_test=False)
    study, cfg = create_or_load(opened.storage, cfg, sampler_seed=request.sampler_seed)
    dataset = sources.for_study(dataset, cfg, request.data_dir)
    sources.check(study, dataset)
    trial_data = data.trial_data(
        dataset,
        cfg.budget.val_fraction,
        cfg.seed,
        placement.device,
        cfg.budget.train_subset,
        sources.test_count(study, dataset),
    )
    log.info("worker on %s joins study %r at %s (data %s)", placement.name, cfg.name, mask(opened.url), dataset.origin)
    share = CpuShare.from_env() if placement.device.type == "cpu" else None
    try:
        return run(study, cfg, trial_data, Workspace(opened.storage, artifact_store, placement, dataset, share))
    finally:
        if share is not None:
            share.leave()  # its cores go to the workers still training


def ensure_calibrated(study: optuna.Study, cfg: StudyConfig, data: TrialData, placement: Placement) -> None:
    """A study with a deadline and no measured epoch yet needs a calibration to plan its first trials."""
    if budget.get_deadline(study) is None or budget.measured(study) or budget.calibration(study) is not None:
        return
    cost = calibrate(cfg, data, placement)
    log.info("calibrated: a typical trial epoch takes about %.1fs here", cost.epoch_s)
    if budget.calibration(study) is None:  # another worker may have stored its own meanwhile; either will do
        study.set_user_attr(attrs.CALIBRATION, dataclasses.asdict(cost))


def fail_waiting(study: optuna.Study, reason: str) -> None:
    """Fail queued retries that the time budget leaves no room for, with the reason on each."""
    storage = study_storage(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        storage.set_trial_user_attr(trial_id(trial), attrs.REASON, reason)
        storage.set_trial_state_values(trial_id(trial), TrialState.FAIL)
        log.warning("trial %d failed: %s", trial.number, reason)
