"""The finalizer's epochs inside a time budget: how many of the first member's epochs fit the time
left, their re-fit as the member times its own epochs, and whether a further member would end late.
Used by hpo.results.retrain and by `hpo bench --search`'s fixed baseline; no torch."""

from __future__ import annotations

import logging
import statistics
from typing import TYPE_CHECKING

import optuna

from hpo.search.budget import Deadline, slack_s, trial_cost

if TYPE_CHECKING:  # types only
    from hpo.learn.train import EpochStats, Replan

log = logging.getLogger(__name__)

SHRINK_MARGIN = 1.05  # an epoch is counted 5 % slower than measured when fitting epochs to the time left
LATE_EPOCHS = 3  # past halfway, the epochs a re-fit reads: a slow spell shows in the latest ones


def fitted_epochs(per_epoch: float, deadline: Deadline, test_s: float, epochs: int, source: str) -> int:
    """The first member's epochs that end before `deadline`, `test_s` for the test passes kept free:
    all of them unless time is short, else as many as fit (at least one)."""
    fitted = epochs_that_fit(per_epoch, time_left_for_epochs(deadline, test_s), epochs)
    log.info(
        f"final-train: {per_epoch:.1f}s per epoch ({source}), {deadline.left():.0f}s left ({test_s:.0f}s of "
        f"them for the test passes): {fitted} of {epochs} epochs fit"
    )
    return fitted


def time_left_for_epochs(deadline: Deadline, test_s: float) -> float:
    """Seconds left for training epochs: the deadline less the slack and the measured test passes."""
    return deadline.left() - slack_s(deadline.time_s) - test_s


def epochs_that_fit(per_epoch: float, left: float, epochs: int, done: int = 0) -> int:
    """Epochs in all (`done` of them trained already), up to `epochs`, that end in `left` seconds more."""
    return max(done or 1, min(epochs, done + int(left // (SHRINK_MARGIN * per_epoch))))


def timed_replan(deadline: Deadline, test_s: float, epochs: int) -> Replan:
    """Re-fit the first member's epochs to the epochs it has timed itself. Through its first half:
    fewer where the time left is short of them (another load on the machine), more, up to the
    `epochs` asked for, where the estimate it started from was slow (a trial's epochs timed beside
    another worker read about 15 % slower than the finalizer trains alone). Past halfway it only
    shrinks, from its latest epochs (LATE_EPOCHS), where they say the rest would end past the
    deadline: shrinking anneals the learning rate sooner, where stretching would raise it again.
    (A fixed-CNN baseline that could not shrink late ran 30 % past its hour in a slow spell.)"""

    def replan(history: list[EpochStats], total: int) -> int:
        done = len(history)
        if done >= total:
            return total
        late = 2 * done > total
        per_epoch = statistics.median(s.seconds for s in (history[-LATE_EPOCHS:] if late else history))
        new = epochs_that_fit(per_epoch, time_left_for_epochs(deadline, test_s), epochs, done)
        if late:
            new = min(new, total)
        if new != total:
            log.info(f"final-train: {per_epoch:.1f}s per epoch trained after epoch {done}: {new} epochs fit")
        return new

    return replan


def would_end_late(
    first: optuna.trial.FrozenTrial,
    first_train_s: float,
    trial: optuna.trial.FrozenTrial,
    member: int,
    deadline: Deadline,
    test_s: float,
) -> str | None:
    """Why member number `member` (trial `trial`) would end past the deadline: the first member's
    measured training time, scaled by the trials' relative cost per image, plus `test_s`, the test
    passes of the ensemble with it; None if it fits."""
    first_cost, this = trial_cost(first), trial_cost(trial)
    ratio = this.per_image_s() / first_cost.per_image_s() if first_cost and this else 1.0
    needed = first_train_s * ratio + slack_s(deadline.time_s) + test_s
    if deadline.left() >= needed:
        return None
    left = max(0.0, deadline.left())
    return f"member {member} (trial {trial.number}) needs about {needed:.0f}s, {left:.0f}s are left"
