"""The finalizer's choices and figures: members, the interval, and refusals before any training."""

from __future__ import annotations

import dataclasses
import time

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from hpo import config
from hpo.errors import HpoError
from hpo.final import choose_members, wilson_interval


def test_wilson_interval_known_values():
    # Textbook values: 50 of 100 gives 40.38-59.62 %; 0 of 10 gives 0-27.75 %.
    low, high = wilson_interval(50, 100)
    assert (round(low, 4), round(high, 4)) == (0.4038, 0.5962)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and round(high, 4) == 0.2775
    # On the 10,000 test images, 93.5 % is known to within about half a point either way.
    low, high = wilson_interval(9350, 10000)
    assert (round(low, 4), round(high, 4)) == (0.9300, 0.9397)


def study_of(values_and_params: list[tuple[float, dict]]) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)}
    for value, params in values_and_params:
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=value, params=params, distributions=dist))
    study.add_trial(
        create_trial(state=TrialState.PRUNED, params={"lr": 0.5}, distributions=dist, intermediate_values={1: 0.99})
    )
    return study


def with_gap(gap: float) -> config.StudyConfig:
    cfg = config.load("tiny")
    return dataclasses.replace(cfg, final=dataclasses.replace(cfg.final, member_gap=gap))


def test_members_are_the_best_distinct_complete_trials_by_validation_value():
    study = study_of([(0.80, {"lr": 0.1}), (0.90, {"lr": 0.01}), (0.85, {"lr": 0.01}), (0.70, {"lr": 0.2})])
    chosen, gated = choose_members(study, with_gap(1.0), 3)
    assert [t.value for t in chosen] == [0.90, 0.80, 0.70] and gated is None  # 0.85 repeats 0.90's params


def test_members_far_below_the_best_are_left_out_and_the_reason_given():
    study = study_of([(0.930, {"lr": 0.1}), (0.925, {"lr": 0.01}), (0.905, {"lr": 0.2}), (0.90, {"lr": 0.3})])
    chosen, gated = choose_members(study, with_gap(0.01), 3)
    assert [t.value for t in chosen] == [0.930, 0.925]
    assert gated == (
        "ensemble shrank from 3 to 2 member(s): only 2 of the 3 best distinct trials score within "
        "member_gap 0.01 of the best val_accuracy 0.9300"
    )
    chosen, gated = choose_members(study, with_gap(0.0), 2)
    assert [t.value for t in chosen] == [0.930] and "from 2 to 1" in gated


def test_fill_seeds_gives_the_places_the_gap_leaves_to_the_best_trial_and_says_so():
    study = study_of([(0.930, {"lr": 0.1}), (0.925, {"lr": 0.01}), (0.905, {"lr": 0.2})])
    cfg = with_gap(0.01)
    cfg = dataclasses.replace(cfg, final=dataclasses.replace(cfg.final, fill="seeds"))
    chosen, why = choose_members(study, cfg, 3)
    assert [t.value for t in chosen] == [0.930, 0.925, 0.930]
    assert why == (
        '1 of the 3 member places went to the first member, trial 0, with further seeds ([final] fill = "seeds"): '
        "only 2 of the 3 best distinct trials score within member_gap 0.01 of the best val_accuracy 0.9300"
    )
    # More places than distinct trials is no error with seeds to fill them.
    chosen, _ = choose_members(study_of([(0.90, {"lr": 0.1})]), cfg, 3)
    assert [t.number for t in chosen] == [0, 0, 0]


def timed_study(rows: list[tuple[float, float]]) -> optuna.Study:
    """COMPLETE trials of (value, seconds per 1,000-image epoch)."""
    study = optuna.create_study(direction="maximize")
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)}
    for i, (value, seconds) in enumerate(rows):
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE,
                value=value,
                params={"lr": 0.01 * (i + 1)},
                distributions=dist,
                user_attrs={"history": [{"seconds": seconds}], "train_images": 1000, "val_images": 0},
            )
        )
    return study


def test_within_a_time_budget_the_fastest_trial_tied_with_the_best_leads():
    study = timed_study([(0.8685, 5.0), (0.8707, 8.0), (0.8500, 1.0)])  # trial 2 is fastest but not tied
    cfg = config.load("tiny")
    cfg = dataclasses.replace(cfg, final=dataclasses.replace(cfg.final, speed_tie=0.005, member_gap=0.01))
    chosen, why = choose_members(study, cfg, 1, timed=True)
    assert [t.number for t in chosen] == [0]
    assert why == (
        "trial 0 leads the final run: its val_accuracy 0.8685 is within speed_tie 0.005 of the best, "
        "trial 1's 0.8707, and it trains 1.60x as fast, so it gets more epochs in the time left"
    )
    # Without a time budget epochs are fixed, so speed buys nothing: the best leads.
    assert [t.number for t in choose_members(study, cfg, 1, timed=False)[0]] == [1]
    # Off by default.
    assert [t.number for t in choose_members(study, config.load("tiny"), 1, timed=True)[0]] == [1]


def test_an_ensemble_larger_than_the_distinct_trials_is_refused_with_the_count():
    cfg = config.load("tiny")
    study = study_of([(0.80, {"lr": 0.1}), (0.90, {"lr": 0.1})])
    with pytest.raises(
        HpoError,
        match=r"ensemble = 2, but study 'tiny' has only 1 distinct COMPLETE trial\(s\). "
        r"Lower ensemble to at most 1",
    ):
        choose_members(study, cfg, 2)


def test_a_study_without_complete_trials_has_nothing_to_retrain():
    with pytest.raises(HpoError, match="has no COMPLETE trial yet"):
        choose_members(optuna.create_study(direction="maximize"), config.load("tiny"), 1)


def test_timed_replan_fits_the_epochs_to_the_measured_ones_in_the_first_half_only():
    from hpo import budget
    from hpo.final import timed_replan
    from hpo.train import EpochStats

    def epochs(*seconds):
        return [EpochStats(i + 1, 1.0, 0.5, None, None, 0.1, s) for i, s in enumerate(seconds)]

    # 600 s budget, 300 s left: slack 12 s and the measured test passes (7 s) come off.
    deadline = budget.Deadline(at=time.time() + 300, time_s=600, set_at=time.time() - 300)
    replan = timed_replan(deadline, 7.0, epochs=36, most=48)
    left = 300 - 12 - 7
    assert replan(epochs(10.0, 10.0), 20) == 2 + int(left // (1.05 * 10.0))  # up to [final] epochs (36)
    assert replan(epochs(30.0, 10.0, 30.0), 20) == 3 + int(left // (1.05 * 30.0))  # the median epoch
    assert replan(epochs(*[10.0] * 11), 20) == 20  # past halfway: left alone
    grown = replan(epochs(2.0, 2.0), 20)
    assert 36 < grown <= 48  # time to spare grows it up to max_epochs


def test_the_test_passes_are_timed_for_every_member_and_view():
    """The finalizer scores each member twice (in the ensemble and alone) with each TTA view, in fp32;
    the time it keeps free for that is measured, not taken as a sixth of an epoch."""
    from types import SimpleNamespace

    import torch

    from hpo import space
    from hpo.data import DeviceData
    from hpo.final import test_pass_seconds, test_passes

    cfg = config.load("tiny")  # flip TTA
    plain = dataclasses.replace(cfg, final=dataclasses.replace(cfg.final, tta="none"))
    assert (test_passes(plain, 1), test_passes(cfg, 1), test_passes(cfg, 2)) == (2, 4, 8)
    trial = SimpleNamespace(params=space.middle(cfg.space).flat())
    images = torch.randint(0, 255, (1024, 28, 28), dtype=torch.uint8)
    data = DeviceData(images, torch.arange(1024) % 10, torch.device("cpu"))
    assert test_pass_seconds([trial], cfg, data) > 0  # type: ignore[list-item]


def test_the_note_does_not_call_a_speed_tie_lead_the_best_trial():
    from hpo.final import note

    lead = create_trial(
        value=0.868, params={"lr": 0.01}, distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 0.1)}
    )
    lead.number = 0
    metrics = {
        "best_trial": 3,
        "best_trial_value": 0.871,
        "lead_trial": 0,
        "lead_trial_value": 0.868,
        "test_accuracy": 0.93,
        "test_ci95": [0.925, 0.935],
        "ensemble": {"requested": 1, "trained": 1, "tta": "flip", "shrunk": None, "gain_over_best_member": 0.0},
        "members": [{"trial": 0, "value": 0.868, "seed": 1, "test_accuracy": 0.93, "ci95": [0.925, 0.935]}],
        "per_class_accuracy": {"Shirt": 0.8, "Bag": 0.99},
        "epochs": 30,
        "train_images": 60000,
        "test_images": 10000,
        "git_revision": None,
    }
    text = note(config.load("tiny"), lead, metrics)
    assert "Trial 0, within [final] speed_tie of the search's best (trial 3, val_accuracy 0.8710)" in text
    assert "the best of the search" not in text and "| validation val_accuracy of trial 0 | 0.8680 |" in text
    metrics.update(best_trial=0, best_trial_value=0.868)
    assert "Trial 0, the best of the search" in note(config.load("tiny"), lead, metrics)
