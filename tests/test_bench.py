"""`hpo bench --search`'s baseline: the notebook CNN trained for a time budget, scored once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hpo.bench.pipelines import DEFAULT_PARAMS
from hpo.bench.search import Setup, fixed_baseline
from hpo.settings import config
from hpo.settings.config import Augment, TrainSettings


def setup(data_dir: Path, time_s: float = 3.0) -> Setup:
    """One CPU thread on the fake data set; no search runs here, so no study file or folder is used."""
    return Setup(Path("unused.toml"), time_s, 1, data_dir, "cpu", 1, Path("unused"))


def plain(tta: str = "none") -> config.StudyConfig:
    """A study whose [train] and [augment] are the defaults, as the baseline's own recipe."""
    cfg = config.load("tiny")
    final = dataclasses.replace(cfg.final, tta=tta)
    return dataclasses.replace(cfg, train=TrainSettings(), augment=Augment(), seed=0, final=final)


def test_fixed_baseline_fills_its_time_with_whole_epochs_and_reports_an_interval(fake_data_dir):
    result = fixed_baseline(setup(fake_data_dir), plain(tta="flip"))
    assert result["params"] == DEFAULT_PARAMS  # two conv blocks of 32/64 filters, FC 512, Adam at 1e-3
    assert result["tta"] == "flip" and len(result["predictions"]) == 50  # one per test image (the fake set has 50)
    assert result["epochs"] >= 1 and result["epoch_s"] > 0
    low, high = result["test_ci95"]
    assert 0.0 <= low <= result["test_accuracy"] <= high <= 1.0


def test_a_fixed_baseline_whose_timer_read_fast_refits_its_epochs_to_its_budget(fake_data_dir, monkeypatch):
    """The baseline is held to its budget as the search's finalizer is: a timer that read a fast spell
    (here, 10,000x too fast: about a million epochs planned for 3 s) is corrected from its own epochs."""
    from hpo.learn import train

    real = train.seconds_per_image
    monkeypatch.setattr(train, "seconds_per_image", lambda *a, **k: real(*a, **k) / 10_000)
    result = fixed_baseline(setup(fake_data_dir), plain())
    assert result["epochs"] >= 1
    assert result["wall_time_s"] < 60.0, result  # never a million epochs: re-fitted after the first


def test_bench_without_torchvision_says_which_extra_to_install(monkeypatch):
    import importlib.util

    import pytest

    from hpo.bench import pipelines as bench
    from hpo.errors import HpoError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision" else real(name, *a))
    spec = bench.BenchSpec(
        DEFAULT_PARAMS, "/nonexistent", images=512, batch_size=64, crop_padding=0, device="cpu", threads=1
    )
    with pytest.raises(HpoError, match=r"needs torchvision: pip install 'hpo-service\[bench\]'"):
        bench.measure(spec)


def test_the_paired_test_counts_only_the_images_the_two_disagree_on():
    from hpo.bench.search import paired

    truth = [0, 1, 2, 3, 4, 5]
    search = [0, 1, 2, 3, 9, 9]  # right on 0-3
    fixed = [0, 9, 2, 9, 9, 9]  # right on 0 and 2
    assert paired(search, fixed, truth) == {"only_search": 2, "only_fixed": 0, "p_value": 0.5}


def test_fidelity_retrains_the_finalists_at_the_horizon_and_ranks_them_on_validation(fake_data_dir):

    import optuna
    from optuna.trial import TrialState, create_trial

    from hpo.bench.search import fidelity
    from hpo.search import space
    from hpo.settings import config

    cfg = config.load("tiny")
    cfg = dataclasses.replace(cfg, budget=dataclasses.replace(cfg.budget, epochs=1))
    study = optuna.create_study(direction="maximize")
    base = space.middle(cfg.space).flat()
    for i, value in enumerate([0.5, 0.7, 0.6, 0.7]):
        params = {**base, "fc_size": 16 + i}
        dists = {k: optuna.distributions.CategoricalDistribution([v]) for k, v in params.items()}
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=value, params=params, distributions=dists))
    pruned = {**base, "fc_size": 40}
    dists = {k: optuna.distributions.CategoricalDistribution([v]) for k, v in pruned.items()}
    study.add_trial(create_trial(state=TrialState.PRUNED, params=pruned, distributions=dists))
    seen: list[int] = []
    report = fidelity(study, cfg, setup(fake_data_dir), top=3, on_row=lambda row: seen.append(row["trial"]))
    # Best first by the value the search holds; the pruned trial (no intermediate value) has none to rank by.
    assert [r["trial"] for r in report["finalists"]] == [1, 3, 2] and report["pick"] == 1
    assert seen == [1, 3, 2]  # each row reported as its retrain ended, so a stopped run keeps what it measured
    assert all(0.0 <= r["retrained_value"] <= 1.0 for r in report["finalists"])
    assert -1.0 <= report["spearman"] <= 1.0 and report["regret"] >= 0.0
