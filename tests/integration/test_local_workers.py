"""Real `hpo` processes on the real Fashion-MNIST files, with the embedded SQLite storage."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
import pytest
import torch

from conftest import free_port, write_idx
from conftest import run_hpo as hpo
from hpo.search.optuna_compat import study_id, study_storage

pytestmark = pytest.mark.integration


def states(url: str, name: str) -> dict[str, int]:
    study = optuna.load_study(study_name=name, storage=url)
    found: dict[str, int] = {}
    for t in study.trials:
        found[t.state.name] = found.get(t.state.name, 0) + 1
    return found


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, real_data_dir):
    """`hpo optimize --study tiny --workers 3`, run once for the tests of this module."""
    work = tmp_path_factory.mktemp("tiny")
    url = f"sqlite:///{work / 'hpo.db'}"
    result = hpo(
        "optimize", "--study", "tiny", "--workers", "3", "--storage", url, "--data-dir", str(real_data_dir), cwd=work
    )
    return work, url, result


def test_three_workers_finish_exactly_the_budget(tiny_study):
    _, url, result = tiny_study
    found = states(url, "tiny")
    assert found.get("COMPLETE", 0) + found.get("PRUNED", 0) == 8, found
    assert found.get("RUNNING", 0) == 0 and found.get("WAITING", 0) == 0, found
    assert "database is locked" not in result.stderr
    # All three workers ran trials, on a shared study.
    pids = {t.user_attrs.get("pid") for t in optuna.load_study(study_name="tiny", storage=url).trials}
    assert len(pids - {None}) == 3


def test_pruned_trials_appear_and_record_their_curve(tiny_study):
    _, url, _ = tiny_study
    study = optuna.load_study(study_name="tiny", storage=url)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, "the median pruner stopped no trial"
    for t in pruned:
        assert len(t.user_attrs["history"]) == len(t.intermediate_values) < 3
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in complete:
        assert sorted(t.intermediate_values) == [1, 2, 3]
        assert (
            t.value == t.intermediate_values[3] == pytest.approx(t.user_attrs["history"][-1]["val_accuracy"], abs=1e-5)
        )
        assert t.user_attrs["n_params"] > 0 and t.user_attrs["wall_time_s"] > 0
        assert t.user_attrs["device"] == "cpu"


def test_settings_are_recorded_in_the_study(tiny_study):
    _, url, _ = tiny_study
    study = optuna.load_study(study_name="tiny", storage=url)
    system_attrs = study_storage(study).get_study_system_attrs(study_id(study))
    stored = system_attrs["hpo:config"]  # where the dashboard does not lead with them
    assert stored["budget"]["n_trials"] == 8 and stored["space"]["n_conv"] == {"low": 1, "high": 2}
    assert study.metric_names == ["val_accuracy"]
    assert study.user_attrs["settings"] == (
        "maximize val_accuracy; trials of 3 epochs on 1,000 images until 8 "
        "finished; tpe sampler, median pruner; final: 1 epochs, ensemble of 2, "
        "flip TTA"
    )
    assert "hpo:config" not in study.user_attrs


def test_status_needs_only_the_storage(tiny_study):
    work, url, _ = tiny_study
    result = hpo("status", "--study", "tiny", "--storage", url, "--json", cwd=work)
    summary = json.loads(result.stdout)
    assert summary["finished"] == 8 and summary["states"]["RUNNING"] == 0
    assert 0 < summary["pruned_share"] < 1
    assert summary["best"]["value"] == optuna.load_study(study_name="tiny", storage=url).best_value


def test_final_train_writes_files_and_reproduces(tiny_study, real_data_dir):
    work, url, _ = tiny_study
    runs = []
    for out in ("final-a", "final-b"):
        hpo(
            "final-train", "--study", "tiny", "--storage", url, "--data-dir", str(real_data_dir), "--out", out, cwd=work
        )
        runs.append(json.loads((work / out / "metrics.json").read_text()))
    a, b = runs
    study = optuna.load_study(study_name="tiny", storage=url)
    assert a["best_trial"] == study.best_trial.number and a["test_images"] == 10000
    assert set(a["per_class_accuracy"]) == {
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    }
    assert {"torch", "optuna", "python"} <= set(a["versions"])
    assert a["test_accuracy"] > 0.5  # one epoch of a tiny model on all 60,000 images
    assert a["test_accuracy"] == b["test_accuracy"] and a["test_loss"] == b["test_loss"]
    checkpoint = torch.load(work / "final-a" / "model.pt", weights_only=True)
    assert checkpoint["params"] == study.best_trial.params and checkpoint["study"] == "tiny"
    assert study.user_attrs["hpo:final"]["test_accuracy"] == b["test_accuracy"]


SINGLE = """
name = "isolation"
seed = 5
[budget]
n_trials = 3
epochs = 2
train_subset = 600
val_fraction = 0.05
[sampler]
name = "tpe"
multivariate = true
constant_liar = true
n_startup_trials = 3
[pruner]
name = "none"
[augment]
crop_padding = 2
hflip = true
[space]
n_conv = { low = 1, high = 2 }
filters = { choices = [8, 16] }
kernel_size = 3
n_fc = 1
fc_size = 32
dropout = 0.1
optimizer = { choices = ["adam", "sgd"] }
lr = { low = 1e-3, high = 1e-1, log = true }
batch_size = 64
weight_decay = 1e-5
"""


def test_trials_never_read_the_test_split(tmp_path, real_data_copy):
    """Replace the test files with garbage: every trial's value must stay the same."""
    (tmp_path / "isolation.toml").write_text(SINGLE)
    values = []
    for variant in ("real", "garbage"):
        if variant == "garbage":
            for name in os.listdir(real_data_copy):
                if name.startswith("t10k"):
                    os.remove(real_data_copy / name)
            write_idx(real_data_copy / "t10k-images-idx3-ubyte", torch.randint(0, 255, (10, 28, 28)).numpy())
            (real_data_copy / "t10k-labels-idx1-ubyte").write_bytes(b"not an idx file")
        url = f"sqlite:///{tmp_path / variant}.db"
        hpo(
            "worker",
            "--study",
            str(tmp_path / "isolation.toml"),
            "--storage",
            url,
            "--data-dir",
            str(real_data_copy),
            "--sampler-seed",
            "1",
            "--threads",
            "1",
            cwd=tmp_path,
        )
        study = optuna.load_study(study_name="isolation", storage=url)
        values.append([(t.params, t.value) for t in study.trials])
    assert len(values[0]) == 3 and values[0] == values[1]


def test_dashboard_serves_the_study_from_the_embedded_storage(tiny_study):
    """`hpo dashboard` opens the same SQLite file the workers wrote and serves the study's trials."""
    import time
    import urllib.request

    work, url, _ = tiny_study
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "HPO_STORAGE"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpo", "dashboard", "--study", "tiny", "--storage", url, "--port", str(port)],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    studies = json.loads(r.read())["study_summaries"]
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"dashboard did not answer:\n{proc.stdout.read() if proc.stdout else ''}"
                    ) from None
                time.sleep(0.5)
        assert [s["study_name"] for s in studies] == ["tiny"]
        shown = studies[0]["study_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{shown}", timeout=10) as r:
            detail = json.loads(r.read())
        assert len(detail["trials"]) == len(optuna.load_study(study_name="tiny", storage=url).trials)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_bench_reports_both_pipelines(tmp_path, real_data_dir):
    """`hpo bench` runs: figures are checked by reading them, never by timing assertions here."""
    result = hpo(
        "bench",
        "--images",
        "512",
        "--rounds",
        "2",
        "--json",
        "--data-dir",
        str(real_data_dir),
        "--threads",
        "1",
        cwd=tmp_path,
    )
    report = json.loads(result.stdout)
    for kind in ("engine", "seed"):
        assert report[kind]["images"] > 0 and report[kind]["images_per_s"] > 0 and report[kind]["peak_rss_mib"] > 0
        rates = report[kind]["rounds_images_per_s"]
        assert len(rates) == 2 and report[kind]["images_per_s"] == pytest.approx(sum(rates) / 2)  # median of two
    assert report["speedup"] == pytest.approx(report["engine"]["images_per_s"] / report["seed"]["images_per_s"])
    assert len(report["round_speedups"]) == 2
    assert report["model_parameters"] == 1630186  # the notebook CNN: 3136 -> 512 -> 10 head
