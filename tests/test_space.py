from __future__ import annotations

import optuna
import pytest

from hpo.search import space
from hpo.settings import config
from hpo.settings.dimensions import space_problems
from hpo.settings.writer import to_toml

# A space with one width per block (no growth) and one shared learning-rate range.
PER_BLOCK = """
name = "per-block"
[space]
n_conv       = { low = 1, high = 4 }
filters      = { choices = [32, 48, 64, 96, 128] }
kernel_size  = { choices = [3, 5] }
n_fc         = { low = 1, high = 3 }
fc_size      = { low = 64, high = 1024, log = true }
dropout      = { low = 0.0, high = 0.6 }
optimizer    = { choices = ["adam", "sgd", "rmsprop"] }
lr           = { low = 1e-4, high = 1e-1, log = true }
batch_size   = { choices = [64, 128, 256, 512] }
weight_decay = { low = 1e-6, high = 1e-2, log = true }
"""

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


def per_block() -> dict:
    import tomllib

    return config.parse(tomllib.loads(PER_BLOCK), "per-block.toml").space


def test_suggest_reads_every_parameter_through_the_trial():
    params = space.suggest(optuna.trial.FixedTrial(FULL), per_block()).flat()
    assert params == FULL


def test_filters_exist_only_for_built_blocks():
    fixed = {**FULL, "n_conv": 1}
    params = space.suggest(optuna.trial.FixedTrial(fixed), per_block()).flat()
    assert [k for k in params if k.startswith("filters_")] == ["filters_0"]


def test_missing_value_for_a_deeper_block_is_an_error():
    fixed = {k: v for k, v in FULL.items() if k != "filters_2"}
    with pytest.raises(ValueError):
        space.suggest(optuna.trial.FixedTrial(fixed), per_block())


def test_sampled_params_of_the_cnn_study_stay_inside_its_space_and_build():
    from hpo.learn.model import DynamicCNN

    cfg = config.load("cnn")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        trial = study.ask()
        params = space.suggest(trial, cfg.space)
        assert params.flat() == trial.params
        assert 2 <= len(params.model.filters) <= 4 and params.model.filters[0] in cfg.space["filters"].choices
        lr = cfg.space["lr"].for_optimizer(params.optimizer.name)
        assert lr.low <= params.optimizer.lr <= lr.high
        assert params.optimizer.name in ("adam", "sgd", "rmsprop")
        DynamicCNN(params.model)  # every point of the space builds


WIDE = """
name = "wide"
[space]
n_conv       = { low = 2, high = 3 }
filters      = { choices = [16, 32] }
growth       = { choices = [1.0, 2.0] }
kernel_size  = 3
residual     = { choices = [false, true] }
pool         = "avg"
n_fc         = 1
fc_size      = 64
dropout      = { low = 0.0, high = 0.3 }
optimizer    = { choices = ["adam", "sgd"] }
lr           = { adam = { low = 1e-4, high = 3e-3, log = true }, sgd = { low = 1e-2, high = 0.3, log = true } }
batch_size   = 128
weight_decay = 1e-4
"""


def wide(text: str = WIDE) -> config.StudyConfig:
    import tomllib

    return config.parse(tomllib.loads(text), "wide.toml")


def test_each_optimizer_samples_its_own_learning_rate_range_under_its_own_name():
    cfg = wide()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        params = space.suggest(trial, cfg.space)
        name = params.optimizer.name
        seen.add(name)
        assert [k for k in trial.params if k.startswith("lr")] == [f"lr_{name}"]
        low, high = (1e-4, 3e-3) if name == "adam" else (1e-2, 0.3)
        assert low <= params.optimizer.lr <= high
        assert params.flat() == trial.params  # what Optuna stores rebuilds the same run
        assert params.model.filters in {
            (16, 16),
            (16, 32),
            (16, 16, 16),
            (16, 32, 64),
            (32, 32),
            (32, 64),
            (32, 32, 32),
            (32, 64, 128),
        }
        assert "filters_1" not in trial.params and params.model.pool == "avg"
    assert seen == {"adam", "sgd"}


def test_a_per_optimizer_lr_must_cover_every_optimizer_it_may_meet():
    text = WIDE.replace('["adam", "sgd"]', '["adam", "sgd", "rmsprop"]')
    with pytest.raises(config.ConfigError, match="none for rmsprop"):
        wide(text)


@pytest.mark.parametrize(
    "line, message",
    [
        ("growth = 5.0", "growth must be a width factor from 1 to 4"),
        ('pool = "max"', "pool must be one of flatten, avg"),
        ('residual = "yes"', "residual must be true or false"),
    ],
)
def test_bad_model_family_values_are_refused_in_one_line(line, message):
    key = line.split(" ")[0]
    text = "\n".join(row for row in WIDE.splitlines() if not row.startswith(key + " ")) + "\n" + line + "\n"
    with pytest.raises(config.ConfigError, match=message):
        wide(text)


def test_the_new_keys_round_trip_through_the_stored_form():
    cfg = wide()
    again = config.from_dict(cfg.to_dict(), "stored")
    assert again.space == cfg.space
    assert config.parse(__import__("tomllib").loads(to_toml(cfg)), "explained").space == cfg.space


def test_warm_start_points_are_checked_against_per_optimizer_ranges():
    cfg = wide()
    good = {"n_conv": 2, "filters_0": 16, "growth": 2.0, "optimizer": "sgd", "lr_sgd": 0.1}
    assert space_problems(cfg.space, good) == []
    assert space_problems(cfg.space, {**good, "lr_sgd": 1e-3}) == [
        "lr_sgd = 0.001, but the space allows from 0.01 to 0.3"
    ]
    assert "name it lr_sgd" in space_problems(cfg.space, {"optimizer": "sgd", "lr": 0.1})[0]
    assert "filters_1 is not a parameter" in space_problems(cfg.space, {**good, "filters_1": 32})[0]


def test_the_middle_of_a_wide_space_builds():
    params = space.middle(wide().space)
    assert params.model.residual is True and params.optimizer.name == "sgd"
    assert 1e-2 <= params.optimizer.lr <= 0.3
