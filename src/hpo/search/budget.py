"""The study's time budget: its deadline, what a trial and the finalizer will cost, and whether a
trial may start.

The deadline is a study attribute, so every worker on every host sees the same one. Costs come
from the epoch times the study has measured (each trial's `history`); before any epoch is
measured, from a calibration: a few timed training steps of the space's middle configuration.
Trials train the final horizon unless a pruner stops them, so the budget decides two things, both
at epoch boundaries: a trial starts when its first epoch, plus the finalizer's reserve, ends
before the deadline; and a running trial stops (PRUNED, reason "time budget") once its epochs left
would run into that reserve, since a trial that cannot complete is no finalist. Nothing is killed
mid-epoch, and the finalizer is never cut (its own epochs: hpo.search.final_epochs). No torch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo import attrs
from hpo.search.optuna_compat import study_engine
from hpo.search.storage import database_time
from hpo.search.trials import FINISHED, best_first
from hpo.settings.config import FinalSettings, StudyConfig

log = logging.getLogger(__name__)


EVAL_SHARE = 1 / 3  # an evaluated image costs about a third of a trained one (no backward pass)
TRIAL_QUANTILE = 0.9  # a new trial is assumed as slow per epoch as the 90th percentile so far
CALIBRATION_MARGIN = 2.0  # before any real epoch: configurations vary, so double the middle one's time
TRIAL_OVERHEAD_S = 3.0  # model build, attributes and the last report of one trial
# Trials share the machine between workers; the finalizer has it alone, and each thread it adds
# speeds an epoch by this share of a thread: the lower of the two machines measured (0.98 and 0.75,
# docs/performance.md#time-budgets), so that the reserve errs long.
THREAD_EFFICIENCY = 0.75
DATASET_IMAGES = 60_000  # the official training set the finalizer trains on
TEST_IMAGES = 10_000


# A calibration times one process alone; workers beside each other share memory bandwidth and
# caches, so a calibrated epoch counts this much slower for them (measured 1.14 on average, up to
# 1.23: docs/performance.md#time-budgets).
WORKERS_SLOWDOWN = 1.25
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
    study.set_user_attr(attrs.DEADLINE, {"at": deadline.at, "time_s": time_s, "set_at": start})
    return deadline


def get_deadline(study: optuna.Study) -> Deadline | None:
    raw = study.user_attrs.get(attrs.DEADLINE)
    return Deadline(raw["at"], raw["time_s"], raw["set_at"], clock_offset(study)) if raw else None


def running_deadline(study: optuna.Study) -> Deadline | None:
    """The deadline a finalizer started now must keep: the study's, while time is left. Inside a
    running job's budget the ensemble shrinks to fit; once the job's time is over, a final-train
    asked for by hand trains the whole ensemble."""
    deadline = get_deadline(study)
    return deadline if deadline is not None and deadline.left() > 0 else None


# --------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class EpochCost:
    """One measured (or calibrated) epoch: its seconds and the work it held."""

    epoch_s: float  # train + validation, wall clock
    train_images: int
    val_images: int
    threads: int  # CPU threads the process had (1 on a GPU is fine: the ratio is what counts)
    pool_images: int = DATASET_IMAGES  # what the finalizer trains on: the data set's whole pool
    test_images: int = TEST_IMAGES  # and scores

    def per_image_s(self) -> float:
        """Seconds per trained image, validation counted at EVAL_SHARE of a trained one."""
        return self.epoch_s / max(1.0, self.train_images + EVAL_SHARE * self.val_images)


def current_epochs(history: list[dict[str, float]]) -> tuple[list[float], int | None]:
    """The seconds of a trial's epochs at the CPU threads of its latest one, and that count (None:
    a history that does not record threads). A worker of `hpo optimize` takes more threads when
    another worker leaves (devices.CpuShare), and its earlier epochs then say little of its next."""
    rows = [row for row in history if "seconds" in row]
    threads = rows[-1].get("threads") if rows else None
    return [row["seconds"] for row in rows if row.get("threads") == threads], None if threads is None else int(threads)


def trial_cost(trial: FrozenTrial) -> EpochCost | None:
    """The mean epoch of a trial that has trained at least one, from its `history` attribute (at
    the threads of its latest epoch)."""
    seconds, threads = current_epochs(trial.user_attrs.get(attrs.HISTORY, []))
    if not seconds or attrs.TRAIN_IMAGES not in trial.user_attrs:
        return None
    return EpochCost(
        sum(seconds) / len(seconds),
        int(trial.user_attrs[attrs.TRAIN_IMAGES]),
        int(trial.user_attrs.get(attrs.VAL_IMAGES, 0)),
        threads or int(trial.user_attrs.get(attrs.THREADS, 1)),
        int(trial.user_attrs.get(attrs.POOL_IMAGES, DATASET_IMAGES)),
        int(trial.user_attrs.get(attrs.TEST_IMAGES, TEST_IMAGES)),
    )


def quantile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def measured(study: optuna.Study) -> list[EpochCost]:
    costs = (trial_cost(t) for t in study.get_trials(deepcopy=False) if t.state in (*FINISHED, TrialState.RUNNING))
    return [c for c in costs if c is not None]


def calibration(study: optuna.Study) -> EpochCost | None:
    raw = study.user_attrs.get(attrs.CALIBRATION)
    return EpochCost(**raw) if raw else None


def trial_estimate(
    cfg: StudyConfig, costs: list[EpochCost], calibrated: EpochCost | None, epochs: int | None = None
) -> float:
    """Seconds a new trial of the study takes for `epochs` (its whole horizon by default)."""
    if costs:
        epoch_s = quantile([c.epoch_s for c in costs], TRIAL_QUANTILE)
    elif calibrated is not None:
        epoch_s = calibrated.epoch_s * CALIBRATION_MARGIN
    else:
        raise ValueError("no measured epoch and no calibration")
    return epoch_s * (cfg.budget.epochs if epochs is None else epochs) + TRIAL_OVERHEAD_S


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


def test_passes(tta: str, trial_models: bool = False) -> int:
    """Forward passes the finalizer makes per test image and member: each TTA view, in the ensemble
    and again alone (hpo.results.scoring.score), and as many again for the member's own trial model."""
    return 2 * (2 if tta == "flip" else 1) * (2 if trial_models else 1)


def member_estimate(cost: EpochCost, epochs: int, final_threads: int, final: FinalSettings) -> float:
    """Seconds one finalizer member takes: `epochs` on the data set's whole pool, then its test passes."""
    per_image = cost.per_image_s() * min(1.0, thread_factor(cost.threads, final_threads))
    passes = test_passes(final.tta, final.trial_models)
    return per_image * (epochs * cost.pool_images + passes * FP32_EVAL_SHARE * cost.test_images)


def final_reserve(
    study: optuna.Study,
    cfg: StudyConfig,
    final_threads: int,
    costs: list[EpochCost],
    calibrated: EpochCost | None,
    chosen: list[FrozenTrial] | None = None,
) -> float:
    """Seconds kept for the finalizer: its members' runs at the final horizon, each from the epoch
    times its own trial measured. The members are `chosen`: those the finalizer's join rule keeps
    now (hpo.search.join.members_now, on the trials' validation outputs); without it, the best
    COMPLETE trials up to `[final] ensemble` (the finalizer may keep fewer, never more). Before any
    trial is complete, the leading trial stands in: the one with the best value at its latest
    epoch, which is the likeliest to complete and be retrained (a typical epoch, the 90th
    percentile of those measured, or the calibration, before any epoch)."""
    if chosen is None:
        complete = [t for t in best_first(study, cfg.direction == "maximize") if trial_cost(t) is not None]
        chosen = complete[: cfg.final.ensemble]
    members = [c for t in chosen if (c := trial_cost(t)) is not None]
    if not members:
        lead = leading_trial(study, cfg.direction == "maximize")
        stand_in = trial_cost(lead) if lead is not None else None
        if stand_in is None and costs:
            stand_in = EpochCost(
                quantile([c.epoch_s for c in costs], TRIAL_QUANTILE),
                costs[0].train_images,
                costs[0].val_images,
                costs[0].threads,
                costs[0].pool_images,
                costs[0].test_images,
            )
        stand_in = stand_in or calibrated
        if stand_in is None:
            raise ValueError("no measured epoch and no calibration")
        members = [stand_in]
    return sum(member_estimate(c, cfg.final.epochs, final_threads, cfg.final) for c in members)


def leading_trial(study: optuna.Study, maximize: bool) -> FrozenTrial | None:
    """The RUNNING or PRUNED trial with the best value at its latest reported epoch."""
    reported = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.PRUNED))
        if t.intermediate_values
    ]
    if not reported:
        return None

    def latest(t: FrozenTrial) -> float:
        return t.intermediate_values[max(t.intermediate_values)]

    return max(reported, key=latest) if maximize else min(reported, key=latest)


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Plan:
    """Why a trial was allowed to start: its estimated end and the reserve still left after it."""

    decided_at: float  # unix seconds
    estimate_s: float  # the trial's estimated duration
    reserve_s: float  # the finalizer's reserve plus the slack
    deadline: float  # unix seconds
    what: str = "a trial's first epoch"  # what the estimate is of

    @property
    def fits(self) -> bool:
        return self.decided_at + self.estimate_s + self.reserve_s <= self.deadline

    def describe(self) -> str:
        needs = "need" if self.what.endswith("epochs") else "needs"
        return (
            f"{self.what} {needs} about {self.estimate_s:.0f}s and the finalizer {self.reserve_s:.0f}s, "
            f"{max(0.0, self.deadline - self.decided_at):.0f}s are left"
        )


FIRST_EPOCHS = 1  # a trial starts when this many of its epochs fit: the pruners' first rung


def plan_trial(
    study: optuna.Study,
    cfg: StudyConfig,
    deadline: Deadline,
    final_threads: int,
    now: float | None = None,
    chosen: list[FrozenTrial] | None = None,
) -> Plan:
    """May a new trial start: do its first epoch and the finalizer's reserve (for the members
    `chosen`: final_reserve) end before the deadline?"""
    now = deadline.now() if now is None else now
    costs, calibrated = measured(study), calibration(study)
    estimate = trial_estimate(cfg, costs, calibrated, epochs=FIRST_EPOCHS)
    reserve = final_reserve(study, cfg, final_threads, costs, calibrated, chosen)
    return Plan(now, estimate, reserve + slack_s(deadline.time_s), deadline.at)


@dataclass(frozen=True)
class NextEpoch:
    """A running trial asking to train on: its number, its slowest and its median epoch so far (at
    the threads it trains on now), its epochs left, and when it asks."""

    number: int | None
    epoch_s: float
    epochs_left: int = 1
    median_s: float | None = None  # None: epoch_s
    at: float | None = None  # when it asks, unix seconds by the database's clock (None: now)

    def rest_s(self) -> float:
        """Its epochs left: the next at its slowest so far, the others at its median."""
        typical = self.epoch_s if self.median_s is None else self.median_s
        return self.epoch_s + typical * max(0, self.epochs_left - 1)

    def rest(self) -> str:
        return "its last epoch" if self.epochs_left <= 1 else f"its remaining {self.epochs_left} epochs"


def plan_epoch(
    study: optuna.Study,
    cfg: StudyConfig,
    deadline: Deadline,
    final_threads: int,
    ask: NextEpoch,
    chosen: list[FrozenTrial] | None = None,
) -> Plan:
    """May the running trial train on: do its epochs left end before the finalizer's reserve (for
    the members `chosen`: final_reserve)? The reserve is re-read: it grows as better trials complete.

    A trial that cannot complete before the reserve is no finalist, so it stops now rather than at
    the clock: its epochs go to trials that can complete. (In a 60-minute run a residual trial at
    200 s an epoch on one thread trained 7 of its 27 epochs, 23 minutes of one worker's 49, before
    the clock stopped it, and the finalizer could use none of it.)

    While no trial is COMPLETE, the leading trial is the only finalist in sight: stopping it would
    leave the finalizer nothing. It goes on while its epochs left and one final epoch fit (the
    finalizer then trains the epochs left to it, and says so), rather than stop short of the
    horizon for a reserve sized for a whole member."""
    now = deadline.now() if ask.at is None else ask.at
    costs = measured(study)
    lead = leading_trial(study, cfg.direction == "maximize")
    alone = not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if alone and lead is not None and lead.number == ask.number and (cost := trial_cost(lead)) is not None:
        reserve = member_estimate(cost, 1, final_threads, cfg.final)
    else:
        reserve = final_reserve(study, cfg, final_threads, costs, calibration(study), chosen)
    return Plan(now, ask.rest_s(), reserve + slack_s(deadline.time_s), deadline.at, ask.rest())


def describe_deadline(deadline: Deadline | None, now: float | None = None) -> dict[str, Any] | None:
    if deadline is None:
        return None
    now = deadline.now() if now is None else now
    return {
        "time_s": deadline.time_s,
        "deadline": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(deadline.at)),
        "left_s": round(max(0.0, deadline.left(now)), 1),
    }
