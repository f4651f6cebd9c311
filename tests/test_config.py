from __future__ import annotations

from pathlib import Path

import pytest

from hpo.errors import ConfigError, StudyFileNotFound
from hpo.settings import config
from hpo.settings.dimensions import OPTIONAL_SPACE_KEYS, SPACE_KEYS
from hpo.settings.writer import to_toml

STUDIES = Path(__file__).resolve().parents[1] / "studies"


def raw_tiny() -> dict:
    import tomllib

    return tomllib.loads((STUDIES / "tiny.toml").read_text())


@pytest.mark.parametrize("name", ["cnn", "cnn-quick", "tiny"])
def test_shipped_studies_parse_and_round_trip(name):
    cfg = config.load(name)
    assert cfg.name == name
    assert set(SPACE_KEYS) <= set(cfg.space) <= set(SPACE_KEYS + OPTIONAL_SPACE_KEYS)
    assert config.from_dict(cfg.to_dict(), source="stored") == cfg


def test_cnn_study_covers_the_mission_space():
    cfg = config.load("cnn")
    s = cfg.space
    assert (s["n_conv"].low, s["n_conv"].high) == (2, 4)
    assert len(s["filters"].choices) > 1 and len(s["growth"].choices) > 1  # widths per block
    assert set(s["kernel_size"].choices) == {3, 5}
    assert (s["n_fc"].low, s["n_fc"].high) == (1, 3)
    assert set(s["optimizer"].choices) == {"adam", "sgd", "rmsprop"}
    assert set(s["residual"].choices) == {False, True} and set(s["pool"].choices) == {"flatten", "avg"}
    lr = dict(s["lr"].by_optimizer)  # a range per optimizer: SGD's rates are 10-100x Adam's
    assert set(lr) == {"adam", "sgd", "rmsprop"} and all(r.log for r in lr.values())
    assert lr["sgd"].low > lr["adam"].low and s["weight_decay"].log
    assert cfg.sampler.name == "tpe" and cfg.sampler.options["multivariate"] is True
    assert cfg.sampler.options["constant_liar"] is True
    assert cfg.pruner.name == "median" and cfg.pruner.options["n_warmup_steps"] >= 1


def test_path_to_a_file_works(tmp_path):
    target = tmp_path / "mine.toml"
    target.write_text((STUDIES / "tiny.toml").read_text())
    assert config.load(str(target)).name == "tiny"


def expect_error(raw: dict, *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:
        config.parse(raw, source="s.toml")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_study_names_where_it_looked():
    with pytest.raises(StudyFileNotFound) as info:
        config.load("cnn-quik")
    assert "no study file named 'cnn-quik'" in str(info.value)
    assert "Did you mean 'cnn-quick'?" in str(info.value)


def test_missing_path():
    with pytest.raises(StudyFileNotFound, match="study file nowhere/x.toml does not exist"):
        config.load("nowhere/x.toml")


def test_not_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(str(bad))


def test_unknown_top_level_key_suggests_the_right_one():
    raw = raw_tiny()
    raw["budjet"] = raw.pop("budget")
    expect_error(raw, "unknown key 'budjet'", "Did you mean 'budget'?")
    raw = raw_tiny()
    raw["sed"] = 3
    expect_error(raw, "unknown key 'sed'", "Did you mean 'seed'?")


def test_unknown_space_parameter():
    raw = raw_tiny()
    raw["space"]["dropuot"] = raw["space"].pop("dropout")
    expect_error(raw, "[space] unknown parameter 'dropuot'", "Did you mean 'dropout'?")


def test_wrong_type():
    raw = raw_tiny()
    raw["budget"]["n_trials"] = "six"
    expect_error(raw, "[budget] n_trials must be int, got str 'six'")


def test_low_greater_than_high():
    raw = raw_tiny()
    raw["space"]["lr"] = {"low": 0.1, "high": 0.01, "log": True}
    expect_error(raw, "lr: low (0.1) is greater than high (0.01). Swap them.")


def test_log_range_including_zero():
    raw = raw_tiny()
    raw["space"]["weight_decay"] = {"low": 0.0, "high": 0.01, "log": True}
    expect_error(raw, "weight_decay: a log range must be above 0")


def test_empty_choices():
    raw = raw_tiny()
    raw["space"]["optimizer"] = {"choices": []}
    expect_error(raw, "optimizer: choices must be a non-empty list")


def test_n_trials_below_one():
    raw = raw_tiny()
    raw["budget"]["n_trials"] = 0
    expect_error(raw, "n_trials must be at least 1, got 0")


def test_max_epochs_is_at_least_the_horizon_and_only_with_a_fitted_one():
    raw = raw_tiny()
    raw["budget"].update(fit_epochs=True, max_epochs=2)
    expect_error(raw, "[budget] max_epochs must be at least epochs (3), got 2")
    raw["budget"].update(fit_epochs=False, max_epochs=30)
    expect_error(raw, "max_epochs needs fit_epochs = true")
    raw["budget"].update(fit_epochs=True)
    assert config.parse(raw).budget.max_epochs == 30


def test_unknown_sampler_and_pruner():
    raw = raw_tiny()
    raw["sampler"]["name"] = "tpee"
    expect_error(raw, "[sampler] name 'tpee' is not known.", "Did you mean 'tpe'?")
    raw = raw_tiny()
    raw["pruner"]["name"] = "medain"
    expect_error(raw, "[pruner] name 'medain' is not known.", "Did you mean 'median'?")


def test_unknown_sampler_option_is_checked_against_optuna():
    raw = raw_tiny()
    raw["pruner"]["n_warmup_step"] = 2
    expect_error(raw, "MedianPruner has no option 'n_warmup_step'", "Did you mean 'n_warmup_steps'?")


def test_tpe_defaults_to_the_parallel_settings_and_keeps_explicit_ones():
    raw = raw_tiny()
    del raw["sampler"]["constant_liar"]
    raw["sampler"]["multivariate"] = False
    options = config.parse(raw).sampler.options
    assert options["constant_liar"] is True and options["multivariate"] is False


def test_space_outside_what_the_model_can_build():
    raw = raw_tiny()
    raw["space"]["n_conv"] = {"low": 1, "high": 5}
    expect_error(raw, "n_conv must be an integer from 1 to 4", "got 5")
    raw = raw_tiny()
    raw["space"]["optimizer"] = {"choices": ["adam", "lbfgs"]}
    expect_error(raw, "optimizer must be one of adam, sgd, rmsprop, got 'lbfgs'")


def test_fixed_values_are_allowed():
    cfg = config.parse(raw_tiny())
    assert cfg.space["n_fc"].low == cfg.space["n_fc"].high == 1


def test_checkpoints_section_defaults_and_errors():
    assert config.parse(raw_tiny()).checkpoints == config.Checkpoints(every_epoch=True, keep="none")
    raw = {**raw_tiny(), "checkpoints": {"keep": "complete", "every_epoch": False}}
    assert config.parse(raw).checkpoints == config.Checkpoints(every_epoch=False, keep="complete")
    with pytest.raises(ConfigError, match=r"\[checkpoints\] keep 'completed' is not known. Did you mean 'complete'"):
        config.parse({**raw_tiny(), "checkpoints": {"keep": "completed"}})


def test_a_file_with_a_name_a_metric_and_a_space_runs_with_defaults_for_parallel_workers(tmp_path):
    space = (STUDIES / "tiny.toml").read_text().split("[space]")[1]
    path = tmp_path / "minimal.toml"
    path.write_text(f'name = "minimal"\nmetric = "val_accuracy"\n[space]{space}\n')
    cfg = config.load(str(path))
    assert (cfg.budget.n_trials, cfg.budget.epochs) == (config.DEFAULT_TRIALS, config.DEFAULT_EPOCHS)
    assert cfg.sampler.name == "tpe" and cfg.sampler.options == {"multivariate": True, "constant_liar": True}
    assert cfg.direction == "maximize" and cfg.pruner.name == "median"


@pytest.mark.parametrize("name", ["tiny", "cnn", "cnn-quick"])
def test_the_explained_settings_are_a_study_file_that_reads_back_the_same(name):
    import tomllib

    cfg = config.load(name)
    assert config.parse(tomllib.loads(to_toml(cfg)), "explained") == cfg


def test_successive_halving_is_a_study_file_pruner_with_its_options_checked():
    raw = raw_tiny()
    raw["pruner"] = {"name": "successive_halving", "min_resource": 1, "reduction_factor": 3}
    cfg = config.parse(raw, "sh.toml")
    assert cfg.pruner.name == "successive_halving" and cfg.pruner.options["reduction_factor"] == 3
    raw["pruner"]["reduction_factor"] = 1
    expect_error(raw, "[pruner] reduction_factor = 1 is out of range: SuccessiveHalvingPruner needs an integer")


def test_a_percentile_pruner_builds_with_its_required_percentile_and_says_so_without_it():
    raw = raw_tiny()
    raw["pruner"] = {"name": "percentile", "percentile": 25.0, "n_startup_trials": 1, "n_warmup_steps": 2}
    cfg = config.parse(raw)
    assert cfg.pruner.options == {"percentile": 25.0, "n_startup_trials": 1, "n_warmup_steps": 2}
    del raw["pruner"]["percentile"]
    expect_error(raw, "[pruner] PercentilePruner needs percentile: add it, e.g. percentile = ... under [pruner].")
