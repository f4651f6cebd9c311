"""What counts as finished, a COMPLETE trial's value, and which trial a retry copies: one
definition for every module."""

from __future__ import annotations

import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState

# The states that use up the budget: a trial that ended with a value or was pruned. FAIL gives its slot back.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def value(trial: FrozenTrial) -> float:
    """The value of a COMPLETE trial (Optuna types it as optional, for the other states)."""
    if trial.value is None:
        raise ValueError(f"trial {trial.number} ({trial.state.name}) has no value")
    return trial.value


def best_first(study: optuna.Study, maximize: bool) -> list[FrozenTrial]:
    """The study's COMPLETE trials, best validation value first."""
    return sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=value, reverse=maximize)


def retry_history(trial: FrozenTrial) -> list[int]:
    """The trials a retry copies, oldest first (its configuration's first run, ..., the one it
    replaces); [] for a first run. Optuna's retry callback keeps it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trial)


def first_run(trial: FrozenTrial) -> int:
    """The number of the first trial of this configuration: its own, unless it is a retry."""
    return (retry_history(trial) or [trial.number])[0]


def count_by_state(trials: list[FrozenTrial]) -> dict[str, int]:
    """How many trials are in each state, every state named (0 where none)."""
    by_state = {s.name: 0 for s in TrialState}
    for trial in trials:
        by_state[trial.state.name] += 1
    return by_state


def counts(study: optuna.Study) -> dict[str, int]:
    """The study's trials by state."""
    return count_by_state(study.get_trials(deepcopy=False))


def finished_count(study: optuna.Study) -> int:
    """COMPLETE and PRUNED trials: what the trial budget counts."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))
