"""SIGTERM and SIGINT in a worker: the Shutdown they raise, and the database calls it waits for.

A signal raises Shutdown in the main thread wherever it is, so that a long epoch stops at once. Inside
a database call (`uninterrupted`) it waits for the call to end instead. Raised there, it could leave
the call's connection checked out inside its transaction for as long as the exception lives (the
traceback holds it), and under SQLite every transaction holds the write lock (BEGIN IMMEDIATE): the
worker's own fail-and-requeue, its heartbeat and every other worker would then wait on that lock
until `hpo optimize` killed them, leaving their trials RUNNING.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class Shutdown(KeyboardInterrupt):
    """SIGTERM or SIGINT: the worker fails its running trial, re-queues it and exits."""

    def __init__(self, signum: int):
        self.signal = signal.Signals(signum)
        super().__init__(f"received {self.signal.name}")


class _Held:
    """The main thread's state: how deep it is in database calls, and a signal that waits for them."""

    depth = 0
    pending: int | None = None


def _raise_shutdown(signum: int, _frame: FrameType | None) -> None:
    # Once: Ctrl-C sends the terminal's SIGINT and then `hpo optimize`'s SIGTERM to each local
    # worker, and a second Shutdown raised inside the first one's fail-and-requeue would cut it short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _Held.depth:
        _Held.pending = signum
        return
    raise Shutdown(signum)


def install_signal_handlers() -> None:
    _Held.depth, _Held.pending = 0, None
    signal.signal(signal.SIGTERM, _raise_shutdown)
    signal.signal(signal.SIGINT, _raise_shutdown)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """A database call: a signal that arrives in it raises Shutdown once the outermost one has ended
    (its connection back in the pool, its transaction committed or rolled back). Signals run in the
    main thread only, so other threads pass straight through."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _Held.depth += 1
    try:
        yield
    finally:
        _Held.depth -= 1
        if _Held.depth == 0 and _Held.pending is not None:
            signum, _Held.pending = _Held.pending, None
            raise Shutdown(signum)
