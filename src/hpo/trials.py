"""What counts as finished, and a COMPLETE trial's value: one definition for every module."""

from __future__ import annotations

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
