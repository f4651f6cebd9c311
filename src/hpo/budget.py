"""The study's time budget: its deadline, what a trial and the finalizer will cost, and whether a
trial may start.

The deadline is a study attribute, so every worker on every host sees the same one. Costs come
from the epoch times the study has measured (each trial's `history`); before any epoch is
measured, from a calibration: a few timed training steps of the space's middle configuration.
Nothing is ever killed at the deadline. The budget only decides what starts: a trial starts when
its estimate, plus the finalizer's reserve, ends before the deadline.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.config import StudyConfig
from hpo.optuna_compat import study_engine
from hpo.storage import database_time
from hpo.trials import FINISHED, best_first, value

log = logging.getLogger(__name__)

DEADLINE_ATTR = "hpo:deadline"  # study: {"at": unix s, "time_s": budget, "set_at": unix s}
CALIBRATION_ATTR = "hpo:calibration"  # study: {"epoch_s": ..., "train_images": ..., ...} of one EpochCost
PLAN_ATTR = "budget"  # trial: the estimate that let it start (see Plan)
TRAIN_IMAGES_ATTR = "train_images"  # trial: images per training epoch
VAL_IMAGES_ATTR = "val_images"  # trial: images per validation pass

EVAL_SHARE = 1 / 3  # an evaluated image costs about a third of a trained one (no backward pass)
TRIAL_QUANTILE = 0.9  # a new trial is assumed as slow per epoch as the 90th percentile so far
CALIBRATION_MARGIN = 2.0  # before any real epoch: configurations vary, so double the middle one's time
TRIAL_OVERHEAD_S = 3.0  # model build, attributes and the last report of one trial
# Trials share the machine between workers; the finalizer has it alone. Two 1-thread trials measured
# 0.00047 s per image where the 2-thread finalizer then took 0.00024 (0.51x): the machine's total
# throughput barely changed. 0.9 keeps the reserve about 10 % on the safe side.
THREAD_EFFICIENCY = 0.9
DATASET_IMAGES = 60_000  # the official training set the finalizer trains on
TEST_IMAGES = 10_000


START_S = 10.0  # the clock starts before the first trial can: process start-up, data, calibration


def slack_s(time_s: float) -> float:
    """Kept free at the end for process start-up, plots, uploads and exit: 2 % of the budget, at least 10 s."""
    return max(10.0, 0.02 * time_s)


# --------------------------------------------------------------------------- the deadline


@dataclass(frozen=True)
class Deadline:
    """The study's deadline, by the database's clock: every host stops starting trials at the same
    moment whatever its own clock says (the reaper judges heartbeats by that clock too)."""

    at: float  # unix seconds, database clock
    time_s: float  # the budget it was set from
    set_at: float  # unix seconds, database clock
    offset_s: float = 0.0  # this host's clock plus this is the database's (measured when read; not stored)

    def now(self) -> float:
        """Unix seconds by the database's clock."""
        return time.time() + self.offset_s

    def left(self, now: float | None = None) -> float:
        return self.at - (self.now() if now is None else now)


def clock_offset(study: optuna.Study) -> float:
    """Seconds to add to this host's clock to read the database's (0 for a storage without one)."""
    engine = study_engine(study)
    if engine is None:
        return 0.0
    before = time.time()
    database = database_time(engine)
    return database - (before + time.time()) / 2


def set_deadline(study: optuna.Study, time_s: float, now: float | None = None) -> Deadline:
    """Start the study's clock `time_s` before its deadline: from `now` (this host's unix seconds,
    such as when the command started), or from this moment."""
    offset = clock_offset(study)
    start = (time.time() if now is None else now) + offset
    deadline = Deadline(at=start + time_s, time_s=time_s, set_at=start, offset_s=offset)
    study.set_user_attr(DEADLINE_ATTR, {"at": deadline.at, "time_s": time_s, "set_at": start})
    return deadline


def get_deadline(study: optuna.Study) -> Deadline | None:
    raw = study.user_attrs.get(DEADLINE_ATTR)
    return Deadline(raw["at"], raw["time_s"], raw["set_at"], clock_offset(study)) if raw else None


# --------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class EpochCost:
    """One measured (or calibrated) epoch: its seconds and the work it held."""

    epoch_s: float  # train + validation, wall clock
    train_images: int
    val_images: int
    threads: int  # CPU threads the process had (1 on a GPU is fine: the ratio is what counts)

    def per_image_s(self) -> float:
        """Seconds per trained image, validation counted at EVAL_SHARE of a trained one."""
        return self.epoch_s / max(1.0, self.train_images + EVAL_SHARE * self.val_images)


def trial_cost(trial: FrozenTrial) -> EpochCost | None:
    """The mean epoch of a trial that has trained at least one, from its `history` attribute."""
    seconds = [row["seconds"] for row in trial.user_attrs.get("history", []) if "seconds" in row]
    if not seconds or TRAIN_IMAGES_ATTR not in trial.user_attrs:
        return None
    return EpochCost(
        sum(seconds) / len(seconds),
        int(trial.user_attrs[TRAIN_IMAGES_ATTR]),
        int(trial.user_attrs.get(VAL_IMAGES_ATTR, 0)),
        int(trial.user_attrs.get("threads", 1)),
    )


def quantile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def measured(study: optuna.Study) -> list[EpochCost]:
    costs = (trial_cost(t) for t in study.get_trials(deepcopy=False) if t.state in (*FINISHED, TrialState.RUNNING))
    return [c for c in costs if c is not None]


def calibration(study: optuna.Study) -> EpochCost | None:
    raw = study.user_attrs.get(CALIBRATION_ATTR)
    return EpochCost(**raw) if raw else None


def trial_estimate(cfg: StudyConfig, costs: list[EpochCost], calibrated: EpochCost | None) -> float:
    """Seconds a new trial of the study takes, pruning not counted."""
    if costs:
        epoch_s = quantile([c.epoch_s for c in costs], TRIAL_QUANTILE)
    elif calibrated is not None:
        epoch_s = calibrated.epoch_s * CALIBRATION_MARGIN
    else:
        raise ValueError("no measured epoch and no calibration")
    return epoch_s * cfg.budget.epochs + TRIAL_OVERHEAD_S


def thread_factor(trial_threads: int, final_threads: int) -> float:
    """How much faster per image the finalizer, alone on `final_threads`, runs than a trial did."""
    if final_threads <= trial_threads:
        return 1.0
    return trial_threads / final_threads / THREAD_EFFICIENCY


# The finalizer scores the test split in fp32 (the precision of an exported model): on a 2-core AMD
# EPYC (AVX2 only) an fp32 forward pass took 0.38-0.56 of a bf16 training step per image, for the
# cnn-quick warm start and the space's middle CNN (3 repeats each), where EVAL_SHARE (1/3) held for
# bf16 validation. 0.6 stays above every reading.
FP32_EVAL_SHARE = 0.6


def test_passes(tta: str) -> int:
    """Forward passes the finalizer makes per test image and member: each TTA view, in the ensemble
    and again alone (hpo.final.score)."""
    return 2 * (2 if tta == "flip" else 1)


def member_estimate(
    cost: EpochCost, epochs: int, final_threads: int, train_images: int = DATASET_IMAGES, tta: str = "flip"
) -> float:
    """Seconds one finalizer member takes: `epochs` on `train_images`, then its test passes."""
    per_image = cost.per_image_s() * min(1.0, thread_factor(cost.threads, final_threads))
    return per_image * (epochs * train_images + test_passes(tta) * FP32_EVAL_SHARE * TEST_IMAGES)


def final_reserve(
    study: optuna.Study,
    cfg: StudyConfig,
    final_threads: int,
    costs: list[EpochCost],
    calibrated: EpochCost | None,
    time_s: float | None = None,
) -> float:
    """Seconds kept for the finalizer: its whole ensemble, estimated from the trials most likely to be
    its members, but at most `[final] max_share` of `time_s` (the search keeps the rest, and the
    finalizer shrinks its ensemble, then its first member's epochs, to what is left)."""
    complete = [t for t in best_first(study, cfg.direction == "maximize") if trial_cost(t) is not None]
    # The finalizer takes a member beyond the best only within member_gap of it; trials still to
    # come may be such members, so the places complete trials do not fill yet count as typical ones.
    close = [t for t in complete[: cfg.final.ensemble] if abs(value(t) - value(complete[0])) <= cfg.final.member_gap]
    members = [trial_cost(t) for t in close]
    padding = max(0, cfg.final.ensemble - len(complete))
    typical = (
        EpochCost(
            quantile([c.epoch_s for c in costs], TRIAL_QUANTILE),
            costs[0].train_images,
            costs[0].val_images,
            costs[0].threads,
        )
        if costs
        else calibrated
    )
    if typical is None:
        raise ValueError("no measured epoch and no calibration")
    members += [typical] * padding
    if cfg.final.fill == "seeds":  # the places the gap leaves empty go to the best trial again
        members += [trial_cost(complete[0]) if complete else typical] * (cfg.final.ensemble - len(members))
    each = [member_estimate(c, cfg.final.epochs, final_threads, tta=cfg.final.tta) for c in members if c is not None]
    return sum(each) if time_s is None else min(sum(each), cfg.final.max_share * time_s)


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Plan:
    """Why a trial was allowed to start: its estimated end and the reserve still left after it."""

    decided_at: float  # unix seconds
    estimate_s: float  # the trial's estimated duration
    reserve_s: float  # the finalizer's reserve plus the slack
    deadline: float  # unix seconds

    @property
    def fits(self) -> bool:
        return self.decided_at + self.estimate_s + self.reserve_s <= self.deadline

    def describe(self) -> str:
        return (
            f"a trial needs about {self.estimate_s:.0f}s and the finalizer {self.reserve_s:.0f}s, "
            f"{max(0.0, self.deadline - self.decided_at):.0f}s are left"
        )


def plan_trial(
    study: optuna.Study, cfg: StudyConfig, deadline: Deadline, final_threads: int, now: float | None = None
) -> Plan:
    now = deadline.now() if now is None else now
    costs, calibrated = measured(study), calibration(study)
    estimate = trial_estimate(cfg, costs, calibrated)
    reserve = final_reserve(study, cfg, final_threads, costs, calibrated, deadline.time_s)
    if not costs:  # the first round of trials: no epoch measured yet
        reserve = yielded_reserve(reserve, estimate, deadline.at - now, deadline.time_s)
    return Plan(now, estimate, reserve + slack_s(deadline.time_s), deadline.at)


def yielded_reserve(reserve: float, estimate: float, room_s: float, time_s: float) -> float:
    """The finalizer's reserve, giving way to the first round of trials where a machine is too slow
    for one trial beside it in the `room_s` seconds left: they still start if they can end in time
    (the finalizer then trains the epochs that are left), instead of the budget being refused on a
    machine 3x slower than the one the study file was written on. A pinned quick start with the
    test suite on the same core reached its first trial 12 s after the clock started, with a
    112 s estimate beside a 466 s reserve: without the yield it started none."""
    return max(0.0, min(reserve, room_s - estimate - slack_s(time_s) - 1e-3))  # 1 ms: the sum stays below the deadline


def minimum_budget(
    cfg: StudyConfig, cost: EpochCost, final_threads: int, calibrated: bool = False, start_s: float = START_S
) -> float:
    """The shortest budget in which `plan_trial` lets the first trial start `start_s` after the clock
    does (process start-up, data, calibration) and the finalizer's reserve, given way to that trial,
    still holds one member's epoch.

    `cost` is one trial epoch: measured, or (`calibrated`) the calibration, which the planner doubles.
    """
    trial = trial_estimate(cfg, [] if calibrated else [cost], cost if calibrated else None)
    full = member_estimate(cost, cfg.final.epochs, final_threads, tta=cfg.final.tta) * cfg.final.ensemble
    one_epoch = member_estimate(cost, 1, final_threads, tta=cfg.final.tta)

    def enough(time_s: float) -> bool:
        reserve = yielded_reserve(min(full, cfg.final.max_share * time_s), trial, time_s - start_s, time_s)
        return reserve >= min(full, one_epoch)

    low, high = 1.0, 1e7  # enough() holds from some point on: both sides grow, its left side slower
    while high - low > 1.0:
        middle = (low + high) / 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return high


def describe_deadline(deadline: Deadline | None, now: float | None = None) -> dict[str, Any] | None:
    if deadline is None:
        return None
    now = deadline.now() if now is None else now
    return {
        "time_s": deadline.time_s,
        "deadline": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(deadline.at)),
        "left_s": round(max(0.0, deadline.left(now)), 1),
    }
