"""A lost database: which errors are a lost connection, the one backoff schedule every loop that waits
for the database follows, and the one line a worker says when an outage outlasts what it rides out."""

from __future__ import annotations

import random
import time

import sqlalchemy

from hpo.errors import StorageError


def connection_error(e: BaseException) -> BaseException | None:
    """The lost-connection error behind `e`, if that is what `e` is: the server is down, restarting
    or unreachable. Integrity errors and bugs are not; retrying them would only repeat them.

    When the database drops while a trial is being told, Optuna's `_run_trial` fails again while
    recovering, with the storage error as the context; so the whole chain is searched.
    """
    seen = 0
    current: BaseException | None = e
    while current is not None and seen < 8:
        if isinstance(
            current,
            (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.PendingRollbackError),
        ) or (isinstance(current, sqlalchemy.exc.DBAPIError) and current.connection_invalidated):
            return current
        current = current.__cause__ or current.__context__
        seen += 1
    return None


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class Backoff:
    """The one schedule every loop that waits for the database follows: waits that double from
    `first` up to `cap` seconds (with `jitter`, each varied by +-25 % so that workers restarted
    together do not come back in step), until `limit_s` seconds have passed since the first."""

    def __init__(self, limit_s: float, first: float = 0.5, cap: float = 8.0, jitter: bool = False, clip: bool = False):
        self.limit_s, self.cap, self.jitter, self.clip = limit_s, cap, jitter, clip
        self.started = time.monotonic()
        self.delay = first

    def next_wait(self) -> float | None:
        """How long to wait before the next try; None once the limit is passed (`clip`: no wait
        runs past it)."""
        remaining = self.limit_s - (time.monotonic() - self.started)
        if remaining < 0 or (self.clip and remaining == 0):
            return None
        wait = min(self.delay, remaining) if self.clip else self.delay
        self.delay = min(self.delay * 2, self.cap) * ((0.75 + random.random() / 2) if self.jitter else 1.0)
        return wait


def lost_database(limit_s: float, cause: BaseException) -> StorageError:
    """What a worker says when an outage outlasts what it rides out."""
    return StorageError(
        f"lost the database for more than {limit_s:.0f}s ({first_line(cause)}). "
        "Check that it is up; the study's trials are safe in it."
    )
