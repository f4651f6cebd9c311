"""Storage URLs: one RDBStorage code path for the embedded SQLite file and for PostgreSQL.

SQLite is only safe for several local worker processes with three settings: WAL, a long busy
timeout, and BEGIN IMMEDIATE so that a transaction takes the write lock up front instead of failing
when it tries to upgrade a read lock. Every transaction takes that lock, the dashboard's reads
included, so they take turns: fine on one machine, and PostgreSQL is the storage for many.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url

from hpo import paths
from hpo.errors import StorageError
from hpo.search.interrupts import uninterrupted
from hpo.search.locks import app_name, creation_lock
from hpo.search.optuna_compat import CACHE_BACKEND_CALLS
from hpo.search.outages import Backoff, connection_error, first_line, lost_database
from hpo.settings.envvars import env_float, env_int

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 120  # a writer waits this long for the lock; local writes take milliseconds


def default_url() -> str:
    return f"sqlite:///{paths.default_database()}"


def resolve_url(explicit: str | None) -> str:
    """--storage, then HPO_STORAGE, then the embedded default file."""
    return explicit or os.environ.get("HPO_STORAGE") or default_url()


def mask(url: str) -> str:
    """The URL with its password replaced by ***, safe to log."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return "<malformed storage URL>"


@dataclass(frozen=True)
class StorageSettings:
    heartbeat_interval: int = 10  # seconds between a running trial's heartbeats
    grace_period: int = 30  # seconds without a heartbeat before a trial counts as dead
    max_retry: int = 2  # re-runs of a trial whose worker died
    wait_s: float = 60.0  # how long to wait for a database that is not up yet
    pool_size: int = 2  # connections per process: the main thread and the heartbeat

    @classmethod
    def from_env(cls) -> StorageSettings:
        """The settings from HPO_HEARTBEAT_INTERVAL, HPO_GRACE_PERIOD, HPO_MAX_RETRY and HPO_DB_WAIT.
        A study keeps the first three from the process that created it (hpo.search.reaper.adopt_liveness)."""
        defaults = cls()
        return cls(
            heartbeat_interval=env_int("HPO_HEARTBEAT_INTERVAL", defaults.heartbeat_interval, least=1, unit="seconds"),
            grace_period=env_int("HPO_GRACE_PERIOD", defaults.grace_period, least=1, unit="seconds"),
            max_retry=env_int("HPO_MAX_RETRY", defaults.max_retry, least=0),
            wait_s=env_float("HPO_DB_WAIT", defaults.wait_s, least=0.0, unit="seconds"),
        )


def _sqlite_on_connect(dbapi_connection: sqlite3.Connection, _record) -> None:
    # Let SQLAlchemy's "begin" hook below issue BEGIN itself instead of pysqlite's deferred BEGIN.
    dbapi_connection.isolation_level = None
    dbapi_connection.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")
    dbapi_connection.execute("PRAGMA journal_mode = WAL")
    dbapi_connection.execute("PRAGMA synchronous = NORMAL")


def _sqlite_on_begin(connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _make_sqlite_concurrent(engine: Engine) -> None:
    """Add the hooks to this engine only, after RDBStorage's set-up.

    Optuna's schema checks read on one connection while another is open, which would deadlock on
    BEGIN IMMEDIATE, so set-up runs with pysqlite's defaults and everything after it with the hooks.
    """
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    engine.dispose()  # pooled connections from the set-up predate the hooks


def database_time(engine: Engine) -> float:
    """Unix seconds by the database server's clock, the one clock every host of a study shares
    (heartbeats are stamped with it). SQLite's is this host's own."""
    if engine.dialect.name == "sqlite":
        query = "SELECT (julianday('now') - 2440587.5) * 86400.0"
    else:
        query = "SELECT EXTRACT(EPOCH FROM clock_timestamp())"
    with uninterrupted(), engine.connect() as conn:
        return float(conn.exec_driver_sql(query).scalar_one())


# Storage calls that read, or write a value that a repeat writes again unchanged: a worker may repeat
# them after a lost connection. Creating a trial or finishing one is not among them.
REPEATABLE = (
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_study_directions",
    "get_study_id_from_name",
    "get_trial",
    "get_all_trials",
    "get_n_trials",
    "get_best_trial",
    "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id",
    "get_trial_param",
    "get_trial_params",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "set_trial_param",
    "set_trial_intermediate_value",
    "set_study_user_attr",
)


_fail_fast = threading.local()  # per thread: Storage.failing_fast
_riding = threading.local()  # per thread: a call that rides out an outage is under way


class Storage(optuna.storages.RDBStorage):
    """RDBStorage that rides out a database outage instead of failing the trial in progress.

    - A failed heartbeat is logged and the next one tries again. (Optuna's heartbeat thread ends at
      the first failed write, after which a healthy trial would be reaped once the grace period passed.)
    - With `ride_out_s` set (workers set it), a REPEATABLE call that loses its connection waits for
      the database and tries again, for up to `ride_out_s` seconds in all; training goes on meanwhile,
      and the trial carries on where it was once the database is back.
    - `last_error_at` is when this process last saw the database fail (time.monotonic()), so that
      a reaper does not take the silence that an outage imposed on everyone for a dead worker.
    - Inside `failing_fast()`, REPEATABLE calls from that thread raise at once instead: the heartbeat
      thread reaps between beats, and a ride-out there (its waits grow to 8 s) would hold back the
      trial's own next beat past the moment other workers' reapers confirm it dead.
    """

    ride_out_s: float = 0.0
    last_error_at: float = -1e9
    max_retry: int = StorageSettings.max_retry  # re-runs of a dead worker's trial (open_storage sets it)

    _beats_failing_since: float | None = None

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            self.last_error_at = time.monotonic()
            if self._beats_failing_since is None:  # one line per outage, not one per beat
                self._beats_failing_since = self.last_error_at
                log.warning(
                    "heartbeat for trial id %d failed (%s); retrying every interval",
                    trial_id,
                    first_line(connection_error(e) or e),
                )
            return
        if self._beats_failing_since is not None:
            log.warning(
                "heartbeat for trial id %d sent again after %.0fs",
                trial_id,
                time.monotonic() - self._beats_failing_since,
            )
            self._beats_failing_since = None

    @property
    def beating(self) -> bool:
        """False while heartbeats fail."""
        return self._beats_failing_since is None

    @contextlib.contextmanager
    def failing_fast(self) -> Iterator[None]:
        """REPEATABLE calls made in this block, by this thread only, do not ride out an outage."""
        before = getattr(_fail_fast, "on", False)
        _fail_fast.on = True
        try:
            yield
        finally:
            _fail_fast.on = before

    def _ride_out(self, name: str, *args, **kwargs):
        call = getattr(super(), name)
        if getattr(_riding, "on", False):  # inside another call's ride-out (get_all_trials -> _get_trials)
            return call(*args, **kwargs)
        backoff = Backoff(self.ride_out_s)
        while True:
            try:
                with uninterrupted():  # a signal waits for this try, not for the waits between tries
                    _riding.on = True
                    try:
                        return call(*args, **kwargs)
                    finally:
                        _riding.on = False
            except Exception as e:
                cause = connection_error(e)
                if cause is None or self.ride_out_s <= 0 or getattr(_fail_fast, "on", False):
                    raise
                self.last_error_at = time.monotonic()
                wait = backoff.next_wait()
                if wait is None:
                    raise lost_database(self.ride_out_s, cause) from e
                log.warning("database unreachable during %s (%s); trying again in %.0fs", name, first_line(cause), wait)
                time.sleep(wait)


def _repeatable(name: str):
    def method(self: Storage, *args, **kwargs):
        return self._ride_out(name, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"{name}, repeated across a lost connection (see Storage)."
    return method


def _uninterrupted(name: str):
    def method(self: Storage, *args, **kwargs):
        with uninterrupted():
            return getattr(super(Storage, self), name)(*args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"{name}, which a signal lets end before it stops the worker (see hpo.search.interrupts)."
    return method


for _name in REPEATABLE:
    setattr(Storage, _name, _repeatable(_name))
# Every other public method of RDBStorage (record_heartbeat's thread takes no signals; those that
# never reach the database pass through the same way); and the private ones Optuna's cache calls
# instead of public ones, handled as the calls they stand for (a read through the cache rides out too).
for _name, _value in vars(optuna.storages.RDBStorage).items():
    if not _name.startswith("_") and callable(_value) and _name not in vars(Storage):
        setattr(Storage, _name, _uninterrupted(_name))
for _name, _public in CACHE_BACKEND_CALLS.items():
    setattr(Storage, _name, (_repeatable if _public in REPEATABLE else _uninterrupted)(_name))


def _new_rdb_storage(url: str, **kwargs) -> Storage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return Storage(url, **kwargs)


def _engine_kwargs(url: sqlalchemy.URL, settings: StorageSettings) -> dict:
    if url.get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    return {
        "pool_pre_ping": True,  # a connection the server dropped (restart, idle kill) is replaced, not used
        "pool_size": settings.pool_size,
        "max_overflow": 1,
        "pool_recycle": 300,  # seconds; stays under typical proxy idle timeouts
        "connect_args": {"connect_timeout": 5, "application_name": app_name("worker")},
    }


def _is_auth_error(e: Exception) -> bool:
    text = str(e).lower()
    return (
        "password authentication failed" in text
        or "no password supplied" in text
        or ("role" in text and "does not exist" in text)
    )


def _checked_url(url: str) -> tuple[URL, str, str]:
    """The parsed URL, the URL to connect with and its backend (sqlite or postgresql), or a StorageError
    that says what to write instead."""
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError as e:
        raise StorageError(
            f"malformed storage URL {url!r}. Use sqlite:///path/to/file.db or "
            "postgresql+psycopg2://user:password@host:5432/dbname."
        ) from e
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise StorageError(
            f"unsupported storage scheme {parsed.drivername!r} in {mask(url)}. Use sqlite:/// "
            "for one machine or postgresql+psycopg2:// for a shared database."
        )
    if backend == "postgresql" and parsed.drivername not in ("postgresql", "postgresql+psycopg2"):
        raise StorageError(f"unsupported PostgreSQL driver {parsed.drivername!r}; use postgresql+psycopg2://.")
    if parsed.drivername == "postgresql":
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which hpo does not ship.
        parsed = parsed.set(drivername="postgresql+psycopg2")
        url = parsed.render_as_string(hide_password=False)
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    return parsed, url, backend


def open_storage(url: str, settings: StorageSettings | None = None) -> Storage:
    """An RDBStorage with heartbeats and retry of dead workers' trials; waits for a starting database."""
    settings = settings or StorageSettings.from_env()
    parsed, url, backend = _checked_url(url)
    backoff = Backoff(settings.wait_s, jitter=True, clip=True)
    while True:
        try:
            with creation_lock(url):
                storage = _new_rdb_storage(
                    url,
                    engine_kwargs=_engine_kwargs(parsed, settings),
                    heartbeat_interval=settings.heartbeat_interval,
                    grace_period=settings.grace_period,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=settings.max_retry
                    ),
                )
            if backend == "sqlite":
                _make_sqlite_concurrent(storage.engine)
            storage.max_retry = settings.max_retry
            return storage
        except sqlalchemy.exc.OperationalError as e:
            reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
            if _is_auth_error(e):
                raise StorageError(
                    f"the database refused the credentials in {mask(url)} ({reason}). "
                    "Check the user and password (HPO_STORAGE or --storage)."
                ) from e
            wait = None if backend == "sqlite" else backoff.next_wait()
            if wait is None:
                raise StorageError(
                    f"cannot reach the database at {mask(url)} after waiting "
                    f"{settings.wait_s:.0f}s ({reason}). Start it, or raise HPO_DB_WAIT."
                ) from e
            log.warning(
                "database at %s not ready (%s); retrying in %.1fs (giving up after %.0fs)",
                mask(url),
                reason,
                wait,
                settings.wait_s,
            )
            time.sleep(wait)
