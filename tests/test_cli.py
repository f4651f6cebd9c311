"""The CLI's messages for errors a user can make: one line, exit code 1, no traceback."""

from __future__ import annotations

import pytest

from conftest import user_error
from hpo.search.horizon import minimum_budget


def test_password_is_masked_in_messages(run):
    result = run("status", "--study", "tiny", "--storage", "mysql://u:secret@h/db")
    assert "secret" not in result.output and "***" in result.output


def test_final_train_without_a_complete_trial(run, tmp_path):
    import optuna

    from hpo.search import storage, study
    from hpo.settings import config

    url = f"sqlite:///{tmp_path / 'x.db'}"
    study.create_or_load(storage.open_storage(url), config.load("tiny"))
    user_error(run("final-train", "--study", "tiny", "--storage", url), "has no COMPLETE trial yet")
    assert optuna.load_study(study_name="tiny", storage=url).trials == []


def test_debug_shows_the_traceback(run):
    result = run("--debug", "worker", "--study", "cnn-quik")
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "StudyFileNotFound"


def test_predict_and_export_without_a_final_model(run):
    user_error(
        run("predict", "--study", "tiny", "a.png"),
        "no final model at runs/tiny/final/model.pt. Run `hpo final-train --study tiny` first",
    )
    user_error(run("export", "--study", "tiny", "--format", "onnx"), "no final model at runs/tiny/final/model.pt")


@pytest.mark.parametrize(
    "location, text",
    [
        ("s3://bucket/prefix", "give a bucket only, like s3://hpo-artifacts"),
        ("gs://bucket", "scheme gs:// is not supported. Use a directory path or s3://BUCKET"),
    ],
)
def test_bad_artifact_locations(run, tmp_path, location, text):
    result = run("worker", "--study", "tiny", "--artifacts", location)
    user_error(result, text)


def test_unwritable_artifact_directory(run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    user_error(
        run("optimize", "--study", "tiny", "--artifacts", str(blocker / "artifacts")),
        f"cannot create the artifact directory {blocker / 'artifacts'}",
    )


@pytest.mark.parametrize(
    "value, text",
    [
        ("ten", "--time: 'ten' is not a duration such as 90s, 10m, 1h or 1h30m."),
        ("0m", "--time: '0m' is not a positive duration"),
        ("-1h", "--time: '-1h' is not a duration"),
    ],
)
def test_a_time_that_does_not_parse_writes_nothing(run, tmp_path, value, text):
    user_error(run("optimize", "--study", "tiny", "--time", value), text)
    assert not (tmp_path / "runs").exists()


def test_a_time_budget_too_short_for_one_trial_and_the_finalizer_creates_no_study(run, tmp_path, fake_data_dir):
    import optuna

    result = run("optimize", "--study", "tiny", "--time", "2s", "--data-dir", str(fake_data_dir))
    user_error(result, "--time 2s is shorter than one trial plus the finalizer, about ")
    assert "per trial epoch, the first trial, calibrated on this machine). Give at least --time " in result.output
    assert optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'runs' / 'hpo.db'}") == []


@pytest.mark.parametrize(
    "section, line, text",
    [
        ("[budget]", 'time = "soon"', "[budget] time: 'soon' is not a duration"),
        ("[budget]", "time = 0", "[budget] time: '0.0' is not a positive duration"),
        ("[final]", "ensemble = 0", "[final] ensemble must be at least 1 (one model), got 0"),
        ("[final]", 'tta = "flop"', "[final] tta 'flop' is not known. Did you mean 'flip'? Use one of: none, flip"),
        (
            "[final]",
            "speed_tie = 0.005",
            "[final] speed_tie was removed: the final run now reuses the lead trial's own measured epochs, so no "
            "faster stand-in is needed. Delete the line.",
        ),
        ("[final]", 'fill = "seeds"', "[final] fill was removed: members are now chosen on validation"),
        ("[final]", "member_gap = 0.01", "[final] member_gap was removed: a member now joins only if it raises"),
        ("[augment]", "erase = 1.5", "[augment] erase must be a probability in [0, 1], got 1.5"),
        (
            "[pruner]",
            "n_warmup_steps = -1",
            "[pruner] n_warmup_steps = -1 is out of range: MedianPruner needs an integer of at least 0. Fix the value.",
        ),
        (
            "[pruner]",
            "interval_steps = 0",
            "[pruner] interval_steps = 0 is out of range: MedianPruner needs an integer",
        ),
        (
            "[pruner]",
            'n_min_trials = "2"',
            '[pruner] n_min_trials = "2" is out of range: MedianPruner needs an integer',
        ),
        (
            "[sampler]",
            "n_startup_trials = -3",
            "[sampler] n_startup_trials = -3 is out of range: TPESampler needs an integer of at least 0",
        ),
        ("[sampler]", "multivariate = 1", "[sampler] multivariate = 1 is out of range: TPESampler needs true or false"),
        ("[train]", "warmup_epochs = -1", "[train] warmup_epochs must not be negative, got -1.0"),
    ],
)
def test_bad_budget_and_final_settings_name_the_key(run, tmp_path, section, line, text):
    from pathlib import Path

    key = line.split("=")[0].strip()
    source = (
        "\n".join(
            row
            for row in (Path(__file__).resolve().parents[1] / "studies" / "tiny.toml").read_text().splitlines()
            if not row.startswith(f"{key} ")
        )
        + "\n"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text(source.replace(f"{section}\n", f"{section}\n{line}\n", 1))
    user_error(run("optimize", "--study", str(bad)), text)
    user_error(run("create", "--study", str(bad), "--explain"), text)
    assert not (tmp_path / "runs").exists()


def test_a_bad_pruner_value_of_another_pruner_names_the_option_and_its_range(run, tmp_path):
    from pathlib import Path

    source = (Path(__file__).resolve().parents[1] / "studies" / "tiny.toml").read_text()
    pruner = '[pruner]\nname = "hyperband"\nreduction_factor = 1\n'
    start, end = source.index("[pruner]"), source.index("[augment]")
    bad = tmp_path / "bad.toml"
    bad.write_text(source[:start] + pruner + "\n" + source[end:])
    text = "[pruner] reduction_factor = 1 is out of range: HyperbandPruner needs an integer of at least 2"
    user_error(run("create", "--study", str(bad), "--explain"), text)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["a/b", "../up", ".hidden", "x" * 65, "tab\tname"])
def test_a_study_name_that_cannot_be_a_file_name_is_refused(run, tmp_path, name):
    import json
    from pathlib import Path

    source = (Path(__file__).resolve().parents[1] / "studies" / "tiny.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(source.replace('name = "tiny"', f"name = {json.dumps(name)}"))
    user_error(run("create", "--study", str(bad)), "name must be letters, digits, '.', '_' or '-'")
    assert not (tmp_path / "runs").exists()


def test_final_after_a_search_without_complete_trials_says_what_to_do(tmp_path):
    import optuna

    from hpo.errors import HpoError
    from hpo.learn.devices import place
    from hpo.results.final import after_search
    from hpo.search.session import Workspace
    from hpo.settings import config

    study = optuna.create_study(direction="maximize")
    with pytest.raises(
        HpoError,
        match=r"--final: study 'tiny' has no COMPLETE trial after the search, so there is "
        r"nothing to retrain. Give a longer --time",
    ):
        after_search(study, config.load("tiny"), Workspace(None, None, place("cpu")))


def test_final_after_a_search_that_added_nothing_keeps_the_published_model(tmp_path):
    import optuna

    from hpo import attrs
    from hpo.errors import HpoError
    from hpo.learn.devices import place
    from hpo.results.final import after_search
    from hpo.search.session import Workspace
    from hpo.settings import config

    study = optuna.create_study(direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(
            value=0.8, params={"lr": 0.01}, distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 0.1)}
        )
    )
    study.set_user_attr(attrs.FINAL, {"test_accuracy": 0.9312})
    with pytest.raises(HpoError) as info:
        after_search(study, config.load("tiny"), Workspace(None, None, place("cpu")), finished_before=1)
    message = str(info.value)
    assert (
        "--final: the search finished no new trial, so the published model (test accuracy 93.12 %) is kept" in message
    )
    assert "\n" not in message and study.user_attrs[attrs.FINAL] == {"test_accuracy": 0.9312}
    assert not list(tmp_path.iterdir())  # nothing written


def test_predicting_needs_neither_the_dashboard_nor_matplotlib():
    import subprocess
    import sys

    probe = (
        "import sys, hpo.learn.inference; "
        "print(sorted(m for m in ('optuna_dashboard', 'matplotlib', 'hpo.results.final') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_study_that_fits_its_epochs_is_created_at_the_longest_horizon_the_time_holds(tmp_path, fake_data_dir):
    import time

    from hpo import launch
    from hpo.learn import sources
    from hpo.learn.devices import cpu_count
    from hpo.search import budget, session
    from hpo.search.study import create_or_load
    from hpo.settings import config

    source = config.resolve_path("tiny").read_text().replace('name = "tiny"', 'name = "fit"')
    path = tmp_path / "fit.toml"
    path.write_text(source.replace("epochs = 3", "epochs = 5000\nfit_epochs = true"))
    cfg = config.load(str(path))  # 5,000 epochs cannot fit a minute; a few of the fake data set's do
    opened = session.open_storage(f"sqlite:///{tmp_path / 'hpo.db'}")
    dataset = sources.fashion_mnist(fake_data_dir)
    study, stored = launch.prepare(
        cfg, opened, dataset, launch.Local(1, 1, "cpu"), launch.Clock(60.0, True, time.time())
    )
    epochs = stored.budget.epochs
    assert 1 <= epochs < 5000 and stored.final.epochs == 1  # the final run was set apart: 1 epoch
    cost = budget.calibration(study)
    assert cost is not None
    # The longest that fits: one epoch more would not have (the final run takes every core).
    cores = cpu_count()
    assert minimum_budget(stored, cost, cores, calibrated=True) <= 60.0
    assert minimum_budget(config.with_horizon(cfg, epochs + 1), cost, cores, calibrated=True) > 60.0
    # A worker that reads the file gets the stored, fitted horizon.
    assert create_or_load(opened.storage, cfg)[1].budget.epochs == epochs
