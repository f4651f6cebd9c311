"""A worker's SIGTERM and SIGINT: Shutdown at once in training, after the call inside a database call.

Real signals, a real SQLite database with the workers' settings (every transaction takes the write
lock), and a statement hook that sends the signal while a given statement runs."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from hpo import attrs
from hpo.search import storage as storage_mod
from hpo.search.interrupts import Shutdown, install_signal_handlers, uninterrupted
from hpo.search.optuna_compat import trial_id
from hpo.search.reaper import Reaper, fail
from hpo.search.worker import run_trial


@pytest.fixture
def handlers():
    """The worker's handlers for one test, then pytest's own again."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    install_signal_handlers()
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


def write_lock_is_free(path) -> bool:
    probe = sqlite3.connect(path, timeout=0.3, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        probe.close()


def an_epoch_end(study: optuna.Study, trial: optuna.Trial) -> None:
    """The storage calls a trial makes after each epoch, as the objective makes them."""
    trial.set_user_attr("history", [{"epoch": 1}])
    trial.set_user_attr("epoch", 1)
    trial.report(0.5, 1)
    trial.should_prune()
    study.get_trials(deepcopy=False)


def test_a_signal_inside_any_statement_waits_for_the_call_and_leaves_no_lock(tmp_path, handlers):
    path = tmp_path / "hpo.db"
    store = storage_mod.open_storage(f"sqlite:///{path}")
    study = optuna.create_study(study_name="s", storage=store, direction="maximize")
    shoot_at = [0]

    @sqlalchemy.event.listens_for(store.engine, "after_cursor_execute")
    def signal_during_the_statement(*_args) -> None:
        shoot_at[0] -= 1
        if shoot_at[0] == 0:
            signal.raise_signal(signal.SIGTERM)  # its handler runs before the statement's code returns

    statements = 0
    while True:
        statements += 1
        trial = study.ask()
        shoot_at[0] = statements
        try:
            an_epoch_end(study, trial)
        except Shutdown as e:
            assert e.signal == signal.SIGTERM
            # While the exception (and its traceback) lives, as in the worker's `except Shutdown`:
            assert write_lock_is_free(path), f"statement {statements} left the write lock held"
            # ... the worker's fail-and-requeue goes through (it would wait on a held lock for minutes).
            assert fail(study, trial_id(trial), "worker stopped by SIGTERM; re-queued", retry=True)
            assert store.get_trial(trial_id(trial)).state == TrialState.FAIL
        else:
            assert shoot_at[0] > 0, f"the signal during statement {statements} raised nothing: it was lost"
            shoot_at[0] = 0  # the epoch's calls ran fewer statements than this: each one has been tried
            break
        finally:
            install_signal_handlers()  # the handler ignores further signals once it has fired
    assert statements > 10  # the epoch's calls were reached statement by statement
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    assert len(failed) == statements - 1
    assert all("worker stopped by SIGTERM" in t.user_attrs[attrs.REASON] for t in failed)


def test_a_signal_while_a_trial_is_asked_for_leaves_no_trial_running(tmp_path, handlers):
    """A worker's ask-and-tell, with the signal during each of its main thread's statements in turn:
    whenever Shutdown comes out of it, no trial is left RUNNING for another run's reaper."""
    store = storage_mod.open_storage(f"sqlite:///{tmp_path / 'hpo.db'}")
    study = optuna.create_study(study_name="s", storage=store, direction="maximize")
    shoot_at = [0]

    @sqlalchemy.event.listens_for(store.engine, "after_cursor_execute")
    def signal_during_the_statement(*_args) -> None:
        if threading.current_thread() is threading.main_thread():  # not the heartbeat's
            shoot_at[0] -= 1
            if shoot_at[0] == 0:
                signal.raise_signal(signal.SIGTERM)

    statements = 0
    while True:
        statements += 1
        shoot_at[0] = statements
        try:
            run_trial(study, store, lambda trial: trial.suggest_float("x", 0, 1), Reaper(study, store))
        except Shutdown:
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            assert not running, f"statement {statements}: trial {running[0].number} was left RUNNING"
        else:
            assert shoot_at[0] > 0, f"the signal during statement {statements} raised nothing: it was lost"
            shoot_at[0] = 0
            break
        finally:
            install_signal_handlers()
    assert statements > 5  # ask, the objective's suggestion and tell were reached statement by statement
    assert study.get_trials(deepcopy=False, states=(TrialState.FAIL,))


def test_outside_a_database_call_the_signal_stops_at_once_and_only_once(handlers):
    with pytest.raises(Shutdown) as stopped:
        signal.raise_signal(signal.SIGINT)
        time.sleep(5)  # an epoch: never reached
    assert stopped.value.signal == signal.SIGINT
    # Ctrl-C then `hpo optimize`'s SIGTERM: the second must not cut the first one's re-queue short.
    signal.raise_signal(signal.SIGTERM)


def test_a_signal_inside_nested_calls_is_raised_when_the_outermost_ends(handlers):
    reached = []
    with pytest.raises(Shutdown):
        with uninterrupted():
            with uninterrupted():
                signal.raise_signal(signal.SIGTERM)
                reached.append("inner")
            reached.append("outer")
        reached.append("after")
    assert reached == ["inner", "outer"]
