"""The failure-mode table (docs/failure-modes.md), row by row: one clear message, exit code 1, nothing lost.

Each row runs the real `hpo` CLI in-process; rows that need PostgreSQL, real processes or signals
live in tests/integration/test_faults.py.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from conftest import REPO, make_dataset, user_error, write_idx
from hpo.errors import DataError, HpoError
from hpo.learn import checkpoints, data
from hpo.learn.data import DeviceData, TrialData
from hpo.learn.devices import place
from hpo.search import storage
from hpo.search import study as study_mod
from hpo.search import worker as worker_mod
from hpo.search.optuna_compat import study_id, study_storage
from hpo.search.session import Workspace
from hpo.settings import config

TINY = (REPO / "studies" / "tiny.toml").read_text()


# --------------------------------------------------------------------------- study files

BAD_FILES = {
    "not TOML": ("name = [unclosed\n", "not valid TOML"),
    "unknown key": (TINY.replace("seed = 0", "sed = 0"), "unknown key 'sed'. Did you mean 'seed'?"),
    "wrong type": (TINY.replace("n_trials = 8", 'n_trials = "8"'), "n_trials must be int, got str '8'"),
    "low > high": (
        TINY.replace("lr           = { low = 1e-3, high = 1e-1", "lr           = { low = 1e-1, high = 1e-3"),
        "low (0.1) is greater than high (0.001). Swap them.",
    ),
    "log range with 0": (
        TINY.replace("weight_decay = { low = 1e-6", "weight_decay = { low = 0.0"),
        "a log range must be above 0",
    ),
    "empty choices": (
        TINY.replace('optimizer    = { choices = ["adam", "sgd", "rmsprop"] }', "optimizer    = { choices = [] }"),
        "choices must be a non-empty list",
    ),
    "n_trials < 1": (TINY.replace("n_trials = 8", "n_trials = 0"), "n_trials must be at least 1, got 0"),
    "unknown sampler": (TINY.replace('name = "tpe"', 'name = "tpex"'), "name 'tpex' is not known. Did you mean 'tpe'?"),
    "unknown pruner": (
        TINY.replace('name = "median"', 'name = "mediam"'),
        "name 'mediam' is not known. Did you mean 'median'?",
    ),
}


@pytest.mark.parametrize("row", list(BAD_FILES))
@pytest.mark.parametrize("command", ["worker", "optimize", "create"])
def test_invalid_study_file_writes_nothing(run, tmp_path, row, command):
    text, message = BAD_FILES[row]
    assert text != TINY or row == "not TOML"
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    db = tmp_path / "s.db"
    user_error(run(command, "--study", str(bad), "--storage", f"sqlite:///{db}"), message)
    assert not db.exists() and not (tmp_path / "runs").exists()


def test_missing_study_file(run):
    user_error(run("worker", "--study", "cnn-quik"), "no study file named 'cnn-quik'", "Did you mean 'cnn-quick'?")


# --------------------------------------------------------------------------- storage


def test_malformed_url(run):
    user_error(
        run("status", "--study", "tiny", "--storage", "localhost:5432/hpo"),
        "malformed storage URL",
        "postgresql+psycopg2://user:password@host:5432/dbname",
    )


def test_unsupported_scheme(run):
    user_error(
        run("status", "--study", "tiny", "--storage", "mysql://u:topsecret@h/db"),
        "unsupported storage scheme 'mysql'",
        "u:***@h",
    )


def test_unreachable_database_waits_then_exits(run, monkeypatch):
    monkeypatch.setenv("HPO_DB_WAIT", "1")
    line = user_error(
        run("status", "--study", "tiny", "--storage", "postgresql+psycopg2://u:topsecret@127.0.0.1:9/x"),
        "cannot reach the database",
        "after waiting 1s",
        "raise HPO_DB_WAIT",
    )
    assert "topsecret" not in line


@pytest.mark.parametrize("command", ["status", "final-train"])
def test_study_that_does_not_exist(run, tmp_path, command):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study_mod.create_or_load(storage.open_storage(url), config.load("tiny"))
    user_error(
        run(command, "--study", "cnn", "--storage", url), "no study named 'cnn'", "Studies in this storage: tiny"
    )


def test_existing_study_with_another_space(run, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study_mod.create_or_load(storage.open_storage(url), config.load("tiny"))
    changed = tmp_path / "tiny.toml"
    changed.write_text(TINY.replace("n_conv       = { low = 1, high = 2 }", "n_conv       = { low = 1, high = 3 }"))
    user_error(
        run("create", "--study", str(changed), "--storage", url),
        "already exists with a different search space (n_conv differ",
    )
    study = optuna.load_study(study_name="tiny", storage=url)
    assert study_storage(study).get_study_system_attrs(study_id(study))["hpo:config"]["space"]["n_conv"]["high"] == 2


# --------------------------------------------------------------------------- data


def broken_copy(tmp_path: Path, how: str) -> Path:
    d = make_dataset(tmp_path / "data", n_train=300)
    images = d / "train-images-idx3-ubyte.gz"
    if how == "truncated":
        images.write_bytes(images.read_bytes()[:-40])
    elif how == "wrong magic":
        images.unlink()
        (d / "train-images-idx3-ubyte").write_bytes(b"GIF89a" + bytes(2000))
    elif how == "different lengths":
        write_idx(d / "train-labels-idx1-ubyte", np.arange(299) % 10, gz=True)
    return d


@pytest.mark.parametrize(
    "how, message",
    [("truncated", "cannot read"), ("wrong magic", "not an IDX file"), ("different lengths", "holds 300 images but")],
)
def test_bad_data_files_stop_the_worker_before_the_study_is_touched(run, tmp_path, how, message):
    d = broken_copy(tmp_path, how)
    url = f"sqlite:///{tmp_path / 's.db'}"
    user_error(
        run("worker", "--study", "tiny", "--storage", url, "--data-dir", str(d)),
        message,
        "Replace" if how != "different lengths" else "matching pair",
    )
    assert optuna.get_all_study_summaries(url) == []


def test_no_data_files_lists_the_three_ways(run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    user_error(
        run("worker", "--study", "tiny", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--data-dir", str(empty)),
        "lacks some Fashion-MNIST files",
        "--data-dir DIR or HPO_DATA_DIR",
        "apt-get install dataset-fashion-mnist",
        "torchvision (`pip install 'hpo-service[bench]'`), which downloads them",
    )


def _find_as_nobody(directory: str, out) -> None:
    os.setgid(65534)
    os.setuid(65534)
    try:
        data.find_data_dir(directory)
        out.send("no error")
    except DataError as e:
        out.send(str(e))


def test_unreadable_data_directory():
    """Root reads everything, so the check runs in a forked child that has become `nobody`."""
    base = Path(tempfile.mkdtemp(prefix="hpo-perm-"))
    try:
        os.chmod(base, 0o755)
        d = make_dataset(base / "data")
        os.chmod(d, 0o000)
        if os.geteuid() == 0:
            ctx = multiprocessing.get_context("fork")
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_find_as_nobody, args=(str(d), child))
            p.start()
            message = parent.recv()
            p.join(10)
        else:
            with pytest.raises(DataError) as info:
                data.find_data_dir(d)
            message = str(info.value)
        assert "is not readable by this user" in message
    finally:
        os.chmod(base / "data", 0o755)
        import shutil

        shutil.rmtree(base)


# --------------------------------------------------------------------------- training


def synthetic_trial_data(n: int = 200) -> TrialData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (n, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    cpu = torch.device("cpu")
    return TrialData(DeviceData(images, labels, cpu), DeviceData(images[:50], labels[:50], cpu))


def run_worker(tmp_path, cfg_text: str, enqueue: list[dict] | None = None, share=None):
    path = tmp_path / "w.toml"
    path.write_text(cfg_text)
    store = storage.open_storage(f"sqlite:///{tmp_path / 'w.db'}")
    study, cfg = study_mod.create_or_load(store, config.load(str(path)), sampler_seed=0)
    for params in enqueue or []:
        study.enqueue_trial(params)
    placement = place("cpu", 1)
    result = worker_mod.run(study, cfg, synthetic_trial_data(), Workspace(store, None, placement, None, share))
    return study, result


def test_nan_loss_fails_the_trial_with_a_reason_and_the_worker_carries_on(tmp_path):
    text = TINY.replace("n_trials = 8", "n_trials = 3").replace("train_subset = 1000", "train_subset = 0")
    diverging = {
        "n_conv": 1,
        "filters_0": 8,
        "kernel_size": 3,
        "n_fc": 1,
        "fc_size": 16,
        "dropout": 0.0,
        "optimizer": "sgd",
        "lr": 1e6,
        "batch_size": 64,
        "weight_decay": 1e-6,
    }
    study, result = run_worker(tmp_path, text, enqueue=[diverging])
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and failed[0].params["lr"] == 1e6
    assert re.search(r"training loss became (nan|inf)", failed[0].user_attrs["fail_reason"])
    assert sum(t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL for t in study.trials) == 3


def test_out_of_memory_fails_the_trial_and_the_worker_carries_on(tmp_path, monkeypatch):
    """No GPU here, so the first fit raises the error CUDA would; everything around it is real."""
    import hpo.search.objective as objective_mod

    real_fit, calls = objective_mod.fit, []

    def fit_that_runs_out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(objective_mod, "fit", fit_that_runs_out_of_memory_once)
    study, result = run_worker(tmp_path, TINY.replace("n_trials = 8", "n_trials = 2"))
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["fail_reason"].startswith("out of memory on cpu")
    assert result.trials_run == 3 and "budget met: 2/2" in result.reason


def test_a_worker_trains_on_the_cores_a_local_worker_left_behind(tmp_path, caplog):
    """Two workers of one `hpo optimize` on 2 cores: while the other (a real process) holds its share,
    a trial trains on 1 thread; once it has left, on both, and each epoch of its history says so."""
    from hpo.learn.devices import CpuShare

    folder = CpuShare.create(2)
    other = subprocess.Popen(
        [sys.executable, "-c", "from hpo.learn.devices import CpuShare; s = CpuShare.from_env(); input()"],
        env={**os.environ, "HPO_CPU_SHARE": str(folder)},
        stdin=subprocess.PIPE,
        text=True,
    )
    before = torch.get_num_threads()
    caplog.set_level("INFO", logger="hpo")
    share = None
    try:
        while not list(folder.glob("worker-*.lock")):
            time.sleep(0.05)
        share = CpuShare(folder, cores=2)
        text = TINY.replace("n_trials = 8", "n_trials = 1")
        threads = []
        for phase in ("beside", "alone"):
            if phase == "alone":
                other.communicate("\n", timeout=30)  # it exits: the kernel frees its lock
            (tmp_path / phase).mkdir()
            study, _ = run_worker(tmp_path / phase, text, share=share)
            threads.append([row["threads"] for row in study.trials[0].user_attrs["history"]])
        assert threads == [[1, 1, 1], [2, 2, 2]]
        assert torch.get_num_threads() == 2
        assert "1 of 2 local workers still run, so it trains on 2 threads from epoch 1" in caplog.text
    finally:
        other.kill()
        if share is not None:
            share.leave()
        shutil.rmtree(folder)
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- final-train


def test_output_directory_that_cannot_be_created(run, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study, _ = study_mod.create_or_load(storage.open_storage(url), config.load("tiny"))
    study.add_trial(optuna.create_trial(value=0.5, params={}, distributions={}))
    (tmp_path / "a-file").write_text("x")
    user_error(
        run("final-train", "--study", "tiny", "--storage", url, "--out", str(tmp_path / "a-file" / "out")),
        "cannot create the output directory",
        "Pass a writable --out",
    )


def checkpoint(path: Path, **overrides) -> Path:
    payload = {"format": checkpoints.FINAL_FORMAT, "study": "tiny", "trial": 0, "params": {}, "state_dict": {}}
    payload.update(overrides)
    torch.save(payload, path)
    return path


def test_checkpoint_of_another_study_or_version_is_refused(run, tmp_path):
    with pytest.raises(HpoError, match="belongs to study 'other', not 'tiny'"):
        checkpoints.load_final(checkpoint(tmp_path / "a.pt", study="other"), "tiny")
    with pytest.raises(HpoError, match="has checkpoint format 'hpo-checkpoint/0'"):
        checkpoints.load_final(checkpoint(tmp_path / "b.pt", format="hpo-checkpoint/0"), "tiny")
    assert checkpoints.load_final(checkpoint(tmp_path / "c.pt"), "tiny")["study"] == "tiny"
    # final-train will not overwrite another study's model.
    url = f"sqlite:///{tmp_path / 's.db'}"
    study, _ = study_mod.create_or_load(storage.open_storage(url), config.load("tiny"))
    study.add_trial(optuna.create_trial(value=0.5, params={}, distributions={}))
    out = tmp_path / "out"
    out.mkdir()
    checkpoint(out / "model.pt", study="other")
    user_error(run("final-train", "--study", "tiny", "--storage", url, "--out", str(out)), "belongs to study 'other'")
    assert checkpoints.load_final(out / "model.pt")["study"] == "other"


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoints_load_with_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoints.FINAL_FORMAT, "study": "tiny", "payload": Evil()}, path)
    with pytest.raises(HpoError, match="not a readable hpo checkpoint"):
        checkpoints.load_final(path)


# --------------------------------------------------------------------------- security, statically


def test_no_shell_strings_in_the_package():
    sources = list((REPO / "src" / "hpo").rglob("*.py"))
    assert len(sources) > 30, sources  # the whole package, subpackages included
    for source in sources:
        text = source.read_text()
        assert "shell=True" not in text and "os.system" not in text and "os.popen" not in text, source


def test_compose_keeps_postgres_private_and_the_dashboard_on_loopback():
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "ports" not in services["postgres"]
    assert services["dashboard"]["ports"] == ["127.0.0.1:8080:8080"]
    assert "${POSTGRES_PASSWORD:?" in services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert ".env" in (REPO / ".gitignore").read_text().split()
    assert (REPO / ".env.example").exists() and ".env" in (REPO / ".dockerignore").read_text().split()
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^USER hpo$", dockerfile, re.M) and "PASSWORD" not in dockerfile


@pytest.mark.parametrize(
    "variable, value, command, text",
    [
        ("HPO_MAX_RETRY", "abc", ("status", "--study", "tiny"), "HPO_MAX_RETRY='abc' is not an integer of at least 0"),
        ("HPO_HEARTBEAT_INTERVAL", "0", ("status", "--study", "tiny"), "HPO_HEARTBEAT_INTERVAL='0' is not an integer"),
        ("HPO_GRACE_PERIOD", "-5", ("studies",), "HPO_GRACE_PERIOD='-5' is not an integer of at least 1 seconds"),
        ("HPO_DB_WAIT", "soon", ("studies",), "HPO_DB_WAIT='soon' is not a number of at least 0 seconds"),
        ("HPO_TRIALS_PER_GPU", "two", ("worker", "--study", "tiny"), "HPO_TRIALS_PER_GPU='two': 'two' is not a valid"),
        ("HPO_THREADS", "abc", ("worker", "--study", "tiny"), "HPO_THREADS='abc': 'abc' is not a valid integer"),
        ("HPO_SAMPLER_SEED", "x", ("worker", "--study", "tiny"), "HPO_SAMPLER_SEED='x': 'x' is not a valid integer"),
    ],
)
def test_a_bad_numeric_environment_variable_is_one_line_naming_it(
    run, tmp_path, monkeypatch, variable, value, command, text
):
    monkeypatch.setenv(variable, value)
    result = run(*command)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert text in result.output
    assert not (tmp_path / "runs").exists()  # nothing stored


def test_gpu_count_override_that_is_not_a_number_is_named():
    from hpo.learn.devices import gpu_count

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HPO_GPU_COUNT", "many")
        with pytest.raises(HpoError, match=r"HPO_GPU_COUNT='many' is not an integer of at least 0"):
            gpu_count()


def test_export_without_onnx_names_the_distribution_to_install():
    source = (REPO / "src" / "hpo" / "learn" / "inference.py").read_text()
    assert "pip install 'hpo-service[onnx]'" in source and "'hpo[onnx]'" not in source
