"""What a time budget holds on this machine, from measured or calibrated epochs: the least time one
trial plus the finalizer needs, how many whole trials fit beside the finalizer’s reserve, and the
longest horizon the time holds (`[budget] fit_epochs`)."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from hpo.search.budget import (
    START_S,
    WORKERS_SLOWDOWN,
    EpochCost,
    calibration,
    final_reserve,
    measured,
    member_estimate,
    slack_s,
    trial_estimate,
)
from hpo.settings.config import StudyConfig, with_horizon
from hpo.settings.durations import format_duration


def outlook(study: optuna.Study, cfg: StudyConfig, workers: int, final_threads: int, left_s: float) -> str | None:
    """What `left_s` holds, in one line for the start of a timed search: how many whole trials' worth
    of training the workers have before the finalizer's reserve (its members at the final horizon;
    before any trial completes, `[final] ensemble` of the calibrated or typical one). A budget that
    holds two whole trials reads as that before it is spent, not after. None before any epoch is
    measured or calibrated."""
    costs, calibrated = measured(study), calibration(study)
    if not costs and calibrated is None:
        return None
    # The calibration as it is, not doubled as the planner's caution doubles it: an outlook, not a bound.
    trial_s = trial_estimate(cfg, costs or ([calibrated] if calibrated else []), None)
    reserve = final_reserve(study, cfg, final_threads, costs, calibrated)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        reserve *= cfg.final.ensemble
    whole = whole_trials(trial_s, reserve, workers, left_s)
    return (
        f"the {format_duration(left_s)} left hold about {whole:.1f} whole trial(s) of {cfg.budget.epochs} epochs "
        f"(about {format_duration(trial_s)} each) across {workers} worker(s), besides the finalizer's "
        f"{format_duration(reserve)}; pruning stops most trials early, so the search sees more configurations"
    )


def minimum_budget(
    cfg: StudyConfig, cost: EpochCost, final_threads: int, calibrated: bool = False, start_s: float = START_S
) -> float:
    """The shortest budget in which the first trial, started `start_s` after the clock (process
    start-up, data, calibration), can train its whole horizon with one final member's run reserved
    after it: else no trial could complete, and the finalizer would have nothing to retrain.

    `cost` is one trial epoch: measured, or (`calibrated`) the calibration of a study without a warm
    start, whose first trial is any point of the space, so it counts double as in the planner. A
    warm start's calibration is of the first trial itself and counts once.
    """
    doubled = calibrated and not cfg.warm_start.params
    trial = trial_estimate(cfg, [] if doubled else [cost], cost if doubled else None)
    member = member_estimate(cost, cfg.final.epochs, final_threads, cfg.final)
    # slack_s is 2 % of the budget, at least 10 s: solve start + trial + member + slack <= budget.
    need = start_s + trial + member
    return max(need + 10.0, need / 0.98)


def whole_trials(trial_s: float, reserve_s: float, workers: int, left_s: float) -> float:
    """Whole trials of `trial_s` the workers can train in `left_s` besides the finalizer's
    `reserve_s` and the slack."""
    return max(0.0, workers * (left_s - reserve_s - slack_s(left_s)) / trial_s)


def search_holds(
    cfg: StudyConfig, cost: EpochCost, final_threads: int, time_s: float, workers: int, calibrated: bool = False
) -> float:
    """Whole trials a new study's budget holds at its horizon besides all `[final] ensemble`
    members, the trial counted as `minimum_budget` counts the first one, and slower by
    WORKERS_SLOWDOWN where workers share the machine."""
    doubled = calibrated and not cfg.warm_start.params
    trial = trial_estimate(cfg, [] if doubled else [cost], cost if doubled else None)
    if workers > 1:
        trial *= WORKERS_SLOWDOWN
    reserve = cfg.final.ensemble * member_estimate(cost, cfg.final.epochs, final_threads, cfg.final)
    return whole_trials(trial, reserve, workers, time_s - START_S)


def fit_horizon(
    cfg: StudyConfig, cost: EpochCost, final_threads: int, time_s: float, workers: int = 1, calibrated: bool = False
) -> StudyConfig | None:
    """The horizon of a new study with `[budget] fit_epochs` fitted to `time_s` on this machine.

    Longer than `[budget] epochs`, up to `max_epochs`: the longest at which the time holds the
    finalizer's `[final] ensemble` members and `ensemble + 1` whole trials across the workers (the
    finalists the finalizer chooses among, and one trial's worth more to screen the others), so a
    faster machine or a longer budget trains longer, not only more. Else `epochs` while one trial
    and one final member fit (`minimum_budget`); else the longest shorter horizon that does. None
    when not even one epoch fits."""
    for epochs in range(cfg.budget.max_epochs or cfg.budget.epochs, cfg.budget.epochs, -1):
        fitted = with_horizon(cfg, epochs)
        holds = search_holds(fitted, cost, final_threads, time_s, workers, calibrated=calibrated)
        if holds >= cfg.final.ensemble + 1 and minimum_budget(fitted, cost, final_threads, calibrated) <= time_s:
            return fitted
    for epochs in range(cfg.budget.epochs, 0, -1):
        fitted = with_horizon(cfg, epochs)
        if minimum_budget(fitted, cost, final_threads, calibrated=calibrated) <= time_s:
            return fitted
    return None
