"""`hpo bench --search T` end to end with real workers on the real data: the search with its final
model, the fixed CNN for the same T, the paired test on the same test images, and the fidelity
report, with each stage's figures kept on disk as it ends."""

from __future__ import annotations

import json

import optuna
import pytest

from conftest import run_hpo as hpo
from hpo.search.study import stored_config

pytestmark = pytest.mark.integration


def test_the_search_against_the_fixed_cnn_is_paired_and_its_ranking_retrained(tmp_path, real_data_dir):
    # tiny needs 1-2 minutes for one trial plus its finalizer (the minimum-budget check), more under load.
    args = ["bench", "--search", "3m", "--study", "tiny", "--fidelity", "2", "--data-dir", str(real_data_dir)]
    report = json.loads(hpo(*args, "--json", cwd=tmp_path, timeout=1200).stdout)
    work = tmp_path / "runs" / "bench-search"
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{work / 'runs' / 'hpo.db'}")
    searched, fixed, pair = report["search"], report["fixed"], report["paired"]
    metrics = json.loads((work / "runs" / "tiny" / "final" / "metrics.json").read_text())
    assert searched["test_accuracy"] == metrics["test_accuracy"] and searched["trials"] == len(study.trials)
    # The retrained members and the search's own trial models beside them make up the final ensemble.
    assert len(searched["members"]) + len(searched["trial_models"]) == len(metrics["members"])
    assert fixed["epochs"] >= 1 and fixed["tta"] == "flip"  # the study's [final] tta, as the searched model's
    # McNemar's counts are the paired difference: each image only one model gets right moves it by 1/10,000.
    assert pair["only_search"] - pair["only_fixed"] == round(report["difference"] * 10_000)
    assert 0.0 <= pair["p_value"] <= 1.0
    fid = report["fidelity"]
    assert fid["epochs"] == stored_config(study).budget.epochs == 3  # the horizon the study trained
    assert len(fid["finalists"]) == 2 and fid["pick"] in [r["trial"] for r in fid["finalists"]]
    values = {t.number: t for t in study.trials}
    for row in fid["finalists"]:
        trial = values[row["trial"]]
        held = trial.value if row["state"] == "COMPLETE" else trial.intermediate_values[row["search_epochs"]]
        assert row["search_value"] == pytest.approx(held) and 0.0 < row["retrained_value"] <= 1.0
    # What was kept as the stages ended is what was printed (the CPU line is added when printing).
    kept = json.loads((work / "bench-search.json").read_text())
    printed = {k: v for k, v in report.items() if k != "cpu"}
    assert json.dumps(kept, sort_keys=True) == json.dumps(printed, sort_keys=True)  # NaN-safe
    assert report["cpu"].endswith(("(AMX)", "(AVX-512 BF16)", "(AVX2 only)"))
