"""Managing studies as Optuna users expect: studies, best, extend and delete, with their refusals."""

from __future__ import annotations

import json

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState, create_trial

from hpo import attrs
from hpo.cli import cli
from hpo.search import artifacts, optuna_compat
from hpo.search import storage as storage_mod
from hpo.search import study as study_mod
from hpo.search.optuna_compat import trial_id
from hpo.settings import config

DIST = {"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def url(request, tmp_path, monkeypatch):
    """The same commands on the embedded SQLite file and on a real PostgreSQL server."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HPO_STORAGE", raising=False)
    monkeypatch.delenv("HPO_STUDY", raising=False)
    if request.param == "postgresql":
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{tmp_path / 'runs' / 'hpo.db'}"


def hpo(*args: str, stdin: str | None = None):
    result = CliRunner().invoke(cli, list(args), input=stdin)
    assert "Traceback" not in result.output, result.output
    return result


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert line.startswith("Error: ") and "\n" not in line, result.output
    return line


def a_study(url: str, name: str = "tiny", values: tuple[float, ...] = (0.7, 0.8)) -> optuna.Study:
    import dataclasses

    store = storage_mod.open_storage(url)
    study, _ = study_mod.create_or_load(store, dataclasses.replace(config.load("tiny"), name=name))
    for i, v in enumerate(values):
        study.add_trial(
            create_trial(state=TrialState.COMPLETE, value=v, params={"lr": 0.01 * (i + 1)}, distributions=DIST)
        )
    study.add_trial(
        create_trial(state=TrialState.PRUNED, params={"lr": 0.05}, distributions=DIST, intermediate_values={1: 0.5})
    )
    return study


def test_studies_lists_every_study_with_its_counts_and_best(url):
    a_study(url, "tiny")
    a_study(url, "other", values=(0.6,))
    a_study(url, "third", values=(0.5, 0.55, 0.65))
    out = hpo("studies", "--storage", url, "--json")
    assert out.exit_code == 0, out.output
    rows = {r["study"]: r for r in json.loads(out.output)["studies"]}
    assert rows["tiny"] == {
        "study": "tiny",
        "metric": "val_accuracy",
        "direction": "maximize",
        "finished": 3,
        "n_trials": 8,
        "best_value": 0.8,
        "best_trial": 1,
        "test_accuracy": None,
        "running": 0,
    }
    assert rows["other"]["finished"] == 2 and rows["other"]["best_value"] == 0.6
    assert (rows["third"]["finished"], rows["third"]["best_trial"]) == (4, 2) and len(rows) == 3
    text = hpo("studies", "--storage", url).output.splitlines()
    assert text[0].split() == ["study", "metric", "finished", "best", "test", "acc", "running"]
    assert text[1].split()[:4] == ["other", "max", "val_accuracy", "2/8"]


def test_studies_on_an_empty_storage_says_so(url):
    out = hpo("studies", "--storage", url)
    assert out.exit_code == 0 and "no studies in this storage yet" in out.output
    assert json.loads(hpo("studies", "--storage", url, "--json").output)["studies"] == []


def test_best_gives_the_best_trial_for_scripts(url):
    a_study(url)
    b = json.loads(hpo("best", "--study", "tiny", "--storage", url, "--json").output)
    assert (b["number"], b["value"], b["params"]) == (1, 0.8, {"lr": 0.02})
    assert "best trial 1 of study tiny: val_accuracy 0.8000" in hpo("best", "--study", "tiny", "--storage", url).output


@pytest.mark.parametrize("command", [["best"], ["extend", "--trials", "20"], ["delete", "--yes"]])
def test_commands_on_a_missing_study_name_the_ones_there(url, command):
    a_study(url)
    line = one_line_error(hpo(command[0], "--study", "nope", "--storage", url, *command[1:]))
    assert "no study named 'nope'" in line and "Studies in this storage: tiny" in line


def test_extend_raises_the_stored_budget_and_status_shows_it(url):
    study = a_study(url)
    out = hpo("extend", "--study", "tiny", "--storage", url, "--trials", "20", "--time", "30m")
    assert out.exit_code == 0, out.output
    assert study_mod.current_budget(study) == 20  # what a running worker reads before its next trial
    _, cfg = study_mod.load(storage_mod.open_storage(url), "tiny")
    assert cfg.budget.n_trials == 20 and cfg.budget.time_s == 1800
    status = json.loads(hpo("status", "--study", "tiny", "--storage", url, "--json").output)
    assert status["n_trials"] == 20 and status["extended"][0]["n_trials"] == [8, 20]
    assert 1790 < status["time_budget"]["left_s"] <= 1800
    assert "extended " in hpo("status", "--study", "tiny", "--storage", url).output


def test_extend_to_fewer_trials_than_finished_is_refused_and_changes_nothing(url):
    a_study(url)
    line = one_line_error(hpo("extend", "--study", "tiny", "--storage", url, "--trials", "3"))
    assert "has 3 finished trials already; extend it to at least 4" in line
    assert study_mod.current_budget(study_mod.load(storage_mod.open_storage(url), "tiny")[0]) == 8


def test_extend_below_finished_plus_running_is_refused(url):
    study = a_study(url)  # 3 finished
    for _ in range(2):
        study.ask()  # two trials running: they will finish and count
    line = one_line_error(hpo("extend", "--study", "tiny", "--storage", url, "--trials", "4"))
    assert "has 3 finished trials and 2 running already; extend it to at least 5" in line
    assert study_mod.current_budget(study) == 8
    assert hpo("extend", "--study", "tiny", "--storage", url, "--trials", "5").exit_code == 0


def test_a_study_whose_stored_pruner_no_longer_builds_can_be_shown_and_deleted(url):
    """Settings stored by an older hpo or Optuna that this Optuna refuses: reading commands work,
    a search says in one line why it cannot run, and delete removes the study."""
    study = a_study(url)
    storage = optuna_compat.study_storage(study)
    raw = storage.get_study_system_attrs(optuna_compat.study_id(study))[attrs.CONFIG]
    raw["pruner"]["options"]["n_warmup_steps"] = -1  # MedianPruner raises ValueError on it
    storage.set_study_system_attr(optuna_compat.study_id(study), attrs.CONFIG, raw)

    assert json.loads(hpo("status", "--study", "tiny", "--storage", url, "--json").output)["finished"] == 3
    assert hpo("studies", "--storage", url).exit_code == 0
    assert hpo("best", "--study", "tiny", "--storage", url).exit_code == 0
    line = one_line_error(hpo("create", "--study", "tiny", "--storage", url))
    assert "stored [pruner] settings" in line and "n_warmup_steps" in line and "hpo status` and `hpo delete`" in line
    out = hpo("delete", "--study", "tiny", "--storage", url, "--yes")
    assert out.exit_code == 0 and "deleted study 'tiny'" in out.output, out.output
    assert not study_mod.exists(storage_mod.open_storage(url), "tiny")


def test_delete_removes_the_study_and_its_artifacts_and_nothing_else(url, tmp_path):
    study = a_study(url)
    kept = a_study(url, "kept", values=(0.9,))
    where = tmp_path / "artifacts"
    store = artifacts.open_store(str(where))
    artifacts.upload_bytes(store, study, "note.json", b"{}")
    artifacts.upload_bytes(store, kept, "keep.json", b"{}")
    assert len(list(where.iterdir())) == 2
    out = hpo("delete", "--study", "tiny", "--storage", url, "--yes", "--artifacts", str(where))
    assert out.exit_code == 0 and "deleted study 'tiny': 3 trials and 1 artifact file(s)" in out.output
    assert len(list(where.iterdir())) == 1  # the other study's file
    store_ = storage_mod.open_storage(url)
    assert not study_mod.exists(store_, "tiny") and study_mod.exists(store_, "kept")
    assert len(study_mod.load(store_, "kept")[0].trials) == 2


def test_delete_without_yes_and_without_a_terminal_is_refused(url):
    a_study(url)
    line = one_line_error(hpo("delete", "--study", "tiny", "--storage", url))
    assert "needs a confirmation and there is no terminal to ask on. Pass --yes." in line
    assert study_mod.exists(storage_mod.open_storage(url), "tiny")


def test_delete_refuses_while_a_worker_is_running_a_trial(url):
    study = a_study(url)
    store = storage_mod.open_storage(url)
    trial = study.ask()
    store.record_heartbeat(trial_id(trial))
    line = one_line_error(hpo("delete", "--study", "tiny", "--storage", url, "--yes"))
    assert f"has workers running trials [{trial.number}] now. Stop them first, or pass --force." in line
    assert hpo("delete", "--study", "tiny", "--storage", url, "--yes", "--force").exit_code == 0


def test_every_study_command_reads_hpo_study(url, monkeypatch):
    a_study(url)
    monkeypatch.setenv("HPO_STUDY", "tiny")
    assert json.loads(hpo("status", "--storage", url, "--json").output)["study"] == "tiny"
    assert json.loads(hpo("best", "--storage", url, "--json").output)["number"] == 1
    monkeypatch.setenv("HPO_STUDY", "nope")
    line = one_line_error(hpo("status", "--storage", url))
    assert "no study named 'nope'" in line and "Studies in this storage: tiny" in line


def test_a_study_file_with_only_name_metric_direction_and_space_is_created_and_explained(url, tmp_path):
    from conftest import REPO

    space = (REPO / "studies" / "tiny.toml").read_text().split("[space]")[1]
    path = tmp_path / "minimal.toml"
    path.write_text(f'name = "minimal"\nmetric = "val_accuracy"\ndirection = "maximize"\n[space]{space}')
    out = hpo("create", "--study", str(path), "--storage", url, "--explain")
    assert out.exit_code == 0, out.output
    assert "study 'minimal' is ready" in out.output and "(budget 50)" in out.output
    for line in ("n_trials = 50", "epochs = 10", "multivariate = true", "constant_liar = true", 'name = "median"'):
        assert line in out.output, out.output
    status = json.loads(hpo("status", "--study", "minimal", "--storage", url, "--json").output)
    assert (status["n_trials"], status["epochs_per_trial"]) == (50, 10)
