"""The time budget: durations, cost estimates from measured epochs, and the start decision."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from hpo import budget, config
from hpo.budget import EpochCost, Plan


@pytest.mark.parametrize(
    "text, seconds", [("10m", 600), ("1h30m", 5400), ("90s", 90), ("45", 45), ("1.5h", 5400), (" 2m 30s ", 150)]
)
def test_durations_people_write(text, seconds):
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text, problem",
    [
        ("ten minutes", "is not a duration"),
        ("10x", "is not a duration"),
        ("0m", "not a positive duration"),
        ("-5m", "is not a duration"),
        ("", "is not a duration"),
    ],
)
def test_durations_that_do_not_parse_say_why(text, problem):
    with pytest.raises(ValueError, match=problem):
        config.parse_duration(text)


def test_study_file_time_is_parsed_and_round_trips():
    cfg = config.load("cnn-quick")
    assert cfg.budget.time_s == 600
    assert config.from_dict(cfg.to_dict(), source="stored").budget.time_s == 600


def test_quantile_is_an_upper_order_statistic():
    values = [float(v) for v in range(1, 11)]
    assert budget.quantile(values, 0.9) == 9.0
    assert budget.quantile(values, 1.0) == 10.0
    assert budget.quantile([3.0], 0.9) == 3.0


def study_with(epoch_seconds: list[float], epochs: int = 3) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for i, seconds in enumerate(epoch_seconds):
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE,
                value=0.5 + i / 100,
                params={},
                user_attrs={
                    "history": [{"epoch": e + 1, "seconds": seconds} for e in range(epochs)],
                    budget.TRAIN_IMAGES_ATTR: 1000,
                    budget.VAL_IMAGES_ATTR: 300,
                    "threads": 1,
                },
            )
        )
    return study


def test_trial_estimate_uses_the_90th_percentile_of_measured_epochs():
    cfg = config.load("tiny")  # 3 epochs per trial
    costs = budget.measured(study_with([1.0] * 9 + [10.0]))
    assert budget.trial_estimate(cfg, costs, None) == pytest.approx(1.0 * 3 + budget.TRIAL_OVERHEAD_S)
    costs = budget.measured(study_with([1.0] * 8 + [10.0, 10.0]))
    assert budget.trial_estimate(cfg, costs, None) == pytest.approx(10.0 * 3 + budget.TRIAL_OVERHEAD_S)


def test_before_any_epoch_the_calibration_counts_double():
    cfg = config.load("tiny")
    calibrated = EpochCost(epoch_s=2.0, train_images=1000, val_images=300, threads=1)
    assert budget.trial_estimate(cfg, [], calibrated) == pytest.approx(2.0 * 2 * 3 + budget.TRIAL_OVERHEAD_S)
    with pytest.raises(ValueError):
        budget.trial_estimate(cfg, [], None)


def test_final_reserve_counts_every_member_on_the_whole_training_set():
    cfg = config.load("tiny")  # ensemble 2, 1 final epoch
    study = study_with([1.0, 2.0])
    costs = budget.measured(study)
    reserve = budget.final_reserve(study, cfg, 1, costs, None)
    per_image = [c.per_image_s() for c in costs]  # the two best trials are the members
    expected = sum(
        p * (budget.DATASET_IMAGES + budget.test_passes("flip") * budget.FP32_EVAL_SHARE * budget.TEST_IMAGES)
        for p in per_image
    )
    assert reserve == pytest.approx(expected)
    # With more cores than the trials had, the finalizer is expected faster, never slower.
    assert budget.final_reserve(study, cfg, 4, costs, None) < reserve


def test_final_reserve_leaves_out_members_the_gap_would_leave_out():
    cfg = config.load("tiny")
    cfg = dataclasses.replace(cfg, final=dataclasses.replace(cfg.final, member_gap=0.005))
    study = study_with([1.0, 2.0])  # values 0.50 and 0.51: 0.01 apart, beyond the gap
    costs = budget.measured(study)
    best = max(costs, key=lambda c: c.epoch_s)  # the second trial is the better one
    expected = best.per_image_s() * (
        budget.DATASET_IMAGES + budget.test_passes("flip") * budget.FP32_EVAL_SHARE * budget.TEST_IMAGES
    )
    assert budget.final_reserve(study, cfg, 1, costs, None) == pytest.approx(expected)
    # With one trial complete, the second member's place is still open: a typical trial fills it.
    one = study_with([1.0])
    alone = dataclasses.replace(cfg, final=dataclasses.replace(cfg.final, ensemble=1))
    assert budget.final_reserve(one, cfg, 1, costs, None) > 1.5 * budget.final_reserve(one, alone, 1, costs, None)


def test_final_reserve_with_fill_seeds_counts_the_best_trial_for_every_empty_place():
    cfg = config.load("tiny")
    cfg = dataclasses.replace(cfg, final=dataclasses.replace(cfg.final, member_gap=0.005, fill="seeds", ensemble=3))
    study = study_with([1.0, 2.0])  # 0.01 apart: the gap keeps the better one alone
    costs = budget.measured(study)
    best = max(costs, key=lambda c: c.epoch_s)
    one = best.per_image_s() * (
        budget.DATASET_IMAGES + budget.test_passes("flip") * budget.FP32_EVAL_SHARE * budget.TEST_IMAGES
    )
    assert budget.final_reserve(study, cfg, 1, costs, None) == pytest.approx(3 * one)


def test_on_a_slow_machine_the_reserve_gives_way_to_the_first_round_of_trials_only():
    cfg = config.load("tiny")
    cfg = dataclasses.replace(cfg, final=dataclasses.replace(cfg.final, max_share=0.9))
    slow = {"epoch_s": 40.0, "train_images": 1000, "val_images": 300, "threads": 1}  # doubled: 240 s a trial
    study = optuna.create_study()
    study.set_user_attr(budget.CALIBRATION_ATTR, slow)
    deadline = budget.Deadline(at=1600.0, time_s=600.0, set_at=1000.0)
    # Workers that arrive late (25 s after the clock, a loaded machine) still start the first round.
    first = budget.plan_trial(study, cfg, deadline, 1, now=1025.0)
    assert first.fits
    assert first.reserve_s == pytest.approx(
        600.0 - 25.0 - first.estimate_s, abs=0.01
    )  # all that is left after the trial
    # A fast machine keeps its whole reserve.
    assert budget.yielded_reserve(300.0, 40.0, 590.0, 600.0) == 300.0
    # Once an epoch is measured the yield is over: with the same slow epochs, no later trial starts.
    measured = study_with([40.0])
    measured.set_user_attr(budget.CALIBRATION_ATTR, slow)
    assert not budget.plan_trial(measured, cfg, deadline, 1, now=1030.0).fits
    # A trial that cannot itself end in time never starts.
    assert not budget.plan_trial(study, cfg, deadline, 1, now=1400.0).fits


def test_plan_fits_only_when_trial_and_reserve_end_before_the_deadline():
    assert Plan(decided_at=0, estimate_s=10, reserve_s=20, deadline=30).fits
    assert not Plan(decided_at=0.5, estimate_s=10, reserve_s=20, deadline=30).fits


def test_deadline_is_a_study_attribute_every_process_reads():
    study = optuna.create_study()
    set_at = budget.set_deadline(study, 600, now=1000.0)
    assert budget.get_deadline(study) == set_at == budget.Deadline(at=1600.0, time_s=600, set_at=1000.0)
    assert set_at.left(now=1500.0) == 100.0
    assert budget.describe_deadline(set_at, now=1500.0)["left_s"] == 100.0


def test_minimum_budget_is_the_shortest_in_which_the_planner_starts_a_trial():
    cfg = config.load("tiny")  # 3 trial epochs, ensemble of 2 members of 1 epoch
    cost = EpochCost(epoch_s=1.0, train_images=1000, val_images=300, threads=1)
    study = optuna.create_study()
    study.set_user_attr(
        budget.CALIBRATION_ATTR, {"epoch_s": 1.0, "train_images": 1000, "val_images": 300, "threads": 1}
    )
    for calibrated in (True, False):
        needed = budget.minimum_budget(cfg, cost, 1, calibrated=calibrated, start_s=10.0)
        costs = [] if calibrated else [cost]
        for time_s, fits in ((needed, True), (needed - 2.0, False)):
            deadline = budget.Deadline(at=1000.0 + time_s, time_s=time_s, set_at=1000.0)
            estimate = budget.trial_estimate(cfg, costs, cost)
            full = budget.final_reserve(study, cfg, 1, costs, cost)
            capped = budget.final_reserve(study, cfg, 1, costs, cost, time_s)
            reserve = budget.yielded_reserve(capped, estimate, time_s - budget.START_S, time_s)
            plan = Plan(
                decided_at=1010.0, estimate_s=estimate, reserve_s=reserve + budget.slack_s(time_s), deadline=deadline.at
            )
            # The finalizer's share, after giving way to the first trial, must still hold one epoch of one member.
            holds_an_epoch = reserve >= min(full, budget.member_estimate(cost, 1, 1, tta=cfg.final.tta))
            assert (plan.fits and holds_an_epoch) is fits, (calibrated, time_s, plan)
