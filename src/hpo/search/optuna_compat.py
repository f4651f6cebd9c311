"""Optuna's private details that hpo relies on, in one place.

Everything else in hpo uses Optuna's public API. Each entry here says why it is needed and what
would let it go; tests/test_optuna_compat.py fails first when an Optuna release moves one of them.
"""

from __future__ import annotations

from typing import Any

import optuna
import sqlalchemy

# Optuna exports the artifact-store protocol only from a private module; every store we pass
# (FileSystemArtifactStore, Boto3ArtifactStore) implements it. Goes when `optuna.artifacts` exports it.
from optuna.artifacts._protocol import ArtifactStore

from hpo.search.interrupts import uninterrupted

__all__ = [
    "CACHE_BACKEND_CALLS",
    "ArtifactStore",
    "heartbeat_ages",
    "last_heartbeats",
    "running_without_heartbeat",
    "stale_trial_ids",
    "study_engine",
    "study_id",
    "study_storage",
    "trial_id",
]


# The private RDBStorage methods that Optuna's cache in front of it (`_CachedStorage`, which every
# Study uses) calls instead of public ones, each with the public call it stands for: storage.Storage
# gives them that call's handling (a read rides out an outage; a signal waits for the call to end).
# Goes when the cache calls the public methods only.
CACHE_BACKEND_CALLS = {
    "_get_trials": "get_all_trials",
    "_get_best_trial_id": "get_best_trial",
    "_set_trial_param": "set_trial_param",
    "_create_new_trial": "create_new_trial",
}


def study_id(study: optuna.Study) -> int:
    """The study's storage id. Optuna's public API names studies, and every storage call takes the id;
    goes when storages take names or Study exposes the id (optuna/optuna#6365 asks the same for trials)."""
    return study._study_id


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a loaded study writes through (Optuna's cache in front of our RDBStorage): study
    system attributes have no public setter, and our settings and artifact entries live there."""
    return study._storage


def study_engine(study: optuna.Study) -> sqlalchemy.Engine | None:
    """The SQLAlchemy engine under a loaded study's storage (None for other storages): the time
    budget reads the database's clock through it. Optuna wraps an RDBStorage in a private cache."""
    storage = getattr(study._storage, "_backend", study._storage)
    return getattr(storage, "engine", None)


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """A trial's storage id. Optuna made it private in favour of `number` (optuna/optuna#285), but
    storage calls (a trial's system attributes, its fresh state) take the id; goes with optuna/optuna#6365."""
    return trial._trial_id


@uninterrupted()
def stale_trial_ids(storage: optuna.storages.RDBStorage, study: optuna.Study) -> list[int]:
    """RUNNING trials whose heartbeat is older than the grace period, by the database's clock.
    Optuna's public path (`fail_stale_trials`) fails them at once; our reaper first confirms that the
    heartbeat stays unchanged (hpo.search.reaper.Reaper), so it needs the query alone."""
    return storage._get_stale_trial_ids(study_id(study))


@uninterrupted()
def last_heartbeats(storage: optuna.storages.RDBStorage, trial_ids: list[int]) -> dict[int, tuple[Any, float]]:
    """Each trial's last heartbeat and its age in seconds by the database's clock; a trial with no
    heartbeat yet is absent. Optuna keeps no API for heartbeat times, so this reads its
    `trial_heartbeats` table (schema unchanged since heartbeats came in Optuna 2.5)."""
    if not trial_ids:
        return {}
    beats = sqlalchemy.table(
        "trial_heartbeats",
        sqlalchemy.column("trial_id", sqlalchemy.Integer),
        sqlalchemy.column("heartbeat", sqlalchemy.DateTime),
    )
    with storage.engine.connect() as conn:
        now = conn.execute(sqlalchemy.select(sqlalchemy.func.current_timestamp(type_=sqlalchemy.DateTime))).scalar()
        rows = conn.execute(
            sqlalchemy.select(beats.c.trial_id, beats.c.heartbeat).where(beats.c.trial_id.in_(trial_ids))
        ).all()
    # PostgreSQL's now() is zone-aware; the column holds the same wall-clock time without the zone.
    assert now is not None
    now = now.replace(tzinfo=None)
    return {tid: (beat, max(0.0, (now - beat).total_seconds())) for tid, beat in rows}


@uninterrupted()
def running_without_heartbeat(storage: optuna.storages.RDBStorage, study: optuna.Study) -> list[int]:
    """RUNNING trials of the study that have no heartbeat row at all. Optuna's stale query skips
    them, so a worker that died between `ask()` and its first heartbeat would leave its trial
    RUNNING for ever; this reads Optuna's `trials` and `trial_heartbeats` tables for them."""
    trials = sqlalchemy.table(
        "trials",
        sqlalchemy.column("trial_id", sqlalchemy.Integer),
        sqlalchemy.column("study_id", sqlalchemy.Integer),
        sqlalchemy.column("state", sqlalchemy.String),
    )
    beats = sqlalchemy.table("trial_heartbeats", sqlalchemy.column("trial_id", sqlalchemy.Integer))
    query = sqlalchemy.select(trials.c.trial_id).where(
        trials.c.study_id == study_id(study),
        trials.c.state == "RUNNING",
        ~sqlalchemy.exists().where(beats.c.trial_id == trials.c.trial_id),
    )
    with storage.engine.connect() as conn:
        return [row[0] for row in conn.execute(query)]


def heartbeat_ages(storage: optuna.storages.RDBStorage, trial_ids: list[int]) -> dict[int, float]:
    """Seconds since each trial's last heartbeat, by the database's clock."""
    return {tid: age for tid, (_, age) in last_heartbeats(storage, trial_ids).items()}
