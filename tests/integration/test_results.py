"""What a person sees and takes away: artifacts, the dashboard note, status, resume, predict and export.

Real `hpo` processes on the real Fashion-MNIST files and the embedded SQLite storage; the
dashboard is read by headless Chromium; a worker is killed with a real SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna_dashboard._note import get_note_from_system_attrs

from conftest import CHROMIUM_FLAGS, chromium, free_port, page_text
from conftest import run_hpo as hpo
from hpo.learn import data
from hpo.search.artifacts import listed
from hpo.search.optuna_compat import study_id, study_storage

pytestmark = pytest.mark.integration

FINAL_FILES = {"model.pt", "metrics.json", "confusion_matrix.png", "learning_curve.png", "misclassified.png"}
PNG = b"\x89PNG\r\n\x1a\n"


def study_system_attrs(study: optuna.Study) -> dict:
    return study_storage(study).get_study_system_attrs(study_id(study))  # Optuna 5 has no Study.system_attrs


@pytest.fixture(scope="module")
def final_trained(tmp_path_factory, real_data_dir):
    """`hpo optimize --study tiny` then `hpo final-train --study tiny`, as the README runs them."""
    work = tmp_path_factory.mktemp("results")
    hpo("optimize", "--study", "tiny", "--workers", "2", "--data-dir", str(real_data_dir), cwd=work)
    result = hpo("final-train", "--study", "tiny", "--data-dir", str(real_data_dir), cwd=work)
    return work, f"sqlite:///{work / 'runs' / 'hpo.db'}", result


def test_final_train_uploads_its_files_to_the_study_and_writes_the_note(final_trained, real_data_dir):
    work, url, _ = final_trained
    store_dir = work / "runs" / "artifacts"
    study = optuna.load_study(study_name="tiny", storage=url)
    metas = listed(study_system_attrs(study))
    assert {m["filename"] for m in metas} == FINAL_FILES
    for m in metas:  # the bytes in the store are the files in runs/tiny/final
        assert (store_dir / m["artifact_id"]).read_bytes() == (work / "runs/tiny/final" / m["filename"]).read_bytes()
        if m["filename"].endswith(".png"):
            assert m["mimetype"] == "image/png" and (store_dir / m["artifact_id"]).read_bytes()[:8] == PNG
    # Trial checkpoints lived in the store while trials ran; none is left. A COMPLETE trial keeps its
    # validation outputs (what the finalizer chooses members on), and its trained weights if it ended
    # among the [final] ensemble (2) best COMPLETE trials so far; a pruned one keeps nothing.
    complete = sorted(
        (t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.datetime_complete
    )
    among_best = {t.number for i, t in enumerate(complete) if sum(e.value > t.value for e in complete[:i]) < 2}
    models = set()
    for t in study.trials:
        kept = sorted(m["filename"] for m in listed(t.system_attrs))
        if "trial-model.pt" in kept:
            models.add(t.number)
            kept.remove("trial-model.pt")
        assert kept == (["val-outputs.pt"] if t in complete else []), (t.number, t.state, kept)
    # A trial that completed while another ranked itself may keep one more; never one fewer.
    assert among_best <= models and complete[0].number in among_best and len(among_best) >= 2
    assert len(list(store_dir.iterdir())) == len(FINAL_FILES) + len(complete) + len(models)
    # Each retrained member whose trial kept its weights has that trial model beside it in the ensemble.
    metrics = json.loads((work / "runs/tiny/final/metrics.json").read_text())
    rows = {(r["trial"], r["trained_by"]) for r in metrics["members"]}
    retrained = {trial for trial, by in rows if by == "final-train"}
    assert {trial for trial, by in rows if by == "search"} == retrained & models
    assert metrics["ensemble"]["models"] == len(metrics["members"]) == len(rows)
    note = get_note_from_system_attrs(study_system_attrs(study), None)["body"]
    final = study.user_attrs["hpo:final"]
    assert f"Final-trained: test accuracy {100 * final['test_accuracy']:.2f} %" in note
    assert f"Trial {study.best_trial.number}" in note and "gap, test minus validation" in note
    metrics = json.loads((work / "runs/tiny/final/metrics.json").read_text())
    assert np.array(metrics["confusion_matrix"]).sum() == 10000
    assert np.trace(np.array(metrics["confusion_matrix"])) / 10000 == pytest.approx(final["test_accuracy"])

    # A second final-train replaces the first one's artifacts instead of piling them up.
    hpo("final-train", "--study", "tiny", "--data-dir", str(real_data_dir), cwd=work)
    study = optuna.load_study(study_name="tiny", storage=url)
    assert sorted(m["filename"] for m in listed(study_system_attrs(study))) == sorted(FINAL_FILES)
    assert len(list(store_dir.iterdir())) == len(FINAL_FILES) + len(complete) + len(models)


def test_dashboard_shows_the_plots_and_the_note_in_chromium(final_trained, tmp_path):
    work, _, _ = final_trained
    browser = chromium()
    port = free_port()
    dash = subprocess.Popen(
        [sys.executable, "-m", "hpo", "dashboard", "--study", "tiny", "--port", str(port)],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}/dashboard/studies/1"
        dom, text = page_text(browser, base, tmp_path / "chromium", until="Study Artifacts")
        assert "Study Artifacts" in text, text[:3000]
        # The metric has its name, and the attribute table leads with a line of settings, not a JSON blob.
        assert "val_accuracy" in text and "Objective 0" not in text, text[:3000]
        assert "maximize val_accuracy; trials of 3 epochs" in text and '"space"' not in text, text[:3000]
        images = dict(re.findall(r'<img[^>]*alt="([^"]+)"[^>]*src="([^"]+)"', dom))
        assert {"confusion_matrix.png", "learning_curve.png", "misclassified.png"} <= set(images), images
        for name in ("confusion_matrix.png", "learning_curve.png"):  # the browser's image URLs serve the PNGs
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{images[name]}", timeout=30) as response:
                assert response.read()[:8] == PNG
        _, note = page_text(browser, f"{base}/note", tmp_path / "chromium", until="Final-trained")
        assert "Final-trained: test accuracy" in note and "Params of the first member" in note, note[:3000]

        shot = tmp_path / "dashboard.png"
        subprocess.run(
            [
                browser,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={tmp_path / 'chromium'}",
                "--window-size=1400,2600",
                f"--screenshot={shot}",
                base,
            ],
            capture_output=True,
            timeout=90,
        )
        assert shot.read_bytes()[:8] == PNG and shot.stat().st_size > 50_000
        if os.environ.get("HPO_SCREENSHOT_DIR"):
            shutil.copy(shot, Path(os.environ["HPO_SCREENSHOT_DIR"]) / "dashboard-tiny.png")
    finally:
        dash.terminate()
        dash.wait(timeout=10)


STATUS_SCHEMA = {
    "schema": str,
    "study": str,
    "metric": str,
    "direction": str,
    "n_trials": int,
    "epochs_per_trial": int,
    "finished": int,
    "started": int,
    "remaining": int,
    "states": dict,
    "pruned_share": float,
    "epochs": dict,
    "mean_trial_s": (float, type(None)),
    "eta_s": (float, type(None)),
    "best": (dict, type(None)),
    "running": list,
    "final": (dict, type(None)),
    "time_budget": (dict, type(None)),
    "extended": list,
}


def test_status_json_schema_and_table(final_trained):
    work, _, _ = final_trained
    status = json.loads(hpo("status", "--study", "tiny", "--json", cwd=work).stdout)
    assert set(status) == set(STATUS_SCHEMA)
    for key, kind in STATUS_SCHEMA.items():
        assert isinstance(status[key], kind), (key, status[key])
    assert status["schema"] == "hpo-status/1"
    assert set(status["states"]) == {s.name for s in optuna.trial.TrialState}
    assert all(isinstance(n, int) for n in status["states"].values())
    assert status["finished"] == status["states"]["COMPLETE"] + status["states"]["PRUNED"] == 8 == status["started"]
    assert status["remaining"] == 0 and status["eta_s"] == 0 and status["running"] == []
    assert set(status["epochs"]) == {"trained", "saved_by_pruning", "saved_share"}
    assert status["epochs"]["saved_by_pruning"] == sum(
        3 - max(t.intermediate_values)
        for t in optuna.load_study(study_name="tiny", storage=f"sqlite:///{work}/runs/hpo.db").trials
        if t.state == optuna.trial.TrialState.PRUNED
    )
    assert set(status["best"]) == {"number", "value", "params"} and isinstance(status["best"]["value"], float)
    assert {"test_accuracy", "best_trial", "output_dir", "artifacts"} <= set(status["final"])

    table = hpo("status", "--study", "tiny", cwd=work).stdout
    assert re.search(r"^  COMPLETE +\d+$", table, re.M) and re.search(r"^  PRUNED +\d+$", table, re.M)
    assert "epochs saved by pruning" in table and "final-train: test accuracy" in table
    # --watch on a study that is done prints once and exits.
    watched = hpo("status", "--study", "tiny", "--watch", "--interval", "0.2", cwd=work, timeout=30)
    assert watched.stdout.count("state       trials") == 1


def test_predict_matches_direct_evaluation_and_reports_bad_files(final_trained, real_data_dir, tmp_path):
    from PIL import Image

    from hpo.learn.data import DeviceData
    from hpo.learn.inference import load_model
    from hpo.learn.train import evaluate

    work, _, _ = final_trained
    images, labels = data.load_split(real_data_dir, "test")
    chosen = np.random.default_rng(7).choice(len(images), 20, replace=False)
    paths = []
    for k, i in enumerate(chosen):
        paths.append(tmp_path / f"test-{i}.png")
        Image.fromarray(images[i]).save(paths[-1])
        if k == 9:  # bad files in the middle of the list
            (tmp_path / "corrupt.png").write_bytes(PNG + b"\x00\x00\x00\x0dIHDR garbage")
            (tmp_path / "notes.txt").write_text("not an image")
            paths += [tmp_path / "corrupt.png", tmp_path / "notes.txt"]
    result = hpo("predict", "--study", "tiny", "--json", *map(str, paths), cwd=work, check=False)
    assert result.returncode == 1
    assert "corrupt.png: cannot predict: corrupt image data" in result.stderr
    assert "notes.txt: cannot predict: not an image" in result.stderr
    assert "2 of 22 files could not be predicted" in result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    predicted = [r["label"] for r in rows if r["error"] is None]
    assert len(predicted) == 20 and all(0 < r["probability"] <= 1 for r in rows if r["error"] is None)

    model, _ = load_model(work / "runs/tiny/final/model.pt", "tiny")
    direct = evaluate(model, DeviceData(images[chosen], labels[chosen], torch.device("cpu")))
    assert predicted == [data.CLASSES[c] for c in direct.predictions.tolist()]

    # Any size and colour, dark on light: a 3x upscaled, inverted RGB JPEG still gets a class.
    Image.fromarray(255 - np.kron(images[chosen[0]], np.ones((3, 3), np.uint8))).convert("RGB").save(
        tmp_path / "big.jpg"
    )
    one = hpo("predict", "--study", "tiny", str(tmp_path / "big.jpg"), cwd=work)
    path, label, probability = one.stdout.strip().split("\t")
    assert path.endswith("big.jpg") and label in data.CLASSES and 0 < float(probability) <= 1


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_the_pytorch_model_on_the_test_split(final_trained, real_data_dir, fmt):
    from hpo.learn.data import normalize
    from hpo.learn.inference import load_model

    work, _, _ = final_trained
    result = hpo("export", "--study", "tiny", "--format", fmt, "--data-dir", str(real_data_dir), cwd=work)
    assert "same class for 100.00%" in result.stdout
    target = work / "runs/tiny/final" / ("model.ts" if fmt == "torchscript" else "model.onnx")

    # Checked again here through each runtime's own loader, against the checkpoint run in plain PyTorch fp32.
    images, labels = data.load_split(real_data_dir, "test")
    model, _ = load_model(work / "runs/tiny/final/model.pt", "tiny")
    with torch.no_grad():
        expected = model.float()(normalize(torch.from_numpy(images)[:, None])).numpy()
    x = images[:, None].astype(np.float32) / 255.0
    if fmt == "torchscript":
        extra = {"hpo.json": ""}
        loaded = torch.jit.load(str(target), _extra_files=extra)
        with torch.no_grad():
            got = loaded(torch.from_numpy(x)).numpy()
        assert json.loads(extra["hpo.json"])["classes"] == json.dumps(list(data.CLASSES))
    else:
        import onnx
        import onnxruntime

        session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        got = np.concatenate([session.run(None, {"image": x[s : s + 2500]})[0] for s in range(0, len(x), 2500)])
        props = {p.key: p.value for p in onnx.load(str(target)).metadata_props}
        assert json.loads(props["classes"]) == list(data.CLASSES) and props["study"] == "tiny"
    assert got.shape == (10000, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == expected.argmax(1)).all()
    # The figure final-train reported for the ensemble (2 members, flip TTA) is the exported file's own.
    metrics = json.loads((work / "runs/tiny/final/metrics.json").read_text())
    ensemble = metrics["ensemble"]
    assert (ensemble["requested"], ensemble["tta"], ensemble["shrunk"]) == (2, "flip", None)
    assert ensemble["trained"] in (1, 2)  # a second member joins if it raises validation
    assert ensemble["models"] == len(metrics["members"]) == ensemble["trained"] + ensemble["from_search"]
    assert (
        1 <= ensemble["from_search"] <= ensemble["trained"]
    )  # the lead trial ended among the best 2, so kept its model
    assert float((got.argmax(1) == labels).mean()) == metrics["test_accuracy"]
    exported = json.loads(props["members"] if fmt == "onnx" else json.loads(extra["hpo.json"])["members"])
    assert len(exported) == ensemble["models"]


RESUME_STUDY = """
name = "resume"
seed = 11
[budget]
n_trials = 1
epochs = 4
train_subset = 6000
val_fraction = 0.05
[sampler]
name = "random"
[pruner]
name = "none"
[augment]
crop_padding = 2
hflip = true
[final]
epochs = 1
[space]
n_conv = 2
filters = 16
kernel_size = 3
n_fc = 1
fc_size = 64
dropout = 0.2
optimizer = "adam"
lr = 3e-3
batch_size = 64
weight_decay = 1e-5
"""


def test_trial_killed_in_epoch_3_resumes_at_epoch_3_from_its_checkpoint(tmp_path, real_data_dir):
    study_file = tmp_path / "resume.toml"
    study_file.write_text(RESUME_STUDY)
    env = {
        **os.environ,
        "HPO_HEARTBEAT_INTERVAL": "1",
        "HPO_GRACE_PERIOD": "3",
        "HPO_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("HPO_STORAGE", None)
    url = f"sqlite:///{tmp_path / 'runs' / 'hpo.db'}"

    def start(log: Path, storage: str) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hpo",
                "worker",
                "--study",
                str(study_file),
                "--storage",
                storage,
                "--data-dir",
                str(real_data_dir),
            ],
            cwd=tmp_path,
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )

    first = start(tmp_path / "first.log", url)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # kill it once epoch 2 is checkpointed, i.e. during epoch 3
        try:
            trials = optuna.load_study(study_name="resume", storage=url).trials
        except (KeyError, Exception):
            trials = []
        if trials and trials[0].user_attrs.get("checkpoint", {}).get("epoch") == 2:
            first.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    else:
        first.kill()
        raise AssertionError("epoch 2 was never checkpointed:\n" + (tmp_path / "first.log").read_text())
    assert first.wait(timeout=30) == -signal.SIGKILL

    second = start(tmp_path / "second.log", url)
    assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()
    study = optuna.load_study(study_name="resume", storage=url)
    killed, retried = study.trials
    assert killed.state == optuna.trial.TrialState.FAIL
    assert killed.user_attrs["checkpoint"]["epoch"] == 2, "killed after epoch 3 was checkpointed: too slow"
    assert retried.state == optuna.trial.TrialState.COMPLETE and retried.system_attrs["failed_trial"] == 0
    assert retried.user_attrs["resumed_from_epoch"] == 2
    log = (tmp_path / "second.log").read_text()
    assert "trial 1 resumes after epoch 2" in log
    assert re.findall(r"trial 1 epoch (\d)/4", log) == ["3", "4"], log  # it started at epoch 3
    # Reported values are continuous: 1..4, the first two exactly the killed trial's.
    assert sorted(retried.intermediate_values) == [1, 2, 3, 4]
    assert all(
        retried.intermediate_values[e] == killed.intermediate_values[e]
        for e in (1, 2)
        if e in killed.intermediate_values
    )
    assert [h["epoch"] for h in retried.user_attrs["history"]] == [1, 2, 3, 4]
    # The retry's checkpoint is gone with it (its validation outputs and, as the study's only COMPLETE
    # trial, its trained weights stay, for the ensemble); the failed trial keeps the checkpoint the
    # retry started from. (Sorted: the storage lists a trial's attributes in no set order; SQLite reads
    # them by its (trial, key) index, and an artifact's key holds a random id.)
    assert sorted(m["filename"] for m in listed(retried.system_attrs)) == ["trial-model.pt", "val-outputs.pt"]
    assert [m["filename"] for m in listed(killed.system_attrs)] == ["checkpoint-epoch2.pt"]

    # And the resumed run is the run that was never interrupted: same seed, same values, to the bit.
    reference_url = f"sqlite:///{tmp_path / 'reference.db'}"
    reference = start(tmp_path / "reference.log", reference_url)
    assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()
    uninterrupted = optuna.load_study(study_name="resume", storage=reference_url).trials[0]
    assert uninterrupted.intermediate_values == retried.intermediate_values


def run_in_terminal(args: list[str], cwd: Path, timeout: float = 300, sized: bool = True) -> tuple[int, str]:
    """Run `python -m hpo ARGS` with stdin, stdout and stderr on a pseudo-terminal, as a person would
    (`sized=False`: a terminal that reports 0x0, like one made by `script` without a parent terminal)."""
    import fcntl
    import pty
    import struct
    import termios

    env = {**os.environ, "TERM": "xterm", "COLUMNS": "120"}
    for name in ("CI", "HPO_PROGRESS", "HPO_STORAGE"):
        env.pop(name, None)
    main, child = pty.openpty()
    if sized:
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpo", *args], cwd=cwd, env=env, stdin=child, stdout=child, stderr=child, close_fds=True
    )
    os.close(child)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def test_progress_bars_on_a_terminal_and_log_lines_in_a_pipe(tmp_path, real_data_dir):
    code, screen = run_in_terminal(
        ["optimize", "--study", "tiny", "--workers", "2", "--data-dir", str(real_data_dir)], tmp_path
    )
    assert code == 0, screen
    assert re.search(r"study tiny: +8/8 trials \|", screen), screen[-2000:]  # the bar, full at the end
    assert "best=" in screen and "worker logs: runs/tiny/logs/worker-N.log" in screen
    assert "hpo.search.objective" not in screen  # the workers' log lines went to their files instead
    assert (
        "trial 0 epoch 1/3"
        in (tmp_path / "runs/tiny/logs/worker-0.log").read_text()
        + (tmp_path / "runs/tiny/logs/worker-1.log").read_text()
    )

    code, screen = run_in_terminal(
        ["final-train", "--study", "tiny", "--data-dir", str(real_data_dir)], tmp_path, sized=False
    )
    assert code == 0, screen
    # The ensemble is chosen on validation outputs, so it may hold one member or two.
    assert re.search(r"final-train(?: member \d/2)?: +1/1 epochs \|.*loss=[\d.]+, acc=[\d.]+", screen), screen[-2000:]

    piped = hpo("final-train", "--study", "tiny", "--data-dir", str(real_data_dir), cwd=tmp_path)
    assert re.search(
        r"INFO +hpo\[\d+\] final-train(?: member 1/2)? epoch 1/1  loss [\d.]+  train_acc [\d.]+", piped.stderr
    ), piped.stderr
    assert "|" not in piped.stderr.replace("||", "")
