"""Create a study once, load it everywhere; its settings live in the study itself."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import optuna
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import TrialState

from hpo import attrs
from hpo.errors import ConfigError, HpoError, StorageError
from hpo.search import artifacts, budget
from hpo.search.locks import creation_lock
from hpo.search.optuna_compat import heartbeat_ages, study_id, study_storage, trial_id
from hpo.search.reaper import adopt_liveness
from hpo.search.storage import Storage
from hpo.search.trials import FINISHED, best_first, value
from hpo.settings import config
from hpo.settings.components import PRUNERS, SAMPLERS
from hpo.settings.config import StudyConfig
from hpo.settings.dimensions import space_problems

log = logging.getLogger(__name__)


def make_sampler(cfg: StudyConfig, seed: int | None) -> optuna.samplers.BaseSampler:
    cls = getattr(optuna.samplers, SAMPLERS[cfg.sampler.name])
    return _built(cfg, "sampler", lambda: cls(seed=seed, **cfg.sampler.options))


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    cls = getattr(optuna.pruners, PRUNERS[cfg.pruner.name])
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
    """The settings recorded in the study: a system attribute, which the dashboard does not lead with."""
    return study_storage(study).get_study_system_attrs(study_id(study)).get(attrs.CONFIG)


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
        problems = space_problems(cfg.space, trial.params)
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


def refuse_while_live(study: optuna.Study, storage: Storage) -> None:
    """Deleting a study under running workers would fail their trials: refuse while any trial has a
    live heartbeat (`hpo delete --force` skips this)."""
    live = live_trials(study, storage)
    if live:
        raise HpoError(
            f"study {study.study_name!r} has workers running trials {live} now. Stop them first, or pass --force."
        )


def delete(study: optuna.Study, storage: Storage, artifact_store) -> int:
    """Delete the study's artifacts (its own and every trial's), then the study; returns how many files."""
    removed = 0
    holders = [storage.get_study_system_attrs(study_id(study))]
    holders += [t.system_attrs for t in study.get_trials(deepcopy=False)]
    for attrs_of in holders:
        for meta in artifacts.listed(attrs_of):
            try:
                artifact_store.remove(meta["artifact_id"])
                removed += 1
            except ArtifactNotFound:
                pass
    optuna.delete_study(study_name=study.study_name, storage=storage)
    return removed
