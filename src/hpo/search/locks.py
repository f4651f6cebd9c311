"""Named locks shared by every process of one database: a PostgreSQL advisory lock, or an flock on a file
beside the SQLite file. Tables and a study are created once; a worker counts the free slots and creates
its trial as one step; one finalizer publishes at a time."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import optuna
import sqlalchemy
from sqlalchemy.engine import Engine, make_url

from hpo.search.interrupts import uninterrupted

# Any fixed 64-bit key: it names the lock that serialises table and study creation in PostgreSQL.
_CREATE_LOCK_KEY = 0x68706F5F63726561  # "hpo_crea"


class DatabaseLock:
    """A named lock shared by every process of one database, and the only kind hpo takes:
    - `creation_lock`: tables and a study are created once, however many workers start together;
    - a study's name: a worker counts the free slots of the budget and creates its trial as one step;
    - a study's name + ".final": one finalizer publishes at a time.

    PostgreSQL: a session advisory lock on a pooled connection (the server drops it if the holder
    dies). SQLite: an flock on a file beside the database (the kernel drops it likewise).
    """

    def __init__(self, engine: Engine, name: str, key: int | None = None):
        self.engine = engine
        digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
        self.key = key if key is not None else int.from_bytes(digest, "big", signed=True)
        self._conn: sqlalchemy.Connection | None = None
        self._file: IO[str] | None = None
        database = engine.url.database
        self.path = Path(f"{database}.{name}.lock") if engine.dialect.name == "sqlite" else None

    def acquire(self) -> None:
        if self.path is not None:
            self._file = open(self.path, "a")
            fcntl.flock(self._file, fcntl.LOCK_EX)  # a signal while it waits stops the worker at once
            return
        # Raised inside, a signal could keep the connection in its transaction while the exception lives.
        with uninterrupted():
            self._conn = self.engine.connect()
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
            self._conn.commit()

    @uninterrupted()
    def try_acquire(self) -> bool:
        """Take the lock only if it is free now; True if taken (then `release` it)."""
        if self.path is not None:
            self._file = open(self.path, "a")
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._file.close()
                self._file = None
                return False
            return True
        conn = self.engine.connect()
        taken = bool(conn.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar())
        conn.commit()
        if not taken:
            conn.close()
            return False
        self._conn = conn
        return True

    def __enter__(self) -> DatabaseLock:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()

    @uninterrupted()
    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                conn.commit()
            except sqlalchemy.exc.SQLAlchemyError:
                conn.invalidate()  # a dead connection took its lock with it
            finally:
                conn.close()


@contextlib.contextmanager
def creation_lock(url: str) -> Iterator[None]:
    """Hold a database-wide lock, so that N workers starting together create tables and the study
    exactly once (Optuna creates the tables before the BEGIN IMMEDIATE hooks are in place, so SQLite
    alone would race on them). No storage is open yet, so the lock gets an engine of its own."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and (not parsed.database or parsed.database == ":memory:"):
        yield  # one process's private database: nobody to wait for
        return
    postgres = parsed.get_backend_name() != "sqlite"
    connect_args = {"connect_timeout": 5, "application_name": app_name("create")} if postgres else {}
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=connect_args)
    try:
        with DatabaseLock(engine, "create", key=_CREATE_LOCK_KEY):
            yield
    finally:
        engine.dispose()


def slot_lock(storage: optuna.storages.RDBStorage, study_name: str) -> DatabaseLock:
    """The lock a worker holds while it counts a study's free slots and creates its trial."""
    return DatabaseLock(storage.engine, study_name)


def app_name(role: str) -> str:
    """Shown in pg_stat_activity, so an operator can tell whose connections are whose."""
    return f"hpo-{role}-{socket.gethostname()}-{os.getpid()}"[:63]
