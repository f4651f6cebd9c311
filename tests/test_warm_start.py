"""Warm start: a new study's first trials come from the file or from another study's best."""

from __future__ import annotations

import dataclasses
import logging

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from hpo.errors import ConfigError
from hpo.search import storage as storage_mod
from hpo.search import study as study_mod
from hpo.settings import config
from hpo.settings.config import WarmStart

GOOD = {
    "n_conv": 2,
    "filters_0": 16,
    "filters_1": 8,
    "kernel_size": 3,
    "n_fc": 1,
    "fc_size": 32,
    "dropout": 0.1,
    "optimizer": "adam",
    "lr": 0.01,
    "batch_size": 64,
    "weight_decay": 1e-4,
}


def tiny(name: str, **warm) -> config.StudyConfig:
    return dataclasses.replace(config.load("tiny"), name=name, warm_start=WarmStart(**warm))


@pytest.fixture
def store(tmp_path):
    return storage_mod.open_storage(f"sqlite:///{tmp_path / 'w.db'}")


def queued(study: optuna.Study) -> list[tuple[dict, str]]:
    return [
        (t.system_attrs["fixed_params"], t.user_attrs["warm_start"])
        for t in study.get_trials(states=(TrialState.WAITING,))
    ]


def finished_source(store, values_and_params: list[tuple[float, dict]]) -> None:
    source, _ = study_mod.create_or_load(store, tiny("source"))
    dists = {
        **{k: optuna.distributions.CategoricalDistribution([v]) for k, v in GOOD.items()},
        "lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True),
    }  # wider than tiny's
    for value, changes in values_and_params:
        source.add_trial(
            create_trial(state=TrialState.COMPLETE, value=value, params={**GOOD, **changes}, distributions=dists)
        )


def test_file_configurations_are_queued_first_in_order(store):
    study, _ = study_mod.create_or_load(store, tiny("warm", params=(GOOD, {"lr": 0.05})))
    assert queued(study) == [(GOOD, "[warm_start] params[0]"), ({"lr": 0.05}, "[warm_start] params[1]")]
    # Loading it again queues nothing more.
    again, _ = study_mod.create_or_load(store, tiny("warm", params=(GOOD, {"lr": 0.05})))
    assert len(again.trials) == 2


def test_the_best_fitting_trials_of_another_study_are_queued_and_the_rest_reported(store, caplog):
    finished_source(
        store,
        [(0.80, {"lr": 0.02}), (0.90, {"lr": 0.5}), (0.85, {"lr": 0.03}), (0.70, {"lr": 0.04}), (0.86, {"lr": 0.03})],
    )
    with caplog.at_level(logging.WARNING):
        study, _ = study_mod.create_or_load(store, tiny("warm", from_study="source", top=2))
    # 0.90 has lr 0.5, outside tiny's 1e-3..1e-1: skipped and named; 0.86 repeats 0.85's configuration.
    assert [(p["lr"], origin) for p, origin in queued(study)] == [
        (0.03, "study source trial 4 (val_accuracy 0.8600)"),
        (0.02, "study source trial 0 (val_accuracy 0.8000)"),
    ]
    assert (
        "trial 1 of study 'source' is not a point of this space (lr = 0.5, but the space allows from 0.001 "
        "to 0.1); skipped" in caplog.text
    )


def test_a_missing_source_study_is_refused_before_anything_is_written(store):
    study_mod.create_or_load(store, tiny("other"))
    with pytest.raises(
        ConfigError,
        match=r"\[warm_start\] from = 'nope': no such study in this storage "
        r"\(it holds: other\)",
    ):
        study_mod.create_or_load(store, tiny("warm", from_study="nope"))
    assert not study_mod.exists(store, "warm")


def test_a_source_with_another_metric_is_refused(store):
    loss = dataclasses.replace(config.load("tiny"), name="by-loss", metric="val_loss", direction="minimize")
    study_mod.create_or_load(store, loss)
    with pytest.raises(ConfigError, match="that study minimizes val_loss, this one maximizes val_accuracy"):
        study_mod.create_or_load(store, tiny("warm", from_study="by-loss"))
    assert not study_mod.exists(store, "warm")


@pytest.mark.parametrize(
    "params, message",
    [
        ({"lr": 0.5}, "params[0] is not a point of [space]: lr = 0.5, but the space allows from 0.001 to 0.1"),
        ({"filters_2": 8}, "params[0] is not a point of [space]: filters_2 is not a parameter of this space"),
        ({"optimizer": "lion"}, "optimizer = 'lion', but the space allows one of ['adam', 'sgd', 'rmsprop']"),
    ],
)
def test_file_configurations_outside_the_space_are_refused(params, message):
    raw = config.load("tiny").to_dict()
    raw["warm_start"] = {"params": [params]}
    with pytest.raises(ConfigError) as e:
        config.from_dict(raw, "tiny.toml")
    assert message in str(e.value) and "[warm_start]" in str(e.value)
