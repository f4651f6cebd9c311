"""What `hpo status`, `hpo studies` and `hpo best` show: read models of a study, as plain JSON-able
values with a versioned schema each (the README's "Output formats")."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from hpo import attrs
from hpo.errors import StorageError
from hpo.search import budget
from hpo.search.optuna_compat import heartbeat_ages, trial_id
from hpo.search.storage import Storage
from hpo.search.study import stored_config
from hpo.search.trials import FINISHED, count_by_state
from hpo.settings.config import StudyConfig

STATUS_SCHEMA = "hpo-status/1"


def _last_epoch(trial: optuna.trial.FrozenTrial) -> int:
    return max(trial.intermediate_values) if trial.intermediate_values else 0


def study_status(study: optuna.Study, cfg: StudyConfig, storage: optuna.storages.RDBStorage) -> dict[str, Any]:
    """Everything `hpo status` shows, as plain JSON-able values (schema STATUS_SCHEMA, see the README)."""
    trials = study.get_trials(deepcopy=False)
    by_state = count_by_state(trials)
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
    mean_s, eta = _eta(cfg, finished_trials, running)
    remaining = max(0, cfg.budget.n_trials - finished)
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


def _eta(
    cfg: StudyConfig, finished_trials: list[optuna.trial.FrozenTrial], running: list[optuna.trial.FrozenTrial]
) -> tuple[float | None, float | None]:
    """The mean finished trial's seconds, and the seconds left: work left in mean finished-trial
    durations (running trials count by their epochs still to go), spread over the workers now
    running. Pruned trials are in the mean, as they will be in what is left."""
    durations = [
        (trial.datetime_complete - trial.datetime_start).total_seconds()
        for trial in finished_trials
        if trial.datetime_start and trial.datetime_complete
    ]
    mean_s = sum(durations) / len(durations) if durations else None
    remaining = max(0, cfg.budget.n_trials - len(finished_trials))
    left = max(0, remaining - len(running)) + sum(
        max(0.0, 1 - trial.user_attrs.get(attrs.EPOCH, 0) / cfg.budget.epochs) for trial in running
    )
    eta = None if mean_s is None or (remaining and not running) else left * mean_s / max(1, len(running))
    return mean_s, eta


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
        by_state = count_by_state(trials)
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


def time_is_up(status: dict[str, Any]) -> bool:
    """A study_status whose time budget is spent: no new trial starts."""
    clock = status.get("time_budget")
    return clock is not None and clock["left_s"] == 0


def search_over(status: dict[str, Any]) -> bool:
    """A study_status whose search is over: its trial budget is met or its time is up."""
    return status["remaining"] == 0 or time_is_up(status)
