"""Users' own images, end to end with real worker processes: a folder of real Fashion-MNIST pictures
written as colour PNGs of another size, a Kaggle-style CSV written from the IDX files, and a host
whose copy of the data differs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
from PIL import Image

from conftest import run_hpo as hpo
from conftest import write_idx
from hpo import attrs
from hpo.learn import data, sources
from hpo.settings.config import DataSettings

pytestmark = pytest.mark.integration

FOLDER_CLASSES = {"T-shirt": 0, "Trouser": 1, "Sneaker": 7, "Bag": 8}  # folder name -> Fashion-MNIST label
PER_CLASS = 120
SPACE = """
[space]
n_conv       = { low = 1, high = 2 }
filters      = { choices = [8, 16] }
kernel_size  = 3
n_fc         = 1
fc_size      = 32
dropout      = 0.0
optimizer    = "adam"
lr           = { low = 2e-3, high = 1e-2, log = true }
batch_size   = 32
weight_decay = 1e-4
"""


def study_text(name: str, data_lines: str, n_trials: int = 4, epochs: int = 3) -> str:
    return f"""name = "{name}"
[budget]
n_trials = {n_trials}
epochs = {epochs}
[pruner]
name = "none"
[final]
epochs = 2
[data]
{data_lines}
{SPACE}"""


@pytest.fixture(scope="module")
def folder_study(tmp_path_factory, real_data_dir: Path):
    """Four real Fashion-MNIST classes as 40x40 colour PNGs, one folder each (no test folder: the study
    holds its test split out), searched and finalized by `hpo optimize --time 3m --final`."""
    work = tmp_path_factory.mktemp("own")
    images, labels = data.load_split(real_data_dir, "train")
    for name, label in FOLDER_CLASSES.items():
        (work / "pictures" / name).mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(labels == label)[:PER_CLASS]):
            picture = Image.fromarray(images[index]).resize((40, 40)).convert("RGB")
            picture.save(work / "pictures" / name / f"{name.lower()}-{i:03d}.png")
    data_lines = f'source = "folder"\npath = "{work / "pictures"}"\nimage_size = 24'
    (work / "own.toml").write_text(study_text("own-images", data_lines))
    result = hpo("optimize", "--study", "own.toml", "--workers", "2", "--time", "3m", "--final", cwd=work)
    return work, result


def test_a_folder_study_searches_and_scores_its_held_out_test_split(folder_study) -> None:
    work, result = folder_study
    assert "test accuracy" in result.stdout, result.stdout
    metrics = json.loads((work / "runs" / "own-images" / "final" / "metrics.json").read_text())
    assert metrics["test_images"] == len(FOLDER_CLASSES) * PER_CLASS // 10  # 10 % of each class, held out
    assert set(metrics["per_class_accuracy"]) == set(FOLDER_CLASSES)
    assert metrics["test_accuracy"] > 0.5  # four distinct classes: far above chance (0.25) after a short search
    study = optuna.load_study(study_name="own-images", storage=f"sqlite:///{work / 'runs' / 'hpo.db'}")
    recorded = study.user_attrs[attrs.DATA]
    assert recorded["classes"] == sorted(FOLDER_CLASSES) and recorded["shape"] == [3, 24, 24]
    assert recorded["held_out"]["per_class"] == {name: PER_CLASS // 10 for name in FOLDER_CLASSES}
    assert len(study.trials) == 4


def test_predict_names_the_folders_classes(folder_study) -> None:
    work, _ = folder_study
    trousers = sorted((work / "pictures" / "Trouser").glob("*.png"))[:10]
    result = hpo("predict", "--study", "own-images", "--json", *map(str, trousers), cwd=work)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 10 and {row["label"] for row in rows} <= set(FOLDER_CLASSES)
    assert sum(row["label"] == "Trouser" for row in rows) >= 7, rows


def test_onnx_export_matches_the_pytorch_model_on_the_test_split(folder_study) -> None:
    work, _ = folder_study  # onnx and onnxruntime are [test] dependencies: a missing one fails here
    result = hpo("export", "--study", "own-images", "--format", "onnx", cwd=work)
    assert "input float32 (N, 3, 24, 24), pixels in [0, 1], RGB" in result.stdout, result.stdout
    assert "check on the 48 test images" in result.stdout and "same class for 100.00%" in result.stdout
    import onnx

    meta = {
        p.key: p.value for p in onnx.load(str(work / "runs" / "own-images" / "final" / "model.onnx")).metadata_props
    }
    assert json.loads(meta["classes"]) == sorted(FOLDER_CLASSES)
    assert len(json.loads(meta["normalisation"])["mean"]) == 3


def write_csv(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    rows = ["label," + ",".join(f"pixel{i + 1}" for i in range(784))]
    rows += [f"{y}," + ",".join(map(str, x.reshape(-1))) for x, y in zip(images, labels)]
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def subset(tmp_path_factory, real_data_dir: Path) -> Path:
    """The first 3,000 training and 500 test images of the real files, as IDX and as Kaggle's CSV."""
    work = tmp_path_factory.mktemp("subset")
    (work / "idx").mkdir()
    (work / "csv").mkdir()
    for split, n, csv_name in (("train", 3000, "fashion-mnist_train.csv"), ("test", 500, "fashion-mnist_test.csv")):
        images, labels = data.load_split(real_data_dir, split)
        for stem, array in zip(data.FILES[split], (images[:n], labels[:n])):
            write_idx(work / "idx" / stem, array, gz=True)
        write_csv(work / "csv" / csv_name, images[:n], labels[:n])
    return work


def test_kaggle_csv_gives_the_same_images_and_labels_as_the_idx_files(subset: Path) -> None:
    kaggle = DataSettings(
        source="csv", path=str(subset / "csv"), train="fashion-mnist_train.csv", test="fashion-mnist_test.csv"
    )
    from_csv = sources.load(kaggle, subset / "csv", seed=0)
    from_idx = sources.load(DataSettings(source="idx", path=str(subset / "idx")), subset / "idx", seed=0)
    for part in ("train", "test"):
        np.testing.assert_array_equal(getattr(from_csv, part).images, getattr(from_idx, part).images)
        np.testing.assert_array_equal(getattr(from_csv, part).labels, getattr(from_idx, part).labels)
    assert from_csv.digest == from_idx.digest


def test_a_tiny_csv_study_runs_end_to_end(subset: Path) -> None:
    data_lines = (
        f'source = "csv"\npath = "{subset / "csv"}"\ntrain = "fashion-mnist_train.csv"\n'
        'test = "fashion-mnist_test.csv"\n'
        'classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", '
        '"Ankle boot"]'
    )
    (subset / "kaggle.toml").write_text(study_text("kaggle", data_lines, n_trials=2, epochs=1))
    result = hpo("optimize", "--study", "kaggle.toml", "--workers", "1", "--final", cwd=subset)
    assert "test accuracy" in result.stdout and "500 test images" in result.stdout, result.stdout


def test_a_worker_whose_data_differs_refuses_to_join(subset: Path, tmp_path: Path) -> None:
    (tmp_path / "digits.toml").write_text(
        study_text("same-data", f'source = "idx"\npath = "{subset / "idx"}"', n_trials=1, epochs=1)
    )
    hpo("optimize", "--study", "digits.toml", "--workers", "1", cwd=tmp_path)
    changed = tmp_path / "changed"
    shutil.copytree(subset / "idx", changed)
    images = data.read_idx(changed / "train-images-idx3-ubyte.gz").copy()
    images[123, 14, 14] ^= 0x55  # one pixel of one image
    write_idx(changed / "train-images-idx3-ubyte", images, gz=True)
    url = f"sqlite:///{tmp_path / 'runs' / 'hpo.db'}"
    study = optuna.load_study(study_name="same-data", storage=url)
    ours = study.user_attrs[attrs.DATA]["sha256"]
    for command in (["worker"], ["final-train"]):
        result = hpo(*command, "--study", "digits.toml", "--data-dir", str(changed), cwd=tmp_path, check=False)
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert result.returncode == 1 and len(errors) == 1, result.stderr
        assert "this host's data differs from the data of study 'same-data'" in errors[0] and ours[:12] in errors[0]
        theirs = sources.load(DataSettings(source="idx", path=str(changed)), changed, 0).digest
        assert theirs[:12] in errors[0] and theirs != ours
    assert len(optuna.load_study(study_name="same-data", storage=url).trials) == 1  # no trial joined
