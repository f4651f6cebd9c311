"""A time-budgeted study with real workers on the real data: the budget decides what starts, so the
study ends with every trial it started finished, and the finalizer runs inside the same budget."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import optuna
import pytest

from conftest import run_hpo as hpo
from hpo.search import optuna_compat

pytestmark = pytest.mark.integration

STUDIES = Path(__file__).resolve().parents[2] / "studies"


def test_time_budget_ends_the_search_cleanly_and_keeps_the_finalizer_inside_it(tmp_path, real_data_dir):
    # n_trials far beyond what fits, so the clock is what ends the search.
    source = (STUDIES / "tiny.toml").read_text().replace('name = "tiny"', 'name = "timed"')
    study_file = tmp_path / "timed.toml"
    study_file.write_text(source.replace("n_trials = 8", "n_trials = 10000"))
    started = time.monotonic()
    result = hpo(
        "optimize",
        "--study",
        str(study_file),
        "--workers",
        "2",
        "--time",
        "3m",
        "--final",
        "--data-dir",
        str(real_data_dir),
        cwd=tmp_path,
        timeout=900,
    )
    wall_s = time.monotonic() - started  # the whole command as its user waits for it, start-up and exit included
    # Search plus finalizer end within the budget: +5 % for what no budget can plan (process exit).
    assert wall_s <= 1.05 * 180, (wall_s, result.stdout[-2000:])

    study = optuna.load_study(study_name="timed", storage=f"sqlite:///{tmp_path / 'runs' / 'hpo.db'}")
    by_state = {s: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
    finished = by_state[optuna.trial.TrialState.COMPLETE] + by_state[optuna.trial.TrialState.PRUNED]
    assert finished == len(study.trials) >= 2, by_state  # nothing RUNNING, WAITING or FAILED is left
    assert finished < 10000
    deadline = study.user_attrs["hpo:deadline"]
    assert deadline["time_s"] == 180
    for t in study.trials:
        plan = t.user_attrs["budget"]  # the estimate that let the trial start, recorded on it
        assert plan["deadline"] == deadline["at"]
        assert plan["decided_at"] + plan["estimate_s"] + plan["reserve_s"] <= plan["deadline"], (t.number, plan)
        assert t.datetime_start.timestamp() >= plan["decided_at"] - 1.0
    # A trial the clock stopped could not complete before the reserve: all its epochs left are counted.
    for t in study.trials:
        reason = t.user_attrs.get("fail_reason", "")
        if reason.startswith("time budget"):
            assert re.match(r"time budget: its (last epoch needs|remaining \d+ epochs need) about \d+s", reason), reason
    # Each worker stopped because the next trial would not have fit, and said so.
    assert result.stderr.count("time budget: a trial's first epoch needs about") == 2, result.stderr[-3000:]

    metrics = json.loads((tmp_path / "runs/timed/final/metrics.json").read_text())
    ensemble = metrics["ensemble"]
    assert 1 <= ensemble["trained"] <= 2 and ensemble["tta"] == "flip"
    if ensemble["trained"] < 2:  # no second member raised validation accuracy, or it did not fit, and it says so
        shrank = "ensemble shrank from 2 to 1 member(s) to end within the time budget" in result.stdout
        assert shrank or ensemble["chosen_by"].startswith("trial ") or "raised it further" in ensemble["chosen_by"]
    assert f"test accuracy {100 * metrics['test_accuracy']:.2f} % (95 % CI " in result.stdout
    status = json.loads(hpo("status", "--study", "timed", "--json", cwd=tmp_path).stdout)
    assert status["time_budget"]["time_s"] == 180 and status["final"]["test_ci95"] == metrics["test_ci95"]
    print(f"time budget 180s: {finished} trials, ensemble of {ensemble['trained']}, {wall_s:.0f}s in all")

    # The same command again once the budget is spent: one line saying so, and the published model,
    # its metrics, its artifacts and the dashboard note are left as they were.
    final = tmp_path / "runs/timed/final"
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in final.iterdir()}
    attrs_before = study.user_attrs
    system_before = system_attrs(study)  # the note and the artifact entries live here
    time.sleep(max(0.0, deadline["at"] - time.time()) + 1)
    again = hpo(
        "optimize",
        "--study",
        str(study_file),
        "--workers",
        "2",
        "--final",
        "--data-dir",
        str(real_data_dir),
        cwd=tmp_path,
        check=False,
    )
    assert again.returncode == 1, again.stdout + again.stderr
    line = again.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: study 'timed': its time budget of 3m00s is spent"), again.stderr
    assert "the published model stays as it is" in line and "hpo extend --study timed --time" in line
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in final.iterdir()} == before
    reloaded = optuna.load_study(study_name="timed", storage=f"sqlite:///{tmp_path / 'runs' / 'hpo.db'}")
    assert reloaded.user_attrs == attrs_before and len(reloaded.trials) == len(study.trials)
    assert system_attrs(reloaded) == system_before


def system_attrs(study: optuna.Study) -> dict:
    return optuna_compat.study_storage(study).get_study_system_attrs(optuna_compat.study_id(study))
