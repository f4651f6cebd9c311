"""One worker process: run trials of a shared study until its budget of finished trials is met.

The budget is exact however many workers share the study. Holding a study-wide lock (SlotLock), a
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
import os
import signal
import time
import warnings
from dataclasses import dataclass
from types import FrameType

import optuna
import sqlalchemy
from optuna.trial import TrialState

from hpo import budget
from hpo.config import StudyConfig
from hpo.data import TrialData
from hpo.devices import Placement, cpu_count
from hpo.errors import StorageError
from hpo.storage import SlotLock, StorageSettings
from hpo.objective import REASON_ATTR, OutOfMemory, OverBudget, calibrate, make_objective
from hpo.study import counts, reap_stale
from hpo.train import TrainingDiverged

log = logging.getLogger(__name__)

HOLDS_A_SLOT = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


class Shutdown(KeyboardInterrupt):
    """SIGTERM or SIGINT: Optuna fails the running trial, the worker re-queues it and exits."""


def _raise_shutdown(signum: int, _frame: FrameType | None) -> None:
    raise Shutdown(f"received {signal.Signals(signum).name}")


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _raise_shutdown)
    signal.signal(signal.SIGINT, _raise_shutdown)


def over_budget(study: optuna.Study, n_trials: int, trial: optuna.Trial) -> bool:
    ahead = [t for t in study.get_trials(deepcopy=False, states=HOLDS_A_SLOT) if t.number < trial.number]
    return len(ahead) >= n_trials


@dataclass
class WorkerResult:
    trials_run: int = 0
    reason: str = ""


def requeue_interrupted(study: optuna.Study, placement: Placement) -> None:
    """Queue a WAITING copy of the trial this process was running when it was told to stop."""
    mine = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if t.user_attrs.get("pid") == os.getpid() and t.user_attrs.get("host") == placement.host
            and "worker stopped" in t.user_attrs.get("fail_reason", "")]
    if mine:
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=StorageSettings.from_env().max_retry)
        retry(study, max(mine, key=lambda t: t.number))


STORAGE_ERRORS = (sqlalchemy.exc.DBAPIError, sqlalchemy.exc.PendingRollbackError,
                  optuna.exceptions.StorageInternalError)


def storage_cause(e: BaseException) -> BaseException | None:
    """The database error behind `e`, if any.

    When the database drops while a trial is being told, Optuna 5.0's `_run_trial` fails again
    while recovering and raises an UnboundLocalError whose context is the storage error; that
    counts as a storage error too.
    """
    seen = 0
    current: BaseException | None = e
    while current is not None and seen < 8:
        if isinstance(current, STORAGE_ERRORS):
            return current
        current = current.__cause__ or current.__context__
        seen += 1
    return None


def run(study: optuna.Study, cfg: StudyConfig, data: TrialData, placement: Placement,
        storage: optuna.storages.RDBStorage, poll_s: float = 2.0, outage_s: float = 120.0,
        artifact_store=None) -> WorkerResult:
    """Run trials until the budget is met, riding out database outages of up to `outage_s`."""
    outage_started = last_error = -1e9
    delay = 1.0
    result = WorkerResult()  # survives the restarts of _run after an outage
    while True:
        try:
            _run(study, cfg, data, placement, poll_s, storage, result, artifact_store)
            return result
        except Shutdown:
            requeue_interrupted(study, placement)
            raise
        except optuna.exceptions.UpdateFinishedTrialError as e:
            log.warning("a trial this worker ran was finished elsewhere (%s); carrying on", e)
        except Exception as e:
            cause = storage_cause(e)
            if cause is None:
                raise
            now = time.monotonic()
            if now - last_error > 30:  # errors less than 30 s apart belong to one outage
                outage_started, delay = now, 1.0
            last_error = now
            if now - outage_started > outage_s:
                raise StorageError(f"lost the database for more than {outage_s:.0f}s ({str(cause).splitlines()[0]}). "
                                   "Check that it is up; the study's trials are safe in it.") from e
            # The interrupted trial stays RUNNING without heartbeats; a worker reaps and retries it.
            log.warning("storage error (%s); retrying in %.0fs", str(cause).splitlines()[0], delay)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


def _run(study: optuna.Study, cfg: StudyConfig, data: TrialData, placement: Placement,
         poll_s: float, storage: optuna.storages.RDBStorage, result: WorkerResult, artifact_store=None) -> None:
    n_trials = cfg.budget.n_trials
    lock = SlotLock(storage, cfg.name)

    def claim(trial: optuna.Trial) -> bool:
        """Called by the objective first: is this trial within the budget? Then let others ask."""
        try:
            return not over_budget(study, n_trials, trial)
        finally:
            lock.release()

    plans: list[budget.Plan | None] = [None]  # the latest decision, read by the objective it let start
    objective = make_objective(cfg, data, placement, claim, artifact_store, plan=lambda: plans[0])
    ensure_calibrated(study, cfg, data, placement)
    # The finalizer has the whole machine: all its cores, or this worker's GPU.
    final_threads = placement.threads if placement.device.type == "cuda" else cpu_count()
    waiting_logged = False
    while True:
        reap_stale(study)
        # Count and ask under the lock: a slot seen free here is still free when the trial is created.
        lock.acquire()
        try:
            c = counts(study)
            finished = c["COMPLETE"] + c["PRUNED"]
            if finished >= n_trials:
                result.reason = f"budget met: {finished}/{n_trials} trials finished"
                return
            deadline = budget.get_deadline(study)
            if deadline is not None:
                plan = plans[0] = budget.plan_trial(study, cfg, deadline, final_threads)
                if not plan.fits:
                    result.reason = f"time budget: {plan.describe()}, so no trial starts"
                    fail_waiting(study, f"over budget: the time ran out before this retry could start "
                                        f"({plan.describe()})")
                    return
            full = c["WAITING"] == 0 and finished + c["RUNNING"] >= n_trials
            if not full:
                waiting_logged = False
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    study.optimize(objective, n_trials=1, catch=(OverBudget, TrainingDiverged, OutOfMemory),
                                   gc_after_trial=False)
                result.trials_run += 1
        finally:
            lock.release()
        if full:
            if not waiting_logged:
                log.info("all %d slots are taken (%d running); waiting for them to finish", n_trials, c["RUNNING"])
                waiting_logged = True
            time.sleep(poll_s)


def ensure_calibrated(study: optuna.Study, cfg: StudyConfig, data: TrialData, placement: Placement) -> None:
    """A study with a deadline and no measured epoch yet needs a calibration to plan its first trials."""
    if budget.get_deadline(study) is None or budget.measured(study) or budget.calibration(study) is not None:
        return
    cost = calibrate(cfg, data, placement)
    log.info("calibrated: a typical trial epoch takes about %.1fs here", cost.epoch_s)
    if budget.calibration(study) is None:  # another worker may have stored its own meanwhile; either will do
        study.set_user_attr(budget.CALIBRATION_ATTR, dataclasses.asdict(cost))


def fail_waiting(study: optuna.Study, reason: str) -> None:
    """Fail queued retries that the time budget leaves no room for, with the reason on each."""
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        storage.set_trial_user_attr(t._trial_id, REASON_ATTR, reason)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        log.warning("trial %d failed: %s", t.number, reason)
