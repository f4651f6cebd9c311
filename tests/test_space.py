from __future__ import annotations

import optuna
import pytest

from hpo import config, space

FULL = dict(
    n_conv=3,
    filters_0=32,
    filters_1=64,
    filters_2=128,
    kernel_size=5,
    n_fc=2,
    fc_size=256,
    dropout=0.25,
    optimizer="sgd",
    lr=0.01,
    batch_size=128,
    weight_decay=1e-4,
)


def test_suggest_reads_every_parameter_through_the_trial():
    params = space.suggest(optuna.trial.FixedTrial(FULL), config.load("cnn").space).flat()
    assert params == FULL


def test_filters_exist_only_for_built_blocks():
    fixed = {**FULL, "n_conv": 1}
    params = space.suggest(optuna.trial.FixedTrial(fixed), config.load("cnn").space).flat()
    assert [k for k in params if k.startswith("filters_")] == ["filters_0"]


def test_missing_value_for_a_deeper_block_is_an_error():
    fixed = {k: v for k, v in FULL.items() if k != "filters_2"}
    with pytest.raises(ValueError):
        space.suggest(optuna.trial.FixedTrial(fixed), config.load("cnn").space)


def test_sampled_params_stay_inside_the_declared_space():
    cfg = config.load("cnn")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        params = space.suggest(study.ask(), cfg.space).flat()
        assert 1 <= params["n_conv"] <= 4
        assert all(params[f"filters_{i}"] in cfg.space["filters"].choices for i in range(params["n_conv"]))
        assert 1e-4 <= params["lr"] <= 1e-1
        assert params["optimizer"] in ("adam", "sgd", "rmsprop")
