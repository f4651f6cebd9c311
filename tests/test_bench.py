"""`hpo bench --search`'s baseline: the notebook CNN trained for a time budget, scored once."""

from __future__ import annotations

from hpo.bench import DEFAULT_PARAMS, fixed_baseline
from hpo.config import Augment, TrainSettings


def test_fixed_baseline_fills_its_time_with_whole_epochs_and_reports_an_interval(fake_data_dir):
    result = fixed_baseline(3.0, fake_data_dir, "cpu", 1, TrainSettings(), Augment())
    assert result["params"] == DEFAULT_PARAMS  # two conv blocks of 32/64 filters, FC 512, Adam at 1e-3
    assert result["epochs"] >= 1 and result["epoch_s"] > 0
    low, high = result["test_ci95"]
    assert 0.0 <= low <= result["test_accuracy"] <= high <= 1.0
