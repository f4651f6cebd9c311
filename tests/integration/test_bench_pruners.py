"""`hpo bench --search T --pruners A,B` with real workers on the real data: each pruner's search runs
for the whole time in a storage of its own, and the comparison reads validation only."""

from __future__ import annotations

import json

import optuna
import pytest

from conftest import run_hpo as hpo
from hpo.search.study import stored_config
from hpo.settings import config

pytestmark = pytest.mark.integration


def test_each_pruner_searches_for_the_same_time_and_is_compared_on_validation(tmp_path, real_data_dir):
    # tiny needs 1-2 minutes for one trial plus its finalizer (the minimum-budget check), more under load.
    result = hpo(
        "bench",
        "--search",
        "3m",
        "--pruners",
        "median,successive_halving",
        "--repeats",
        "1",
        "--study",
        "tiny",
        "--data-dir",
        str(real_data_dir),
        "--json",
        cwd=tmp_path,
        timeout=900,
    )
    report = json.loads(result.stdout)
    assert [r["pruner"] for r in report["runs"]] == ["median", "successive_halving"]
    assert report["options"]["median"] == config.load("tiny").pruner.options  # the study file's own
    for run in report["runs"]:
        name = f"tiny-{run['pruner'].replace('_', '-')}-1"
        where = tmp_path / "runs" / "bench-pruners" / name
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{where / 'runs' / 'hpo.db'}")
        stored = stored_config(study)
        assert stored.pruner.name == run["pruner"] and stored.seed == 0 and run["horizon"] == 3
        trials = study.get_trials(deepcopy=False)
        # tiny's cap of 8 trials is lifted, so the clock ended the run, with every trial finished.
        assert run["trials"] == len(trials) > 8, run
        assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
        assert run["pruned"] >= 1 and run["complete"] >= 1
        assert run["best_value"] == pytest.approx(max(t.value for t in trials if t.state.name == "COMPLETE"))
        # The join rule's ensemble, read from the run's own validation outputs: the best trial leads it,
        # every member is a COMPLETE trial of the run, and each that joined raised its accuracy.
        complete = {t.number for t in trials if t.state.name == "COMPLETE"}
        assert run["members"][0] == run["best_trial"] and set(run["members"]) <= complete, run
        assert 0.5 < run["ensemble_value"] <= 1.0
        assert not (where / "runs" / name / "final").exists()  # no final model: the test split is not read
    medians = [row for row in report["pruners"] if row["pruner"] == "median"]
    assert medians[0]["vs_first"] is None and report["pruners"][1]["vs_first"] is not None
    assert report["pruners"][1]["ensemble_vs_first"] == pytest.approx(
        report["runs"][1]["ensemble_value"] - report["runs"][0]["ensemble_value"]
    )
    assert report["cpu"].endswith(("(AMX)", "(AVX-512 BF16)", "(AVX2 only)"))  # named beside the times
