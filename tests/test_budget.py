"""The time budget: durations, cost estimates from measured epochs, and the start decision."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from hpo import attrs
from hpo.search import budget
from hpo.search.budget import EpochCost, Plan
from hpo.search.horizon import fit_horizon, minimum_budget, outlook, search_holds
from hpo.settings import config
from hpo.settings.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    "text, seconds", [("10m", 600), ("1h30m", 5400), ("90s", 90), ("45", 45), ("1.5h", 5400), (" 2m 30s ", 150)]
)
def test_durations_people_write(text, seconds):
    assert parse_duration(text) == seconds


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
        parse_duration(text)


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
                    attrs.TRAIN_IMAGES: 1000,
                    attrs.VAL_IMAGES: 300,
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
        p
        * (
            budget.DATASET_IMAGES
            + budget.test_passes("flip", trial_models=True) * budget.FP32_EVAL_SHARE * budget.TEST_IMAGES
        )
        for p in per_image
    )
    assert reserve == pytest.approx(expected)
    # With more cores than the trials had, the finalizer is expected faster, never slower.
    assert budget.final_reserve(study, cfg, 4, costs, None) < reserve


def test_final_reserve_counts_at_most_the_ensemble_and_one_typical_member_before_any_completes():
    cfg = config.load("tiny")  # ensemble 2
    study = study_with([1.0, 2.0, 4.0])  # the best two are the slower two (values rise with the index)
    costs = budget.measured(study)
    each = (
        budget.DATASET_IMAGES
        + budget.test_passes("flip", trial_models=True) * budget.FP32_EVAL_SHARE * budget.TEST_IMAGES
    )
    expected = sum(c.per_image_s() * each for c in costs[1:])
    assert budget.final_reserve(study, cfg, 1, costs, None) == pytest.approx(expected)
    # Nothing complete yet and nothing reported: one typical member (the 90th percentile of the epochs
    # measured), not two.
    empty = optuna.create_study(direction="maximize")
    assert budget.final_reserve(empty, cfg, 1, costs, None) == pytest.approx(costs[2].per_image_s() * each)


def test_final_reserve_counts_the_members_the_join_rule_keeps_when_given_them():
    """A 60-minute run reserved 1,156 s for three members (the three best COMPLETE trials) where the
    finalizer's join rule kept two and took 480 s: 19 % of the hour went unused. Given the members
    the rule keeps now, the reserve counts those, whichever they are, and no others."""
    cfg = config.load("tiny")  # ensemble 2
    study = study_with([1.0, 2.0, 4.0])  # trial 2 is the best, trial 0 the worst
    costs = budget.measured(study)
    trials = study.get_trials()
    each = (
        budget.DATASET_IMAGES
        + budget.test_passes("flip", trial_models=True) * budget.FP32_EVAL_SHARE * budget.TEST_IMAGES
    )
    alone = budget.final_reserve(study, cfg, 1, costs, None, chosen=[trials[2]])
    assert alone == pytest.approx(costs[2].per_image_s() * each)
    assert alone < budget.final_reserve(study, cfg, 1, costs, None)  # the two best, as before
    # The rule may keep a trial below the best two (it raised the ensemble more): its cost counts.
    mixed = budget.final_reserve(study, cfg, 1, costs, None, chosen=[trials[2], trials[0]])
    assert mixed == pytest.approx((costs[2].per_image_s() + costs[0].per_image_s()) * each)
    # Both decisions read it: a smaller reserve lets a trial start later.
    deadline = budget.Deadline(at=10_000.0, time_s=600.0, set_at=1000.0)
    now = 10_000.0 - budget.final_reserve(study, cfg, 1, costs, None) - budget.slack_s(600.0) + 1.0
    assert not budget.plan_trial(study, cfg, deadline, 1, now=now).fits
    assert budget.plan_trial(study, cfg, deadline, 1, now=now, chosen=[trials[2]]).fits
    ask = budget.NextEpoch(None, 100.0, at=now)  # trial 1's share of the reserve is about 150 s
    assert not budget.plan_epoch(study, cfg, deadline, 1, ask).fits
    assert budget.plan_epoch(study, cfg, deadline, 1, ask, chosen=[trials[2]]).fits


def test_before_any_trial_completes_the_leading_trial_stands_in_for_the_member():
    """A quick start lost its only full-horizon trial: slow configurations pruned after one epoch
    made the typical member 338 s where the warm start's own final run needed about 205, so the
    clock stopped the warm start after 5 of 7 epochs and nothing completed."""
    cfg = config.load("tiny")
    study = optuna.create_study(direction="maximize")
    written = {attrs.TRAIN_IMAGES: 1000, attrs.VAL_IMAGES: 300, attrs.THREADS: 1}

    def add(state, values, seconds):
        history = [{"epoch": e, "seconds": seconds} for e in values]
        study.add_trial(
            create_trial(
                state=state, params={}, intermediate_values=values, user_attrs={**written, attrs.HISTORY: history}
            )
        )

    add(TrialState.PRUNED, {1: 0.60}, 30.0)  # slow and weak
    add(TrialState.PRUNED, {1: 0.70}, 25.0)
    add(TrialState.RUNNING, {1: 0.80, 2: 0.85}, 10.0)  # the warm start, leading
    costs = budget.measured(study)
    each = (
        budget.DATASET_IMAGES
        + budget.test_passes("flip", trial_models=True) * budget.FP32_EVAL_SHARE * budget.TEST_IMAGES
    )
    lead = next(c for c in costs if c.epoch_s == 10.0)
    assert budget.final_reserve(study, cfg, 1, costs, None) == pytest.approx(lead.per_image_s() * each)
    assert budget.leading_trial(study, maximize=True).intermediate_values == {1: 0.80, 2: 0.85}


def test_a_trial_starts_when_its_first_epoch_fits_and_stops_once_it_cannot_complete_before_the_reserve():
    cfg = config.load("tiny")  # 3 epochs a trial; 1 final epoch per member
    study = study_with([10.0])  # 10 s epochs of 1,000 + 300 images
    deadline = budget.Deadline(at=1600.0, time_s=600.0, set_at=1000.0)
    reserve = budget.final_reserve(study, cfg, 1, budget.measured(study), None) + budget.slack_s(600.0)
    first = budget.FIRST_EPOCHS * 10.0 + budget.TRIAL_OVERHEAD_S
    latest_start = 1600.0 - reserve - first
    assert budget.plan_trial(study, cfg, deadline, 1, now=latest_start - 0.1).fits
    assert not budget.plan_trial(study, cfg, deadline, 1, now=latest_start + 0.1).fits
    # A running trial: its next epoch (its own slowest, 10 s) must end before the reserve.
    ok = budget.plan_epoch(study, cfg, deadline, 1, budget.NextEpoch(None, 10.0, at=1600.0 - reserve - 10.1))
    late = budget.plan_epoch(study, cfg, deadline, 1, budget.NextEpoch(None, 10.0, at=1600.0 - reserve - 9.9))
    assert ok.fits and not late.fits
    assert late.describe().startswith("its last epoch needs about 10s and the finalizer")
    # With epochs left, all of them must end before the reserve (the next at its slowest epoch, 10 s,
    # the others at its median, 8 s): a trial that cannot complete is no finalist, so it stops now.
    ask = budget.NextEpoch(None, 10.0, epochs_left=3, median_s=8.0)
    assert ask.rest_s() == 26.0
    assert budget.plan_epoch(study, cfg, deadline, 1, dataclasses.replace(ask, at=1600.0 - reserve - 26.1)).fits
    cannot = budget.plan_epoch(study, cfg, deadline, 1, dataclasses.replace(ask, at=1600.0 - reserve - 25.9))
    assert not cannot.fits  # though its next epoch alone would fit
    assert cannot.describe().startswith("its remaining 3 epochs need about 26s and the finalizer")


def test_plan_fits_only_when_trial_and_reserve_end_before_the_deadline():
    assert Plan(decided_at=0, estimate_s=10, reserve_s=20, deadline=30).fits
    assert not Plan(decided_at=0.5, estimate_s=10, reserve_s=20, deadline=30).fits


def test_deadline_is_a_study_attribute_every_process_reads():
    study = optuna.create_study()
    set_at = budget.set_deadline(study, 600, now=1000.0)
    assert budget.get_deadline(study) == set_at == budget.Deadline(at=1600.0, time_s=600, set_at=1000.0)
    assert set_at.left(now=1500.0) == 100.0
    assert budget.describe_deadline(set_at, now=1500.0)["left_s"] == 100.0


def test_minimum_budget_is_the_shortest_in_which_a_first_trial_completes_and_a_member_trains():
    cfg = config.load("tiny")  # 3 trial epochs, members of 1 final epoch
    cost = EpochCost(epoch_s=1.0, train_images=1000, val_images=300, threads=1)
    for calibrated in (True, False):
        needed = minimum_budget(cfg, cost, 1, calibrated=calibrated, start_s=10.0)
        costs = [] if calibrated else [cost]
        whole = budget.trial_estimate(cfg, costs, cost if calibrated else None)  # the whole horizon
        member = budget.member_estimate(cost, cfg.final.epochs, 1, cfg.final)
        for time_s, fits in ((needed, True), (needed - 2.0, False)):
            assert (10.0 + whole + member + budget.slack_s(time_s) <= time_s) is fits, (calibrated, time_s)
    # A warm start's calibration is of the first trial itself: once, not doubled.
    warm = dataclasses.replace(cfg, warm_start=dataclasses.replace(cfg.warm_start, params=({"n_conv": 1},)))
    once = minimum_budget(warm, cost, 1, calibrated=True, start_s=10.0)
    assert once == minimum_budget(warm, cost, 1, calibrated=False, start_s=10.0)
    assert once < minimum_budget(cfg, cost, 1, calibrated=True, start_s=10.0)


def test_the_calibrated_first_trial_is_the_warm_start_completed_from_the_middle_of_the_space():
    from hpo.search import space

    cfg = config.load("cnn-quick")
    first = space.first(cfg.space, cfg.warm_start.params)
    assert first.model.filters == (32, 64) and first.optimizer.name == "adam" and first.optimizer.lr == 2e-3
    assert first.model.kernel_size == 3 and first.model.residual is False
    assert space.first(cfg.space) == space.middle(cfg.space)


def test_while_nothing_is_complete_the_leading_trial_runs_on_if_its_epochs_and_one_final_epoch_fit():
    """Stopping the only finalist in sight leaves the finalizer nothing to retrain (a quick start
    lost its warm start one epoch short of the horizon that way)."""
    cfg = config.load("tiny")
    cfg = dataclasses.replace(cfg, final=dataclasses.replace(cfg.final, epochs=3))  # the horizon, as shipped
    study = optuna.create_study(direction="maximize")
    written = {attrs.TRAIN_IMAGES: 1000, attrs.VAL_IMAGES: 300, attrs.THREADS: 1}
    history = [{"epoch": 1, "seconds": 10.0}, {"epoch": 2, "seconds": 10.0}]
    study.add_trial(
        create_trial(
            state=TrialState.PRUNED,
            params={},
            intermediate_values={1: 0.5},
            user_attrs={**written, attrs.HISTORY: history[:1]},
        )
    )
    lead = study.ask()
    for step, value in ((1, 0.7), (2, 0.8)):
        lead.report(value, step)
    for key, value in {**written, attrs.HISTORY: history}.items():
        lead.set_user_attr(key, value)
    deadline = budget.Deadline(at=1600.0, time_s=600.0, set_at=1000.0)
    cost = budget.trial_cost(study.get_trials()[1])
    one = budget.member_estimate(cost, 1, 1, cfg.final) + budget.slack_s(600.0)
    # One epoch left: it may end as late as one final epoch before the deadline.
    assert budget.plan_epoch(study, cfg, deadline, 1, budget.NextEpoch(lead.number, 10.0, at=1600.0 - one - 10.1)).fits
    late = budget.plan_epoch(study, cfg, deadline, 1, budget.NextEpoch(lead.number, 10.0, at=1600.0 - one - 9.9))
    assert not late.fits and late.describe().startswith("its last epoch needs about 10s")
    # Another trial gets no such leave: the whole reserve applies to it.
    other = budget.plan_epoch(study, cfg, deadline, 1, budget.NextEpoch(lead.number + 1, 10.0, at=1600.0 - one - 10.1))
    assert not other.fits
    # Once a trial is COMPLETE, the leader is a trial like any other.
    study.tell(lead, 0.8)
    assert not budget.plan_epoch(
        study, cfg, deadline, 1, budget.NextEpoch(lead.number, 10.0, at=1600.0 - one - 10.1)
    ).fits


def test_fit_horizon_is_the_longest_horizon_whose_first_trial_and_final_run_fit():
    cfg = config.load("cnn-quick")  # 6 epochs, the final run trains the horizon
    cost = EpochCost(epoch_s=60.0, train_images=54000, val_images=6000, threads=1)
    needs = {e: minimum_budget(config.with_horizon(cfg, e), cost, 2) for e in range(1, 7)}
    assert needs[6] > 600.0 >= needs[5]  # the AMD EPYC's reading: 6 epochs do not fit 10 minutes, 5 do
    fitted = fit_horizon(cfg, cost, 2, 600.0)
    assert fitted is not None and fitted.budget.epochs == 5 and fitted.final.epochs == 5
    assert fitted.space == cfg.space and fitted.pruner == cfg.pruner
    assert fit_horizon(cfg, cost, 2, needs[1] - 1.0) is None  # not even one epoch: refused as before


def test_a_faster_machine_fits_a_longer_horizon_where_the_time_holds_the_finalists_and_one_trial_more():
    shipped = config.load("cnn-quick")  # 6 epochs up to max_epochs 27, one final member
    assert shipped.budget.max_epochs == 27
    grows = dataclasses.replace(shipped, budget=dataclasses.replace(shipped.budget, max_epochs=200))
    cfg = dataclasses.replace(grows, budget=dataclasses.replace(grows.budget, max_epochs=None))
    fast = EpochCost(epoch_s=15.0, train_images=54000, val_images=6000, threads=1)  # 4x the EPYC's speed
    fitted = fit_horizon(grows, fast, 2, 600.0, workers=2)
    epochs = fitted.budget.epochs
    assert 6 < epochs < 200 and fitted.final.epochs == epochs
    # The longest such horizon: it holds ensemble + 1 = 2 whole trials across the 2 workers, one more does not.
    assert search_holds(fitted, fast, 2, 600.0, 2) >= 2
    assert search_holds(config.with_horizon(grows, epochs + 1), fast, 2, 600.0, 2) < 2
    # Twice the budget, a longer horizon; one worker, a shorter one; without max_epochs, the file's 6.
    assert fit_horizon(grows, fast, 2, 1200.0, workers=2).budget.epochs > epochs
    assert fit_horizon(grows, fast, 2, 600.0, workers=1).budget.epochs < epochs
    assert fit_horizon(cfg, fast, 2, 600.0, workers=2) == cfg
    # The cap holds, and a slow machine still shrinks the horizon (the EPYC's reading above).
    capped = dataclasses.replace(cfg, budget=dataclasses.replace(cfg.budget, max_epochs=8))
    assert fit_horizon(capped, fast, 2, 600.0, workers=2).budget.epochs == 8
    slow = EpochCost(epoch_s=60.0, train_images=54000, val_images=6000, threads=1)
    assert fit_horizon(grows, slow, 2, 600.0, workers=2).budget.epochs == 5
    # The shipped cap: an hour on the fast machine would hold far more than 27 epochs; it trains 27.
    assert fit_horizon(grows, fast, 2, 3600.0, workers=2).budget.epochs > 27
    assert fit_horizon(shipped, fast, 2, 3600.0, workers=2).budget.epochs == 27


def test_a_final_run_set_apart_from_the_horizon_is_only_capped_by_the_fitted_one():
    cfg = config.load("tiny")  # 3 trial epochs, 1 final epoch
    assert config.with_horizon(cfg, 2).final.epochs == 1
    longer = dataclasses.replace(cfg, final=dataclasses.replace(cfg.final, epochs=5))
    assert config.with_horizon(longer, 2).final.epochs == 2


def test_the_outlook_counts_whole_trials_in_the_time_left_beside_the_finalizers_reserve():
    cfg = config.load("tiny")  # 3 epochs, ensemble 2
    calibrated = EpochCost(epoch_s=1.0, train_images=1000, val_images=300, threads=1)
    fresh = optuna.create_study(direction="maximize")
    fresh.set_user_attr(attrs.CALIBRATION, dataclasses.asdict(calibrated))
    # Nothing measured yet: the calibration as it is (not doubled), and [final] ensemble members reserved.
    trial_s = 1.0 * 3 + budget.TRIAL_OVERHEAD_S
    reserve = 2 * budget.member_estimate(calibrated, cfg.final.epochs, 1, cfg.final)
    left = 600.0
    whole = 2 * (left - reserve - budget.slack_s(left)) / trial_s
    line = outlook(fresh, cfg, 2, 1, left)
    assert line.startswith(f"the 10m00s left hold about {whole:.1f} whole trial(s) of 3 epochs (about 6s each)")
    assert whole > 100
    assert "across 2 worker(s)" in line and f"besides the finalizer's {format_duration(reserve)}" in line
    # A budget that the reserve fills holds none, and says so rather than a negative count.
    assert "about 0.0 whole trial(s)" in outlook(fresh, cfg, 2, 1, reserve)
    # Measured epochs replace the calibration; a study with neither has no outlook.
    measured = study_with([5.0, 5.0])
    assert "(about 18s each)" in outlook(measured, cfg, 2, 1, left)
    assert outlook(optuna.create_study(), cfg, 2, 1, left) is None


def test_a_trial_that_took_a_leaving_workers_cores_is_costed_at_its_new_threads():
    """A quick start's warm start trained its first epochs on 1 thread beside the other worker and
    the rest on 2 once that worker left (devices.CpuShare): the finalizer's reserve and the trial's
    own next epochs are read from the epochs at 2 threads, not from the slower ones before."""
    rows = [{"epoch": 1, "seconds": 20.0, "threads": 1}, {"epoch": 2, "seconds": 22.0, "threads": 1}]
    rows += [{"epoch": 3, "seconds": 12.0, "threads": 2}, {"epoch": 4, "seconds": 11.0, "threads": 2}]
    assert budget.current_epochs(rows) == ([12.0, 11.0], 2)
    assert budget.current_epochs(rows[:2]) == ([20.0, 22.0], 1)
    # A history written before threads were recorded, or a resumed trial's first rows, count as before.
    assert budget.current_epochs([{"epoch": 1, "seconds": 5.0}]) == ([5.0], None)
    trial = create_trial(
        state=TrialState.COMPLETE,
        value=0.9,
        params={},
        user_attrs={attrs.HISTORY: rows, attrs.TRAIN_IMAGES: 1000, attrs.VAL_IMAGES: 300, attrs.THREADS: 1},
    )
    assert budget.trial_cost(trial) == EpochCost(11.5, 1000, 300, 2)
    # Costed at 2 threads, a finalizer on 2 threads gets no speed-up on top of it.
    cfg = config.load("tiny")
    one_thread = dataclasses.replace(budget.trial_cost(trial), epoch_s=21.0, threads=1)
    assert budget.member_estimate(budget.trial_cost(trial), 1, 2, cfg.final) < budget.member_estimate(
        one_thread, 1, 2, cfg.final
    )
