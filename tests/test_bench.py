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


def test_bench_without_torchvision_says_which_extra_to_install(monkeypatch):
    import importlib.util

    import pytest

    from hpo import bench
    from hpo.errors import HpoError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision" else real(name, *a))
    spec = bench.BenchSpec(
        DEFAULT_PARAMS, "/nonexistent", images=512, batch_size=64, crop_padding=0, device="cpu", threads=1
    )
    with pytest.raises(HpoError, match=r"needs torchvision: pip install 'hpo-service\[bench\]'"):
        bench.measure(spec)
