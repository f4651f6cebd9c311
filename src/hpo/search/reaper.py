"""Dead workers' trials: each is failed once with a reason and re-queued, and a live one never.

A worker that dies (SIGKILL, a lost host) leaves its trial RUNNING. Every worker reaps between its
heartbeats: a trial whose heartbeat stopped is failed and a WAITING copy queued, which resumes from
the trial's last checkpoint. Optuna's retry callback counts the copies (`max_retry`).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from hpo import attrs
from hpo.search.locks import DatabaseLock
from hpo.search.optuna_compat import (
    last_heartbeats,
    running_without_heartbeat,
    stale_trial_ids,
    study_id,
    study_storage,
    trial_id,
)
from hpo.search.storage import Storage, StorageSettings
from hpo.search.trials import retry_history

log = logging.getLogger(__name__)


def requeue(study: optuna.Study, failed: optuna.trial.FrozenTrial) -> bool:
    """Queue a WAITING copy of a failed trial through the storage's RetryHeartbeatStaleTrialCallback
    (it keeps the retry count, so no configuration runs more than `max_retry` extra times). The copy
    leaves the failure's reason behind. False: the retries are used up, or the storage keeps none."""
    callback = getattr(study_storage(study), "get_heartbeat_stale_trial_callback", lambda: None)()
    if callback is None:
        return False
    before = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    clean = copy.deepcopy(failed)
    clean.user_attrs = {k: v for k, v in failed.user_attrs.items() if k != attrs.REASON}
    clean.system_attrs = {k: v for k, v in failed.system_attrs.items() if k != attrs.REQUEUE}
    callback(study, clean)
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))) > before


def retry_note(trial: optuna.trial.FrozenTrial, max_retry: int) -> str:
    """How the reason of a failure that is retried ends: whether a copy is queued."""
    runs = len(retry_history(trial)) + 1
    return "re-queued" if runs <= max_retry else f"not re-queued: this configuration has run {runs} times"


def fail(study: optuna.Study, trial_id: int, reason: str, retry: bool) -> bool:
    """Fail a RUNNING trial with `reason` and, if `retry`, queue its copy. Whoever fails it first does
    both; False: it was finished already (by its worker, or by another reaper).

    The FAIL and the copy are two writes. A trial whose copy is due is marked before its FAIL, so
    that if the process dies or loses the database between them, a reaper sees a marked FAIL with no
    copy and queues the copy itself (Reaper.repair)."""
    storage = study_storage(study)
    try:
        storage.set_trial_user_attr(trial_id, attrs.REASON, reason)
        due = retry and reason.endswith("re-queued")
        storage.set_trial_system_attr(trial_id, attrs.REQUEUE, due)
        if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    frozen = storage.get_trial(trial_id)
    if retry and not requeue(study, frozen):
        log.warning("trial %d is not retried: its configuration has used up its retries", frozen.number)
    return True


def requeue_orphans(study: optuna.Study, max_retry: int, host: str, exits: dict[int, str]) -> list[int]:
    """After workers of this host have exited (`exits`: each one's pid and how it ended), fail and
    re-queue the trials they left RUNNING, at once rather than after the grace period: a worker
    killed before its own fail-and-requeue ran. Returns the trials' numbers."""
    numbers = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        ending = exits.get(trial.user_attrs.get(attrs.PID, -1))
        if ending is None or trial.user_attrs.get(attrs.HOST) != host:
            continue
        reason = f"{ending}; {retry_note(trial, max_retry)}"
        if fail(study, trial_id(trial), reason, retry=True):
            log.warning("trial %d failed: %s", trial.number, reason)
            numbers.append(trial.number)
    return numbers


def copy_of(trials: list[optuna.trial.FrozenTrial], number: int) -> optuna.trial.FrozenTrial | None:
    """The retry queued for trial `number`, if there is one (the copy's retry history ends with it)."""
    return next((t for t in trials if retry_history(t)[-1:] == [number]), None)


def lost_requeues(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """FAIL trials marked for a retry that has no copy: the failing process died (or lost the
    database) between the FAIL and the copy."""
    trials = study.get_trials(deepcopy=False)
    return [
        t
        for t in trials
        if t.state == TrialState.FAIL and t.system_attrs.get(attrs.REQUEUE) and copy_of(trials, t.number) is None
    ]


def adopt_liveness(study: optuna.Study, storage: Storage, record: bool = False) -> None:
    """Judge this study's trials by the heartbeat settings stored in it, not this process's own:
    a host started with another HPO_GRACE_PERIOD would otherwise reap other hosts' live trials.
    `record`: store this process's settings if the study has none yet (it was just created, or
    created by an hpo without them)."""
    ours = {
        "heartbeat_interval": storage.heartbeat_interval,
        "grace_period": storage.grace_period,
        "max_retry": storage.max_retry,
    }
    stored = study_storage(study).get_study_system_attrs(study_id(study)).get(attrs.LIVENESS)
    if stored is None:
        if record:
            study_storage(study).set_study_system_attr(study_id(study), attrs.LIVENESS, ours)
        return
    if stored != ours:
        log.warning(
            "study %r judges its trials by its own heartbeat settings (heartbeat every %ss, grace period "
            "%ss, %s retries), set when it was created; this process's HPO_HEARTBEAT_INTERVAL, "
            "HPO_GRACE_PERIOD or HPO_MAX_RETRY (%ss, %ss, %s) are ignored for it",
            study.study_name,
            stored["heartbeat_interval"],
            stored["grace_period"],
            stored["max_retry"],
            ours["heartbeat_interval"],
            ours["grace_period"],
            ours["max_retry"],
        )
    storage.heartbeat_interval = stored["heartbeat_interval"]
    storage.grace_period = stored["grace_period"]
    storage.max_retry = stored["max_retry"]
    storage.heartbeat_stale_trial_callback = optuna.storages.RetryHeartbeatStaleTrialCallback(
        max_retry=stored["max_retry"]
    )


def worker_of(trial: optuna.trial.FrozenTrial) -> str:
    return f"its worker (host {trial.user_attrs.get(attrs.HOST, '?')}, pid {trial.user_attrs.get(attrs.PID, '?')})"


class Watch:
    """What one process has watched: for each key, the token it showed (a heartbeat, or None) and
    when it was first seen showing it. Pure bookkeeping of the times it is given, so that tests can
    step the clock instead of sleeping.

    A key is forgotten when it is gone or shows another token, and when it was first seen before
    `outage` (this process's last lost connection: what was watched across it proves nothing)."""

    def __init__(self) -> None:
        self.first_seen: dict[Any, tuple[Any, float]] = {}

    def see(self, current: dict[Any, Any], now: float, outage: float) -> None:
        self.first_seen = {
            key: (token, seen)
            for key, (token, seen) in self.first_seen.items()
            if key in current and current[key] == token and seen > outage
        }
        for key, token in current.items():
            self.first_seen.setdefault(key, (token, now))

    def held(self, now: float, hold_s: float) -> list[Any]:
        """The keys that have shown the same token for at least `hold_s` seconds."""
        return [key for key, (_, seen) in self.first_seen.items() if now - seen >= hold_s]

    def forget(self, key: Any) -> None:
        self.first_seen.pop(key, None)

    def clear(self) -> None:
        self.first_seen.clear()


class Reaper:
    """Fails the trials whose worker is gone and re-queues them, without ever taking a live one.

    By the database's clock alone, every running trial looks dead after an outage that was longer
    than the grace period: no worker could write a heartbeat while the database was down. So a
    trial counts as dead only when it is stale by the database's clock and its last heartbeat
    stays unchanged while this process watches for `confirm_s` (two heartbeat intervals and a
    second), with the database reachable all along. A live worker writes a heartbeat in that time.

    Two more kinds of dead trial have no stale heartbeat to find:
    - a RUNNING trial with no heartbeat at all (its worker died between creating it and its first
      beat, which a live worker sends at once): dead once this process has watched it stay so for
      the grace period and `confirm_s`;
    - a FAIL marked for a retry whose copy never came (Reaper.repair).

    The settings come from the storage, which took them from the study (adopt_liveness). `now`
    (time.monotonic() unless given) is the only clock the bookkeeping reads.
    """

    def __init__(self, study: optuna.Study, storage: Storage):
        self.study, self.storage = study, storage  # the RDBStorage itself, not Optuna's cache over it
        self._stale = Watch()  # trial id -> its last heartbeat, stale by the database's clock
        self._silent = Watch()  # trial id, RUNNING without any heartbeat
        self._orphans = Watch()  # trial number, FAIL without its due copy
        self._lock = threading.Lock()

    @property
    def confirm_s(self) -> float:
        return 2 * (self.storage.heartbeat_interval or StorageSettings.heartbeat_interval) + 1

    @property
    def grace_s(self) -> float:
        return self.storage.grace_period or StorageSettings.grace_period

    def __call__(self, now: float | None = None) -> list[int]:
        """Reap what has been confirmed dead; returns the ids of the trials this call failed."""
        storage = self.storage
        if storage.get_heartbeat_interval() is None:
            return []
        with self._lock:
            try:
                stale = stale_trial_ids(storage, self.study)
                beats = last_heartbeats(storage, stale)
                silent = running_without_heartbeat(storage, self.study)
            except Exception:
                self._stale.clear()  # what was watched across an outage proves nothing
                self._silent.clear()
                raise
            now = time.monotonic() if now is None else now
            self._stale.see({tid: beat for tid, (beat, _) in beats.items()}, now, storage.last_error_at)
            self._silent.see(dict.fromkeys(silent), now, storage.last_error_at)
            failed = []
            for tid in self._stale.held(now, self.confirm_s):
                self._stale.forget(tid)
                trial = storage.get_trial(tid)
                why = f"stale heartbeat: {worker_of(trial)} sent none for {beats[tid][1]:.0f}s, over the "
                failed += self._fail(trial, f"{why}{self.grace_s}s grace period")
            for tid in self._silent.held(now, self.grace_s + self.confirm_s):
                self._silent.forget(tid)
                trial = storage.get_trial(tid)
                why = f"no heartbeat ever: {worker_of(trial)} died before its first one; watched for "
                failed += self._fail(trial, f"{why}{self.grace_s + self.confirm_s:.0f}s")
            return failed

    def _fail(self, trial: optuna.trial.FrozenTrial, why: str) -> list[int]:
        """Fail the trial for `why` and queue its retry: [its id], or [] if it was finished meanwhile."""
        reason = f"{why}; {retry_note(trial, self.storage.max_retry)}"
        if not fail(self.study, trial_id(trial), reason, retry=True):
            return []
        log.warning("trial %d failed: %s", trial.number, reason)
        return [trial_id(trial)]

    def repair(self, lock: DatabaseLock | None = None, now: float | None = None) -> list[int]:
        """Queue the copies that FAIL trials marked for a retry never got, once this process has seen
        them missing for `confirm_s` (the failing process writes its copy milliseconds after the FAIL).
        With `lock` (the study's slot_lock), only while it can be had at once, so that two reapers do
        not both queue one; returns the numbers of the trials whose copy it queued."""
        with self._lock:
            orphans = {t.number: t for t in lost_requeues(self.study)}
            now = time.monotonic() if now is None else now
            self._orphans.see(dict.fromkeys(orphans), now, self.storage.last_error_at)
            due = self._orphans.held(now, self.confirm_s)
            if not due or (lock is not None and not lock.try_acquire()):
                return []
            try:
                repaired = []
                for number in due:
                    if copy_of(self.study.get_trials(deepcopy=False), number) is None and requeue(
                        self.study, orphans[number]
                    ):
                        log.warning("trial %d: queued the retry its failing worker did not live to queue", number)
                        repaired.append(number)
                    self._orphans.forget(number)
                return repaired
            finally:
                if lock is not None:
                    lock.release()

    def settle(self) -> list[int]:
        """Before a worker leaves a study that others are leaving too: queue the copies still owed,
        waiting out `confirm_s` for the ones only just seen, since no process may come back to do it.
        The caller holds the study's lock. Returns the numbers of the trials whose copy it queued."""
        repaired = self.repair()
        give_up = time.monotonic() + self.confirm_s + 1
        while lost_requeues(self.study) and time.monotonic() < give_up:
            time.sleep(0.5)
            repaired += self.repair()
        return repaired
