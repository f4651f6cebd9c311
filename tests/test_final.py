"""The finalizer's choices and figures: members, the interval, and refusals before any training."""

from __future__ import annotations

import dataclasses
import time

import optuna
import pytest
import torch
from optuna.trial import TrialState, create_trial

from hpo import attrs
from hpo.errors import HpoError
from hpo.results.stats import wilson_interval
from hpo.search.join import choose_members
from hpo.settings import config


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


def tiny_with(**final) -> config.StudyConfig:
    cfg = config.load("tiny")
    return dataclasses.replace(cfg, final=dataclasses.replace(cfg.final, **final))


def test_the_lead_member_is_the_best_distinct_complete_trial_by_validation_value():
    study = study_of([(0.80, {"lr": 0.1}), (0.90, {"lr": 0.01}), (0.85, {"lr": 0.01}), (0.70, {"lr": 0.2})])
    chosen, why = choose_members(study, tiny_with(ensemble=1))
    assert [t.value for t in chosen] == [0.90]  # the pruned trial's 0.99 at epoch 1 is no final value
    assert why == "trial 1: the best COMPLETE trial by validation val_accuracy"


def test_a_lead_member_that_is_the_warm_start_says_the_search_found_nothing_better():
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)}

    def study_led_by(warm_value: float) -> optuna.Study:
        study = optuna.create_study(direction="maximize")
        origin = {attrs.WARM_START: "[warm_start] params[0]"}
        study.add_trial(create_trial(value=warm_value, params={"lr": 2e-3}, distributions=dist, user_attrs=origin))
        study.add_trial(create_trial(value=0.85, params={"lr": 0.1}, distributions=dist))
        pruned = create_trial(
            state=TrialState.PRUNED, params={"lr": 0.5}, distributions=dist, intermediate_values={1: 0.7}
        )
        study.add_trial(pruned)
        study.add_trial(create_trial(state=TrialState.FAIL, params={"lr": 0.3}, distributions=dist))
        return study

    chosen, why = choose_members(study_led_by(0.90), tiny_with(ensemble=1))
    assert [t.number for t in chosen] == [0]
    assert why == (
        "trial 0: the best COMPLETE trial by validation val_accuracy; trial 0 is the warm start the study file "
        "names ([warm_start] params[0]): no configuration of the search's own 2 finished trial(s) (1 complete, "
        "1 pruned) scored above it on validation"
    )
    chosen, why = choose_members(study_led_by(0.80), tiny_with(ensemble=1))
    assert [t.number for t in chosen] == [1] and why == "trial 1: the best COMPLETE trial by validation val_accuracy"


LABELS = torch.arange(100) % 10


def outputs(right: set[int], sure: float = 0.6, unsure: set[int] = frozenset()) -> torch.Tensor:
    """Probabilities over 10 classes for 100 images: `sure` of the right class on `right`, uniform on
    `unsure`, and `sure` of the next class on the others."""
    probs = torch.full((100, 10), (1 - sure) / 9)
    for i in range(100):
        if i in unsure:
            probs[i] = 0.1
        else:
            probs[i, int(LABELS[i]) if i in right else (int(LABELS[i]) + 1) % 10] = sure
    return probs


def study_with_outputs(tmp_path, rows: list[tuple[float, torch.Tensor | None]]):
    """COMPLETE trials of (validation value, validation outputs kept in a real artifact store)."""
    from hpo.search import artifacts

    store = artifacts.open_store(str(tmp_path / "artifacts"))
    study = optuna.create_study(direction="maximize")
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)}
    for i, (value, probs) in enumerate(rows):
        attrs = {}
        if probs is not None:
            payload = artifacts.torch_bytes({"probs": probs.half(), "images": 100, "seed": 0})
            attrs["val_outputs"] = artifacts.upload_bytes(store, study, "val-outputs.pt", payload)
        trial = create_trial(
            state=TrialState.COMPLETE, value=value, params={"lr": 0.01 * (i + 1)}, distributions=dist, user_attrs=attrs
        )
        study.add_trial(trial)
    return study, store


def test_a_member_joins_only_if_it_raises_the_ensembles_validation_accuracy(tmp_path):
    # The best is right on images 0-79. One with a subset of its hits, less sure, adds nothing; one
    # right on 20-99 and unsure on 0-19 mends 80-99, where the best is wrong, and loses nothing.
    best = outputs(set(range(80)))
    same = outputs(set(range(78)), sure=0.55)
    other = outputs(set(range(20, 100)), sure=0.9, unsure=set(range(20)))
    study, store = study_with_outputs(tmp_path, [(0.80, best), (0.78, same), (0.80 - 1e-3, other)])
    chosen, why = choose_members(study, tiny_with(ensemble=3), LABELS, store)
    assert [t.number for t in chosen] == [0, 2]
    assert why == (
        "2 of up to 3 member(s), trials 0, 2: each raised the ensemble's validation accuracy (80.00 -> 100.00 %); "
        "no other of the 3 best distinct trials raised it further"
    )


def test_the_ensembles_validation_accuracy_averages_its_members_outputs(tmp_path):
    from hpo.search.join import ensemble_accuracy

    best = outputs(set(range(80)))  # 80 % alone; the other mends 80-99 and is unsure where it is wrong
    other = outputs(set(range(20, 100)), sure=0.9, unsure=set(range(20)))
    study, store = study_with_outputs(tmp_path, [(0.80, best), (0.79, other), (0.5, None)])
    first, second, unkept = study.get_trials()
    assert ensemble_accuracy([first], LABELS, store) == pytest.approx(0.80)
    assert ensemble_accuracy([first, second], LABELS, store) == pytest.approx(1.00)
    assert ensemble_accuracy([first, unkept], LABELS, store) is None  # a member without outputs: no figure


def test_without_validation_outputs_the_best_trial_stands_alone_and_says_why(tmp_path):
    study, store = study_with_outputs(tmp_path, [(0.80, None), (0.79, outputs(set(range(50))))])
    chosen, why = choose_members(study, tiny_with(ensemble=2), LABELS, store)
    assert [t.number for t in chosen] == [0]
    assert "it has no validation outputs in the artifact store" in why


def test_the_reserve_asks_the_join_rule_for_the_members_it_keeps_now(tmp_path, caplog):
    """What the time budget's reserve counts while the search runs: the members the finalizer would
    choose now, on the same validation outputs; each file read once; none while nothing is COMPLETE."""
    from hpo.search.join import Reserved

    empty = optuna.create_study(direction="maximize")
    assert Reserved(empty, tiny_with(ensemble=3), LABELS, None)() is None
    best = outputs(set(range(80)))
    same = outputs(set(range(78)), sure=0.55)  # right only where the best is: it raises nothing
    study, store = study_with_outputs(tmp_path, [(0.80, best), (0.78, same)])
    reserved = Reserved(study, tiny_with(ensemble=3), LABELS, store)
    with caplog.at_level("INFO", logger="hpo.search.join"):
        assert [t.number for t in reserved()] == [0]
    assert "the finalizer's reserve counts trial(s) 0: the members its join rule keeps now" in caplog.text
    assert len(reserved.cache) == 2
    for pointer in list(reserved.cache):
        store.remove(pointer)  # read once: asking again reads the cache, not the store
    other = outputs(set(range(20, 100)), sure=0.9, unsure=set(range(20)))
    from hpo.search import artifacts

    payload = artifacts.torch_bytes({"probs": other.half(), "images": 100, "seed": 0})
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)}
    pointer = artifacts.upload_bytes(store, study, "val-outputs.pt", payload)
    joins = create_trial(value=0.79, params={"lr": 0.5}, distributions=dist, user_attrs={"val_outputs": pointer})
    study.add_trial(joins)  # a trial completes that mends the best one's mistakes: it joins
    caplog.clear()
    with caplog.at_level("INFO", logger="hpo.search.join"):
        assert [t.number for t in reserved()] == [0, 2]
    assert "counts trial(s) 0, 2" in caplog.text


def test_a_study_without_complete_trials_has_nothing_to_retrain():
    with pytest.raises(HpoError, match="has no COMPLETE trial yet"):
        choose_members(optuna.create_study(direction="maximize"), config.load("tiny"))


def test_timed_replan_fits_the_epochs_to_the_measured_ones_and_past_halfway_only_shrinks_them():
    from hpo.learn.train import EpochStats
    from hpo.search import budget
    from hpo.search.final_epochs import timed_replan

    def epochs(*seconds):
        return [EpochStats(i + 1, 1.0, 0.5, None, None, 0.1, s) for i, s in enumerate(seconds)]

    # 600 s budget, 300 s left: slack 12 s and the measured test passes (7 s) come off.
    deadline = budget.Deadline(at=time.time() + 300, time_s=600, set_at=time.time() - 300)
    replan = timed_replan(deadline, 7.0, epochs=36)
    left = 300 - 12 - 7
    assert replan(epochs(30.0, 10.0, 30.0), 36) == 3 + int(left // (1.05 * 30.0))  # the median epoch
    assert replan(epochs(*[10.0] * 19), 36) == 36  # past halfway, time to spare: never grown
    assert replan(epochs(*[2.0] * 19), 30) == 30
    # Past halfway, a slow spell in the latest epochs shrinks the rest to what still fits.
    assert replan(epochs(*[10.0] * 16, 30.0, 30.0, 30.0), 36) == 19 + int(left // (1.05 * 30.0))
    assert replan(epochs(*[10.0] * 18, 40.0), 36) == 36  # one slow epoch among the latest three is not a spell
    # Time to spare: grown back towards the 36 asked for, as far as its own epochs say they fit.
    assert replan(epochs(2.0, 2.0), 20) == 36
    assert replan(epochs(10.0), 20) == 1 + int(left // (1.05 * 10.0)) == 27


def test_the_test_passes_are_timed_for_every_member_and_view():
    """The finalizer scores each member twice (in the ensemble and alone) with each TTA view, in fp32;
    the time it keeps free for that is measured, not taken as a sixth of an epoch."""
    from types import SimpleNamespace

    import torch

    from hpo.learn.data import DeviceData
    from hpo.results.retrain import test_pass_seconds, test_passes
    from hpo.search import space

    cfg = config.load("tiny")  # flip TTA
    plain = dataclasses.replace(cfg, final=dataclasses.replace(cfg.final, tta="none"))
    assert (test_passes(plain, 1), test_passes(cfg, 1), test_passes(cfg, 2)) == (2, 4, 8)
    trial = SimpleNamespace(params=space.middle(cfg.space).flat())
    images = torch.randint(0, 255, (1024, 28, 28), dtype=torch.uint8)
    data = DeviceData(images, torch.arange(1024) % 10, torch.device("cpu"))
    assert test_pass_seconds([trial], cfg, data) > 0  # type: ignore[list-item]


def test_the_note_says_how_the_members_were_chosen_and_that_test_chose_nothing():
    from hpo.results.report import dashboard_note

    lead = create_trial(
        value=0.871, params={"lr": 0.01}, distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 0.1)}
    )
    lead.number = 3
    chosen_by = "2 of up to 3 member(s), trials 3, 5: each raised the ensemble's validation accuracy (87.10 -> 87.60 %)"
    metrics = {
        "best_trial": 3,
        "best_trial_value": 0.871,
        "test_accuracy": 0.93,
        "test_ci95": [0.925, 0.935],
        "ensemble": {
            "requested": 3,
            "models": 3,
            "trained": 2,
            "from_search": 1,
            "tta": "flip",
            "chosen_by": chosen_by,
            "shrunk": None,
            "gain_over_best_member": 0.004,
        },
        "members": [
            {
                "trial": 3,
                "value": 0.871,
                "seed": 1,
                "trained_by": "final-train",
                "test_accuracy": 0.926,
                "ci95": [0.92, 0.93],
            },
            {
                "trial": 5,
                "value": 0.866,
                "seed": 2,
                "trained_by": "final-train",
                "test_accuracy": 0.921,
                "ci95": [0.92, 0.93],
            },
            {
                "trial": 3,
                "value": 0.871,
                "seed": 7,
                "trained_by": "search",
                "test_accuracy": 0.924,
                "ci95": [0.92, 0.93],
            },
        ],
        "per_class_accuracy": {"Shirt": 0.8, "Bag": 0.99},
        "epochs": 30,
        "train_images": 60000,
        "test_images": 10000,
        "git_revision": None,
    }
    text = dashboard_note(config.load("tiny"), lead, metrics)
    assert "Trial 3, the best of the search, and 1 more, retrained from scratch" in text
    assert f"Members chosen on the validation split: {chosen_by}." in text
    assert "Nothing was chosen by test accuracy." in text
    assert "| validation val_accuracy of trial 3 | 0.8710 |" in text
    assert "| test accuracy of the ensemble of 3 |" in text
    assert "| member: trial 3 (val 0.8710, seed 7, its trial's own model) | 92.40 %" in text
    assert "also holds the 1 trial model(s) the search trained" in text


def test_a_trial_and_the_finalizer_train_the_same_recipe_from_a_study_file(monkeypatch):
    """Everything but the data and the seed: optimizer settings, schedule, warm-up, label smoothing,
    augmentation and the horizon, as each code path hands it to the one training loop."""
    from hpo.learn.data import DeviceData, TrialData
    from hpo.learn.devices import place
    from hpo.results import retrain
    from hpo.search import objective as objective_mod
    from hpo.search import space
    from hpo.search.session import Workspace

    cfg = config.load("cnn-quick")
    runs = []

    class Captured(Exception):
        pass

    def capture(model, train, val, run, *args, **kwargs):
        runs.append(run)
        raise Captured

    monkeypatch.setattr(objective_mod, "fit", capture)
    monkeypatch.setattr(retrain, "fit", capture)
    images = torch.randint(0, 255, (64, 28, 28), dtype=torch.uint8)
    data = DeviceData(images, torch.arange(64) % 10, torch.device("cpu"))
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    with pytest.raises(Captured):
        objective_mod.TrialRun(cfg, TrialData(data, data), Workspace(None, None, place("cpu", 1)), trial).run(None)
    frozen = create_trial(state=TrialState.COMPLETE, value=0.9, params=trial.params, distributions=trial.distributions)
    with pytest.raises(Captured):
        retrain._train_member(retrain.Retrain(frozen, 7), cfg, data, cfg.final.epochs)
    trial_run, final_run = runs
    assert trial_run.epochs == cfg.budget.epochs == cfg.final.epochs  # the final horizon is the trials' horizon
    assert dataclasses.replace(trial_run, seed=0) == dataclasses.replace(final_run, seed=0)
    assert trial_run.optimizer == space.suggest(optuna.trial.FixedTrial(trial.params), cfg.space).optimizer


PLAIN = {"n_conv": 1, "filters_0": 8, "kernel_size": 3, "n_fc": 1, "fc_size": 16, "dropout": 0.0}
PLAIN |= {"optimizer": "adam", "lr": 1e-3, "batch_size": 32, "weight_decay": 1e-4}


def fixed(params: dict) -> dict:
    """Distributions holding exactly `params`, for create_trial."""
    return {
        k: optuna.distributions.CategoricalDistribution([v])
        if isinstance(v, str)
        else optuna.distributions.FloatDistribution(v, v)
        if isinstance(v, float)
        else optuna.distributions.IntDistribution(v, v)
        for k, v in params.items()
    }


def test_a_chosen_trials_own_model_joins_and_a_foreign_or_missing_one_does_not(tmp_path, caplog):
    from hpo.learn import checkpoints
    from hpo.learn.data import DeviceData
    from hpo.learn.model import DynamicCNN
    from hpo.learn.params import TrialParams
    from hpo.results.members import trial_models
    from hpo.search import artifacts

    store = artifacts.open_store(str(tmp_path / "artifacts"))
    study = optuna.create_study(direction="maximize")
    train = DeviceData(torch.zeros(4, 28, 28, dtype=torch.uint8), torch.zeros(4), torch.device("cpu"))
    params = TrialParams.from_flat(PLAIN)
    trained = DynamicCNN(params.model.shaped(train.shape))

    def kept(study_name: str, flat: dict) -> str:
        state = {k: v.clone() for k, v in trained.state_dict().items()}
        payload = {"format": checkpoints.TRIAL_MODEL_FORMAT, "study": study_name, "params": flat, "seed": 42}
        return artifacts.upload_bytes(
            store, study, "trial-model.pt", artifacts.torch_bytes(payload | {"state_dict": state})
        )

    cfg = config.load("tiny")
    rows = [
        {attrs.TRIAL_MODEL: kept("tiny", PLAIN)},  # its own: joins
        {attrs.TRIAL_MODEL: kept("another", PLAIN)},  # another study's file
        {attrs.TRIAL_MODEL: kept("tiny", PLAIN | {"fc_size": 32})},  # another configuration's weights
        {},  # kept none (not among the best when it ended, or no artifact store)
    ]
    for value, user_attrs in zip([0.9, 0.8, 0.7, 0.6], rows, strict=True):
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE, value=value, params=PLAIN, distributions=fixed(PLAIN), user_attrs=user_attrs
            )
        )
    members = trial_models(study.trials, cfg, train, store)
    assert [(m.trial.number, m.seed, m.trained_by, m.train_s) for m in members] == [(0, 42, "search", 0.0)]
    for name, weights in trained.state_dict().items():
        assert torch.equal(members[0].model.state_dict()[name], weights)
    assert "trial 1's trial-model.pt cannot be reused (not a hpo-trial-model/1 file of study 'tiny')" in caplog.text
    assert "trial 2's trial-model.pt cannot be reused (its params are not the trial's)" in caplog.text
    assert trial_models(study.trials, cfg, train, None) == []  # no artifact store: each member is retrained alone
