"""Trials at the final horizon, cut only by the pruner: 2 real workers, each pruner the shipped
studies use, on the real Fashion-MNIST files; then the finalizer, choosing members on validation."""

from __future__ import annotations

import json

import optuna
import pytest

from conftest import run_hpo as hpo

pytestmark = pytest.mark.integration

PRUNERS = {
    "median": 'name = "median"\nn_startup_trials = 1\nn_warmup_steps = 1\nn_min_trials = 1\n',
    "successive_halving": 'name = "successive_halving"\nmin_resource = 1\nreduction_factor = 3\n',
}


def study_file(path, pruner: str) -> str:
    path.write_text(
        f"""name = "horizon"
metric = "val_accuracy"
direction = "maximize"
seed = 0

[budget]
n_trials = 10
epochs = 4
train_subset = 1500
val_fraction = 0.05

[sampler]
name = "tpe"
n_startup_trials = 3

[pruner]
{PRUNERS[pruner]}
[augment]
crop_padding = 2
hflip = true

[train]
schedule = "cosine"
eval_batch_size = 1024

[final]
ensemble = 2
tta = "flip"

[space]
n_conv       = 1
filters      = {{ choices = [8, 16] }}
kernel_size  = 3
pool         = {{ choices = ["flatten", "avg"] }}
n_fc         = 1
fc_size      = {{ low = 16, high = 64, log = true }}
dropout      = 0.0
optimizer    = {{ choices = ["adam", "sgd"] }}
lr           = {{ adam = {{ low = 1e-4, high = 3e-2, log = true }}, sgd = {{ low = 1e-3, high = 0.5, log = true }} }}
batch_size   = 64
weight_decay = 1e-4
"""
    )
    return str(path)


@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_a_full_horizon_study_with_two_workers_prunes_and_ends_with_the_exact_budget(tmp_path, real_data_dir, pruner):
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    path = study_file(tmp_path / "horizon.toml", pruner)
    args = ("--study", path, "--storage", url, "--data-dir", str(real_data_dir))
    hpo("optimize", *args, "--workers", "2", "--final", cwd=tmp_path, timeout=900)
    study = optuna.load_study(study_name="horizon", storage=url)
    trials = study.get_trials()
    by_state = {s: [t for t in trials if t.state.name == s] for s in ("COMPLETE", "PRUNED", "RUNNING", "WAITING")}
    assert len(by_state["COMPLETE"]) + len(by_state["PRUNED"]) == 10, [t.state.name for t in trials]
    assert not by_state["RUNNING"] and not by_state["WAITING"]
    assert by_state["PRUNED"], f"the {pruner} pruner stopped no trial"
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both workers ran trials
    for t in by_state["COMPLETE"]:  # every complete trial ran the whole horizon and kept its outputs
        assert sorted(t.intermediate_values) == [1, 2, 3, 4] and t.user_attrs["val_outputs"]
    for t in by_state["PRUNED"]:
        assert max(t.intermediate_values) < 4 and "val_outputs" not in t.user_attrs

    metrics = json.loads((tmp_path / "runs" / "horizon" / "final" / "metrics.json").read_text())
    assert metrics["epochs"] == 4  # the finalizer trains the trials' horizon
    members = [m for m in metrics["members"] if m["trained_by"] == "final-train"]  # beside them, trial models
    assert 1 <= len(members) <= 2 and members[0]["trial"] == study.best_trial.number
    assert metrics["ensemble"]["chosen_by"].startswith(("trial ", f"{len(members)} of up to 2 member(s)")), metrics[
        "ensemble"
    ]
