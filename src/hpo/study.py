"""Create a study once, load it everywhere; its settings live in the study itself."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import threading
import time
from typing import Any

import optuna
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import TrialState

from hpo import artifacts as artifacts_mod
from hpo import attrs, budget, config
from hpo.config import StudyConfig
from hpo.errors import ConfigError, StorageError
from hpo.optuna_compat import (
    heartbeat_ages,
    last_heartbeats,
    running_without_heartbeat,
    stale_trial_ids,
    study_id,
    study_storage,
    trial_id,
)
from hpo.storage import SlotLock, Storage, StorageSettings, creation_lock
from hpo.trials import FINISHED, best_first, retry_history, value

log = logging.getLogger(__name__)


def make_sampler(cfg: StudyConfig, seed: int | None) -> optuna.samplers.BaseSampler:
    cls = getattr(optuna.samplers, config.SAMPLERS[cfg.sampler.name])
    return _built(cfg, "sampler", lambda: cls(seed=seed, **cfg.sampler.options))


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    cls = getattr(optuna.pruners, config.PRUNERS[cfg.pruner.name])
    return _built(cfg, "pruner", lambda: cls(**cfg.pruner.options))


def _built(cfg: StudyConfig, section: str, build: Any) -> Any:
    """The sampler or pruner the stored settings describe, or a ConfigError that says what to do
    (a study file is checked before it is stored; this catches settings a newer Optuna refuses)."""
    try:
        return build()
    except Exception as e:  # Optuna raises ValueError, TypeError or its own errors
        component = getattr(cfg, section)
        raise ConfigError(
            f"study {cfg.name!r}: its stored [{section}] settings ({component.name}, {component.options}) no "
            f"longer build with Optuna {optuna.__version__} ({type(e).__name__}: {e}). `hpo status` and `hpo "
            "delete` still work; to search on, create a new study with valid settings."
        ) from e


def _stored_raw(study: optuna.Study) -> dict[str, Any] | None:
    """The settings recorded in the study: a system attribute, which the dashboard does not lead
    with (studies made before kept them in a user attribute of the same name)."""
    storage = study_storage(study)
    system = storage.get_study_system_attrs(study_id(study))
    return system.get(attrs.CONFIG, storage.get_study_user_attrs(study_id(study)).get(attrs.CONFIG))


def stored_config(study: optuna.Study) -> StudyConfig | None:
    """The settings the study runs with (None: not an hpo study)."""
    stored = _stored_raw(study)
    return None if stored is None else config.from_dict(stored, source=f"study {study.study_name!r}")


def _record_config(study: optuna.Study, cfg: StudyConfig) -> None:
    """Store the settings, and what the dashboard shows of them: the metric's name and one line."""
    study_storage(study).set_study_system_attr(study_id(study), attrs.CONFIG, cfg.to_dict())
    study.set_metric_names([cfg.metric])
    study.set_user_attr(attrs.SETTINGS, config.summary(cfg))


def create_or_load(
    storage: optuna.storages.RDBStorage, cfg: StudyConfig, sampler_seed: int | None = None
) -> tuple[optuna.Study, StudyConfig]:
    """Open the study `cfg` names, creating it (and recording `cfg`) if it is new.

    Safe to call from many processes at once: creation runs under a database-wide lock, and every
    caller checks that the recorded search space is the one it was given.
    """
    with creation_lock(storage.url):
        # Look before creating: an INSERT that loses to an existing row would fill the server log.
        try:
            study = optuna.load_study(study_name=cfg.name, storage=storage)
        except KeyError:
            first = warm_start_trials(storage, cfg)  # a bad warm start stops here, before anything is written
            study = optuna.create_study(
                storage=storage,
                study_name=cfg.name,
                load_if_exists=True,
                direction=optuna.study.StudyDirection[cfg.direction.upper()],
            )
            for params, origin in first:
                study.enqueue_trial(params, user_attrs={attrs.WARM_START: origin}, skip_if_exists=True)
            if first:
                log.info("study %r: %d warm-start configuration(s) queued as its first trials", cfg.name, len(first))
        if isinstance(storage, Storage):
            adopt_liveness(study, storage, record=True)
        stored = stored_config(study)
        if stored is None:
            _record_config(study, cfg)
            stored = cfg
            if cfg.budget.time_s is not None:  # the clock of a file's time budget starts with the study
                budget.set_deadline(study, cfg.budget.time_s)
    if stored is not cfg and stored.space_dict() != cfg.space_dict():
        diff = sorted(k for k in cfg.space if stored.space_dict().get(k) != cfg.space_dict().get(k))
        raise ConfigError(
            f"study {cfg.name!r} already exists with a different search space ({', '.join(diff)} differ: "
            f"stored {json.dumps({k: stored.space_dict()[k] for k in diff})}). Use a new study name, "
            "or restore the original space."
        )
    if stored is not cfg and stored.to_dict() != cfg.to_dict():
        if stored.budget.fit_epochs and config.with_horizon(cfg, stored.budget.epochs).to_dict() == stored.to_dict():
            log.info("study %r: a %d-epoch horizon, fitted to its time budget", cfg.name, stored.budget.epochs)
        else:
            log.warning(
                "study %r exists with other settings than the file; using the settings stored in the study", cfg.name
            )
    study.sampler = make_sampler(stored, sampler_seed)
    study.pruner = make_pruner(stored)
    return study, stored


def warm_start_trials(storage: optuna.storages.BaseStorage, cfg: StudyConfig) -> list[tuple[dict[str, Any], str]]:
    """The configurations a new study tries first, each with where it came from: `[warm_start]
    params` as given, then the best distinct COMPLETE trials of the study named by `from` that are
    points of this space (the others are logged and skipped)."""
    first = [(dict(p), f"[warm_start] params[{i}]") for i, p in enumerate(cfg.warm_start.params)]
    source = cfg.warm_start.from_study
    if source is None:
        return first
    try:
        other = optuna.load_study(study_name=source, storage=storage)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))
        raise ConfigError(
            f"[warm_start] from = {source!r}: no such study in this storage (it holds: "
            f"{', '.join(names) or 'none'}). Name one of them, or remove [warm_start] from."
        ) from None
    theirs = stored_config(other)
    metric = theirs.metric if theirs is not None else None
    if (metric, other.direction.name.lower()) != (cfg.metric, cfg.direction):
        raise ConfigError(
            f"[warm_start] from = {source!r}: that study {other.direction.name.lower()}s "
            f"{metric or 'an unknown metric'}, this one {cfg.direction}s {cfg.metric}; its best "
            "trials say nothing about this metric. Warm-start from a study with the same metric."
        )
    ranked = best_first(other, cfg.direction == "maximize")
    seen: set[str] = {json.dumps(p, sort_keys=True) for p, _ in first}
    taken = 0
    for trial in ranked:
        key = json.dumps(trial.params, sort_keys=True)
        if taken == cfg.warm_start.top or key in seen:
            continue
        seen.add(key)
        problems = config.space_problems(cfg.space, trial.params)
        if problems:
            log.warning(
                "warm start: trial %d of study %r is not a point of this space (%s); skipped",
                trial.number,
                source,
                "; ".join(problems),
            )
            continue
        first.append((dict(trial.params), f"study {source} trial {trial.number} ({cfg.metric} {value(trial):.4f})"))
        taken += 1
    return first


def exists(storage: optuna.storages.BaseStorage, name: str) -> bool:
    return name in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}


def load(storage: optuna.storages.BaseStorage, name: str) -> tuple[optuna.Study, StudyConfig]:
    """Open an existing study by name; its settings come from the study, no file needed."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError as e:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        hint = f" Studies in this storage: {', '.join(names)}." if names else " This storage holds no studies."
        raise StorageError(
            f"no study named {name!r} in this storage.{hint} Run `hpo optimize --study "
            f"{name}` or `hpo worker --study {name}` first, or pass the right --storage."
        ) from e
    stored = stored_config(study)
    if stored is None:
        raise StorageError(f"study {name!r} was not created by hpo (it has no {attrs.CONFIG} attribute).")
    if isinstance(storage, Storage):
        adopt_liveness(study, storage)
    # No sampler or pruner is built here: only a search needs them (create_or_load builds them), and
    # a study whose stored settings no longer build must still be shown, extended and deleted.
    return study, stored


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

    The settings come from the storage, which took them from the study (adopt_liveness).
    """

    def __init__(self, study: optuna.Study, storage: Storage):
        self.study, self.storage = study, storage  # the RDBStorage itself, not Optuna's cache over it
        self._suspects: dict[int, tuple[Any, float]] = {}  # trial id -> (last heartbeat, first seen stale)
        self._silent: dict[int, float] = {}  # trial id -> first seen RUNNING without any heartbeat
        self._orphans: dict[int, float] = {}  # trial number -> first seen FAIL without its due copy
        self._lock = threading.Lock()

    @property
    def confirm_s(self) -> float:
        return 2 * (self.storage.heartbeat_interval or StorageSettings.heartbeat_interval) + 1

    @property
    def grace_s(self) -> float:
        return self.storage.grace_period or StorageSettings.grace_period

    def __call__(self) -> list[int]:
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
                self._suspects.clear()  # what was watched across an outage proves nothing
                self._silent.clear()
                raise
            now = time.monotonic()
            outage = storage.last_error_at
            self._suspects = {
                tid: (beat, seen)
                for tid, (beat, seen) in self._suspects.items()
                if tid in beats and beats[tid][0] == beat and seen > outage
            }
            for tid, (beat, _) in beats.items():
                self._suspects.setdefault(tid, (beat, now))
            self._silent = {tid: seen for tid, seen in self._silent.items() if tid in silent and seen > outage}
            for tid in silent:
                self._silent.setdefault(tid, now)
            dead = [tid for tid, (_, seen) in self._suspects.items() if now - seen >= self.confirm_s]
            never = [tid for tid, seen in self._silent.items() if now - seen >= self.grace_s + self.confirm_s]
            failed = []
            for tid in dead + never:
                trial = storage.get_trial(tid)
                host, pid = trial.user_attrs.get(attrs.HOST, "?"), trial.user_attrs.get(attrs.PID, "?")
                who = f"its worker (host {host}, pid {pid})"
                if tid in self._suspects:
                    del self._suspects[tid]
                    age = beats[tid][1]
                    why = f"stale heartbeat: {who} sent none for {age:.0f}s, over the {self.grace_s}s grace period"
                else:
                    del self._silent[tid]
                    why = (
                        f"no heartbeat ever: {who} died before its first one; watched for "
                        f"{self.grace_s + self.confirm_s:.0f}s"
                    )
                reason = f"{why}; {retry_note(trial, storage.max_retry)}"
                if fail(self.study, tid, reason, retry=True):
                    log.warning("trial %d failed: %s", trial.number, reason)
                    failed.append(tid)
            return failed

    def repair(self, lock: SlotLock | None = None) -> list[int]:
        """Queue the copies that FAIL trials marked for a retry never got, once this process has seen
        them missing for `confirm_s` (the failing process writes its copy milliseconds after the FAIL).
        With `lock` (the study's SlotLock), only while it can be had at once, so that two reapers do
        not both queue one; returns the numbers of the trials whose copy it queued."""
        with self._lock:
            now = time.monotonic()
            orphans = {t.number: t for t in lost_requeues(self.study)}
            outage = self.storage.last_error_at
            self._orphans = {n: seen for n, seen in self._orphans.items() if n in orphans and seen > outage}
            for number in orphans:
                self._orphans.setdefault(number, now)
            due = [n for n, seen in self._orphans.items() if now - seen >= self.confirm_s]
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
                    del self._orphans[number]
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


def _by_state(trials: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
    by_state = {s.name: 0 for s in TrialState}
    for trial in trials:
        by_state[trial.state.name] += 1
    return by_state


def counts(study: optuna.Study) -> dict[str, int]:
    return _by_state(study.get_trials(deepcopy=False))


def finished_count(study: optuna.Study) -> int:
    """COMPLETE and PRUNED trials: what the trial budget counts."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


STATUS_SCHEMA = "hpo-status/1"


def _last_epoch(trial: optuna.trial.FrozenTrial) -> int:
    return max(trial.intermediate_values) if trial.intermediate_values else 0


def summary(study: optuna.Study, cfg: StudyConfig, storage: optuna.storages.RDBStorage) -> dict[str, Any]:
    """Everything `hpo status` shows, as plain JSON-able values (schema STATUS_SCHEMA, see the README)."""
    trials = study.get_trials(deepcopy=False)
    by_state = _by_state(trials)
    finished_trials = [trial for trial in trials if trial.state in FINISHED]
    finished = len(finished_trials)
    best: dict[str, Any] | None = None
    if by_state["COMPLETE"]:
        trial = study.best_trial
        best = {"number": trial.number, "value": trial.value, "params": trial.params}
    running = [trial for trial in trials if trial.state == TrialState.RUNNING]
    ages = heartbeat_ages(storage, [trial_id(trial) for trial in running]) if running else {}
    # Epochs: what finished trials trained, and what pruning spared them (budget epochs minus the last report).
    trained = sum(_last_epoch(trial) for trial in finished_trials)
    saved = sum(cfg.budget.epochs - _last_epoch(trial) for trial in finished_trials if trial.state == TrialState.PRUNED)
    durations = [
        (trial.datetime_complete - trial.datetime_start).total_seconds()
        for trial in finished_trials
        if trial.datetime_start and trial.datetime_complete
    ]
    mean_s = sum(durations) / len(durations) if durations else None
    remaining = max(0, cfg.budget.n_trials - finished)
    # Work left, in mean finished-trial durations (running trials count by their epochs still to go),
    # spread over the workers now running. Pruned trials are in the mean, as they will be in what is left.
    left = max(0, remaining - len(running)) + sum(
        max(0.0, 1 - trial.user_attrs.get(attrs.EPOCH, 0) / cfg.budget.epochs) for trial in running
    )
    eta = None if mean_s is None or (remaining and not running) else left * mean_s / max(1, len(running))
    return {
        "schema": STATUS_SCHEMA,
        "study": study.study_name,
        "metric": cfg.metric,
        "direction": cfg.direction,
        "n_trials": cfg.budget.n_trials,
        "epochs_per_trial": cfg.budget.epochs,
        "finished": finished,
        "started": sum(trial.state != TrialState.WAITING for trial in trials),
        "remaining": remaining,
        "states": by_state,
        "pruned_share": by_state["PRUNED"] / finished if finished else 0.0,
        "epochs": {
            "trained": trained,
            "saved_by_pruning": saved,
            "saved_share": saved / (trained + saved) if trained + saved else 0.0,
        },
        "mean_trial_s": None if mean_s is None else round(mean_s, 1),
        "eta_s": None if eta is None else round(eta, 1),
        "best": best,
        "running": [_running_row(trial, cfg, ages.get(trial_id(trial))) for trial in running],
        "final": study.user_attrs.get(attrs.FINAL),
        "time_budget": budget.describe_deadline(budget.get_deadline(study)),
        "extended": study.user_attrs.get(attrs.EXTENDED, []),
    }


def _running_row(trial: optuna.trial.FrozenTrial, cfg: StudyConfig, heartbeat_age_s: float | None) -> dict[str, Any]:
    """One running trial as `hpo status` lists it: where it runs, how far it is, how fresh its heartbeat."""
    return {
        "number": trial.number,
        "host": trial.user_attrs.get(attrs.HOST),
        "pid": trial.user_attrs.get(attrs.PID),
        "device": trial.user_attrs.get(attrs.DEVICE_NAME),
        "epoch": trial.user_attrs.get(attrs.EPOCH, 0),
        "epochs": cfg.budget.epochs,
        "heartbeat_age_s": heartbeat_age_s,
    }


STUDIES_SCHEMA = "hpo-studies/1"
BEST_SCHEMA = "hpo-best/1"


def listing(storage: Storage) -> dict[str, Any]:
    """Every study in the storage, as `hpo studies` shows it (schema STUDIES_SCHEMA)."""
    rows = []
    for summary in sorted(
        optuna.get_all_study_summaries(storage, include_best_trial=False), key=lambda summary: summary.study_name
    ):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        stored = stored_config(study)
        trials = study.get_trials(deepcopy=False)
        by_state = _by_state(trials)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = study.best_trial if complete else None
        final = study.user_attrs.get(attrs.FINAL) or {}
        running = [trial_id(t) for t in trials if t.state == TrialState.RUNNING]
        fresh = (
            [age for age in heartbeat_ages(storage, running).values() if age <= storage.grace_period]
            if running and storage.grace_period
            else []
        )
        rows.append(
            {
                "study": summary.study_name,
                "metric": stored.metric if stored else None,
                "direction": study.direction.name.lower(),
                "finished": by_state["COMPLETE"] + by_state["PRUNED"],
                "n_trials": stored.budget.n_trials if stored else None,
                "best_value": None if best is None else best.value,
                "best_trial": None if best is None else best.number,
                "test_accuracy": final.get("test_accuracy"),
                "running": len(fresh),  # trials with a live heartbeat: workers at work now
            }
        )
    return {"schema": STUDIES_SCHEMA, "studies": rows}


def best_of(study: optuna.Study, cfg: StudyConfig) -> dict[str, Any]:
    """The best trial, as `hpo best` shows it (schema BEST_SCHEMA)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise StorageError(
            f"study {study.study_name!r} has no COMPLETE trial yet. Run `hpo optimize --study "
            f"{study.study_name}` (or workers) until one completes."
        )
    trial = study.best_trial
    return {
        "schema": BEST_SCHEMA,
        "study": study.study_name,
        "metric": cfg.metric,
        "direction": cfg.direction,
        "number": trial.number,
        "value": trial.value,
        "params": trial.params,
        "epochs": len(trial.intermediate_values),
        "seed": trial.user_attrs.get(attrs.SEED),
        "duration_s": None if trial.duration is None else round(trial.duration.total_seconds(), 1),
    }


def extend(study: optuna.Study, cfg: StudyConfig, n_trials: int | None, time_s: float | None) -> StudyConfig:
    """Raise the stored trial budget and/or give the study a new time budget from now. Workers read the
    budget before every trial, so running ones go on to it, and restarted ones start with it."""
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in FINISHED for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    # Running trials will finish and count: a budget below finished + running would end over budget.
    least = max(finished + 1, finished + running)
    if n_trials is not None and n_trials < least:
        now = f"{finished} finished trials" + (f" and {running} running" if running else "")
        raise ConfigError(
            f"study {study.study_name!r} has {now} already; extend it to at least {least} "
            f"(--trials {least + 10}, say), or leave --trials out."
        )
    new = cfg
    if n_trials is not None:
        new = dataclasses.replace(cfg, budget=dataclasses.replace(cfg.budget, n_trials=n_trials))
    if time_s is not None:
        new = dataclasses.replace(new, budget=dataclasses.replace(new.budget, time_s=time_s))
    _record_config(study, new)
    if time_s is not None:
        budget.set_deadline(study, time_s)
    record = {"at": round(time.time(), 1), "n_trials": [cfg.budget.n_trials, new.budget.n_trials], "time_s": time_s}
    study.set_user_attr(attrs.EXTENDED, [*study.user_attrs.get(attrs.EXTENDED, []), record])
    return new


def current_budget(study: optuna.Study) -> int:
    """The stored trial budget now (`hpo extend` may have raised it since the worker started)."""
    stored = _stored_raw(study)
    if stored is None:
        raise StorageError(f"study {study.study_name!r} has no stored settings ({attrs.CONFIG}).")
    return int(stored["budget"]["n_trials"])


def live_trials(study: optuna.Study, storage: Storage) -> list[int]:
    """Numbers of RUNNING trials whose worker sent a heartbeat within the grace period."""
    running = {trial_id(t): t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    ages = heartbeat_ages(storage, list(running)) if running else {}
    grace = storage.grace_period or 60
    return sorted(running[tid] for tid, age in ages.items() if age <= grace)


def delete(study: optuna.Study, storage: Storage, artifact_store) -> int:
    """Delete the study's artifacts (its own and every trial's), then the study; returns how many files."""
    removed = 0
    holders = [storage.get_study_system_attrs(study_id(study))]
    holders += [t.system_attrs for t in study.get_trials(deepcopy=False)]
    for attrs_of in holders:
        for meta in artifacts_mod.listed(attrs_of):
            try:
                artifact_store.remove(meta["artifact_id"])
                removed += 1
            except ArtifactNotFound:
                pass
    optuna.delete_study(study_name=study.study_name, storage=storage)
    return removed
