"""One worker process: run trials of a shared study until its budget of finished trials is met.

The budget is exact however many workers share the study. A worker first asks for a trial, then
checks that fewer than `n_trials` earlier-numbered trials are finished, running or waiting; trial
numbers are handed out under a lock in the storage, so the check cannot be won twice. A trial that
loses it is failed at once (reason in its `fail_reason` attribute) and does not count. While the
remaining slots are held by other workers' running trials, a worker waits and reaps trials whose
worker died (their retries then come back as WAITING trials that anyone may pick up).
"""

from __future__ import annotations

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

from hpo.config import StudyConfig
from hpo.data import TrialData
from hpo.devices import Placement
from hpo.errors import StorageError
from hpo.storage import StorageSettings
from hpo.objective import OverBudget, make_objective
from hpo.study import counts
from hpo.train import TrainingDiverged

log = logging.getLogger(__name__)

HOLDS_A_SLOT = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


class Shutdown(KeyboardInterrupt):
    """SIGTERM: Optuna fails the running trial (as for Ctrl-C) and the worker exits."""


def _raise_shutdown(signum: int, _frame: FrameType | None) -> None:
    raise Shutdown(f"received {signal.Signals(signum).name}")


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _raise_shutdown)


def over_budget(study: optuna.Study, n_trials: int, trial: optuna.Trial) -> bool:
    ahead = [t for t in study.get_trials(deepcopy=False, states=HOLDS_A_SLOT) if t.number < trial.number]
    return len(ahead) >= n_trials


def reap_stale(study: optuna.Study) -> None:
    """Fail trials whose worker stopped sending heartbeats; the retry callback re-queues them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


@dataclass
class WorkerResult:
    trials_run: int
    reason: str


def requeue_interrupted(study: optuna.Study, placement: Placement) -> None:
    """Queue a WAITING copy of the trial this process was running when it was told to stop."""
    mine = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if t.user_attrs.get("pid") == os.getpid() and t.user_attrs.get("host") == placement.host
            and "worker stopped" in t.user_attrs.get("fail_reason", "")]
    if mine:
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=StorageSettings.from_env().max_retry)
        retry(study, max(mine, key=lambda t: t.number))


STORAGE_ERRORS = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                  optuna.exceptions.StorageInternalError)


def run(study: optuna.Study, cfg: StudyConfig, data: TrialData, placement: Placement,
        poll_s: float = 2.0, outage_s: float = 120.0) -> WorkerResult:
    """Run trials until the budget is met, riding out database outages of up to `outage_s`."""
    outage_started: float | None = None
    delay = 1.0
    while True:
        try:
            result = _run(study, cfg, data, placement, poll_s)
            return result
        except Shutdown:
            requeue_interrupted(study, placement)
            raise
        except STORAGE_ERRORS as e:
            now = time.monotonic()
            outage_started = outage_started or now
            if now - outage_started > outage_s:
                raise StorageError(f"lost the database for more than {outage_s:.0f}s ({str(e).splitlines()[0]}). "
                                   "Check that it is up; the study's trials are safe in it.") from e
            # The interrupted trial stays RUNNING without heartbeats; a worker reaps and retries it.
            log.warning("storage error (%s); retrying in %.0fs", str(e).splitlines()[0], delay)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)
        except optuna.exceptions.UpdateFinishedTrialError as e:
            log.warning("a trial this worker ran was finished elsewhere (%s); carrying on", e)


def _run(study: optuna.Study, cfg: StudyConfig, data: TrialData, placement: Placement,
         poll_s: float) -> WorkerResult:
    n_trials = cfg.budget.n_trials
    objective = make_objective(cfg, data, placement, lambda trial: over_budget(study, n_trials, trial))
    ran = 0
    waiting_logged = False
    while True:
        reap_stale(study)
        c = counts(study)
        finished = c["COMPLETE"] + c["PRUNED"]
        if finished >= n_trials:
            return WorkerResult(ran, f"budget met: {finished}/{n_trials} trials finished")
        holding = finished + c["RUNNING"] + c["WAITING"]
        if c["WAITING"] == 0 and holding >= n_trials:
            if not waiting_logged:
                log.info("all %d slots are taken (%d running); waiting for them to finish", n_trials, c["RUNNING"])
                waiting_logged = True
            time.sleep(poll_s)
            continue
        waiting_logged = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(objective, n_trials=1, catch=(OverBudget, TrainingDiverged), gc_after_trial=False)
        ran += 1
