"""The [data] section's sources: folders of images, Kaggle-style CSV files, IDX directories, the held-out
test split, the data fingerprint, and one clear line for each kind of bad data, with nothing stored."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_dataset, write_idx
from hpo.errors import ConfigError, DataError
from hpo.learn import data, sources
from hpo.learn.readers import decode_image
from hpo.settings import config
from hpo.settings.config import DataSettings


def write_folder(root: Path, arrays: dict[str, list[np.ndarray]], mode: str = "L", suffix: str = ".png") -> Path:
    """One subdirectory per class, one image file per array (uint8, H x W or H x W x 3)."""
    for name, images in arrays.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, array in enumerate(images):
            Image.fromarray(array).convert(mode).save(root / name / f"{i:04d}{suffix}")
    return root


def random_images(n: int, side: int = 20, seed: int = 0, colour: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (side, side, 3) if colour else (side, side)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def folder_settings(path: Path, **kw) -> DataSettings:
    return DataSettings(source="folder", path=str(path), image_size=kw.pop("image_size", 16), **kw)


def test_a_folder_reads_its_classes_in_name_order_resized_with_a_held_out_test_split(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "pets", {"dog": random_images(30, 40, 1), "cat": random_images(20, 24, 2)})
    dataset = sources.load(folder_settings(root), root, seed=3)
    assert dataset.classes == ("cat", "dog")
    assert (dataset.channels, dataset.image_size) == (1, 16)
    assert len(dataset.train) + len(dataset.test) == 50
    assert dataset.held_out is not None and dataset.held_out["per_class"] == {"cat": 2, "dog": 3}
    assert np.bincount(dataset.test.labels).tolist() == [2, 3]
    again = sources.load(folder_settings(root), root, seed=3)
    assert again.fingerprint() == dataset.fingerprint()  # the same split for the same seed
    other = sources.load(folder_settings(root), root, seed=4)
    assert other.held_out["sha256"] != dataset.held_out["sha256"]
    assert other.fingerprint()["sha256"] != dataset.fingerprint()["sha256"]


def test_a_folder_with_train_and_test_directories_uses_its_own_test_split(tmp_path: Path) -> None:
    write_folder(tmp_path / "d" / "train", {"a": random_images(12, seed=1), "b": random_images(12, seed=2)})
    write_folder(tmp_path / "d" / "test", {"a": random_images(3, seed=3), "b": random_images(4, seed=4)})
    dataset = sources.load(folder_settings(tmp_path / "d"), tmp_path / "d", seed=0)
    assert (len(dataset.train), len(dataset.test), dataset.held_out) == (24, 7, None)
    assert dataset.test.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_colour_images_keep_three_channels_and_their_own_statistics(tmp_path: Path) -> None:
    root = write_folder(
        tmp_path / "c", {"x": random_images(10, colour=True), "y": random_images(10, seed=5, colour=True)}, "RGB"
    )
    dataset = sources.load(folder_settings(root, image_size=8), root, seed=0)
    assert dataset.train.images.shape[1:] == (3, 8, 8)
    assert len(dataset.mean) == len(dataset.std) == 3
    assert all(0.4 < m < 0.6 for m in dataset.mean)  # uniform noise averages mid-grey


def test_a_photo_is_read_upright_as_its_exif_orientation_says(tmp_path: Path) -> None:
    # Stored wide, dark on the left; EXIF orientation 6 says a viewer shows it turned 90 degrees
    # clockwise, so upright it is tall with the dark half on top.
    pixels = np.full((20, 40), 230, dtype=np.uint8)
    pixels[:, :20] = 20
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    plain = tmp_path / "plain.jpg"
    Image.fromarray(pixels).save(plain, quality=95)
    upright = decode_image(tmp_path / "phone.jpg", 8, 1)[0].astype(int)
    assert upright[:3].mean() < 60 and upright[-3:].mean() > 190  # dark top, light bottom
    assert abs(upright[:, :3].mean() - upright[:, -3:].mean()) < 10  # left and right alike
    as_stored = decode_image(plain, 8, 1)[0].astype(int)
    assert as_stored[:, :3].mean() < 60 and as_stored[:, -3:].mean() > 190  # without the tag: as stored


def test_classes_choose_the_order_of_a_folders_labels(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "p", {"dog": random_images(10), "cat": random_images(10, seed=1)})
    dataset = sources.load(folder_settings(root, classes=("dog", "cat")), root, seed=0)
    assert dataset.classes == ("dog", "cat")


def test_a_changed_image_changes_the_fingerprint_and_a_recompressed_copy_does_not(tmp_path: Path) -> None:
    plain = make_dataset(tmp_path / "plain", gz=False)
    gz = make_dataset(tmp_path / "gz", gz=True)  # the same images, other bytes on disk
    settings = DataSettings(source="idx", path=str(plain))
    assert sources.load(settings, plain, 0).digest == sources.load(settings, gz, 0).digest
    images = data.read_idx(gz / "train-images-idx3-ubyte.gz").copy()
    images[7, 3, 3] ^= 0xFF
    write_idx(gz / "train-images-idx3-ubyte", images, gz=True)
    assert sources.load(settings, plain, 0).digest != sources.load(settings, gz, 0).digest


def test_idx_classes_name_the_labels_and_a_label_outside_them_is_refused(tmp_path: Path) -> None:
    directory = make_dataset(tmp_path / "idx")
    named = sources.load(DataSettings(source="idx", path=str(directory), classes=tuple("abcdefghij")), directory, 0)
    assert named.classes == tuple("abcdefghij")
    assert sources.load(DataSettings(source="idx", path=str(directory)), directory, 0).classes == tuple("0123456789")
    with pytest.raises(DataError, match=r"label 9 is outside the 3 classes"):
        sources.load(DataSettings(source="idx", path=str(directory), classes=("a", "b", "c")), directory, 0)


def write_csv(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    side = images.shape[-1]
    header = "label," + ",".join(f"pixel{i + 1}" for i in range(side * side))
    rows = [f"{y}," + ",".join(map(str, x.reshape(-1))) for x, y in zip(images, labels)]
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_reads_kaggles_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), np.arange(40) % 4
    write_csv(tmp_path / "train.csv", images, labels)
    settings = DataSettings(source="csv", path=str(tmp_path), train="train.csv")
    dataset = sources.load(settings, tmp_path, 0)
    pool = np.concatenate([dataset.train.images, dataset.test.images])
    assert sorted(map(bytes, pool)) == sorted(map(bytes, images[:, None]))
    assert dataset.classes == ("0", "1", "2", "3") and len(dataset.test) == 4


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda lines: lines.__setitem__(3, lines[3] + ",7"), r"train\.csv:4: 786 values, but the header has 785"),
        (lambda lines: lines.__setitem__(5, lines[5].replace(",", ",x", 1)), r"train\.csv:6: a value that is not"),
        (lambda lines: lines.__setitem__(2, lines[2] + "999"), r"train\.csv:3: pixel values must be 0-255"),
        (lambda lines: lines.__setitem__(0, "label,pixel1,pixel2"), r"train\.csv:1: the header has 3 columns"),
    ],
)
def test_a_bad_csv_line_is_named(tmp_path: Path, mutate, message: str) -> None:
    rng = np.random.default_rng(0)
    write_csv(tmp_path / "train.csv", rng.integers(0, 26, (20, 28, 28), dtype=np.uint8), np.arange(20) % 2)
    lines = (tmp_path / "train.csv").read_text().splitlines()
    mutate(lines)
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        sources.load(DataSettings(source="csv", path=str(tmp_path), train="train.csv"), tmp_path, 0)


def test_bad_folders_are_refused_in_one_line_naming_the_file(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "f", {"a": random_images(12), "b": random_images(12, seed=1)})
    (root / "a" / "0003.png").write_bytes((root / "a" / "0003.png").read_bytes()[:60])  # truncated
    with pytest.raises(DataError, match=r"f/a/0003\.png: not a readable image"):
        sources.load(folder_settings(root), root, 0)

    empty = write_folder(tmp_path / "e", {"a": random_images(12)})
    (empty / "b").mkdir()
    (empty / "b" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"e/b: class folder with no images"):
        sources.load(folder_settings(empty), empty, 0)

    few = write_folder(tmp_path / "few", {"a": random_images(12), "b": random_images(4)})
    with pytest.raises(DataError, match=r"class 'b' has 4 image\(s\), but a class needs at least 10"):
        sources.load(folder_settings(few), few, 0)

    mixed = write_folder(tmp_path / "m", {"a": random_images(12), "b": random_images(12, colour=True)}, "L")
    write_folder(mixed, {"b": random_images(12, colour=True)}, "RGB")
    with pytest.raises(DataError, match=r"mixed grey and colour images .* Set \[data\] channels = 1 or 3"):
        sources.load(folder_settings(mixed), mixed, 0)
    assert sources.load(folder_settings(mixed, channels=3), mixed, 0).channels == 3

    write_folder(tmp_path / "t" / "train", {"a": random_images(12), "b": random_images(12, seed=1)})
    write_folder(tmp_path / "t" / "test", {"a": random_images(2), "z": random_images(2)})
    with pytest.raises(DataError, match=r"class 'z' is not one of the training classes"):
        sources.load(folder_settings(tmp_path / "t"), tmp_path / "t", 0)

    with pytest.raises(DataError, match=r"no class folders"):
        sources.load(folder_settings(tmp_path / "t" / "train" / "a"), tmp_path / "t" / "train" / "a", 0)


def test_a_split_too_small_for_validation_is_refused(tmp_path: Path) -> None:
    write_folder(tmp_path / "v" / "train", {"a": random_images(3), "b": random_images(3, seed=1)})
    write_folder(tmp_path / "v" / "test", {"a": random_images(1), "b": random_images(1)})
    with pytest.raises(DataError, match=r"class 'a' has 3 training image\(s\), too few to hold 0.1 of them out"):
        sources.load(folder_settings(tmp_path / "v"), tmp_path / "v", 0, val_fraction=0.1)


def study_file(extra: str) -> dict:
    import tomllib

    return tomllib.loads(
        'name = "d"\n'
        + extra
        + """
[space]
n_conv = 2
filters = 8
kernel_size = 3
n_fc = 1
fc_size = 16
dropout = 0.0
optimizer = "adam"
lr = 1e-3
batch_size = 32
weight_decay = 0.0
"""
    )


@pytest.mark.parametrize(
    "section, message",
    [
        ('[data]\nsource = "folders"\n', r"source 'folders' is not known\. Did you mean 'folder'\?"),
        ('[data]\nsource = "folder"\n', r"source 'folder' needs path"),
        ('[data]\nsource = "csv"\npath = "x"\n', r'source "csv" needs train'),
        ('[data]\nsource = "idx"\npath = "x"\nimage_size = 32\n', r"image_size does not apply to source 'idx'"),
        ('[data]\nsource = "folder"\npath = "x"\nchannels = 2\n', r"channels must be 1 \(grey\) or 3"),
        ('[data]\nsource = "folder"\npath = "x"\nimage_size = 2\n', r"image_size must be from 4 to 512"),
        ('[data]\nsource = "folder"\npath = "x"\nclasses = ["a", "a"]\n', r"classes must name each class once"),
        ('[data]\nsource = "folder"\npath = "x"\nimage_size = 8\n', None),
    ],
)
def test_data_section_is_checked(section: str, message: str | None) -> None:
    raw = study_file(section)
    if message is None:  # n_conv = 2 on an 8px folder is fine; 4 would shrink it below 1px
        cfg = config.parse(raw)
        assert (cfg.data.source, cfg.data.image_size) == ("folder", 8)
        assert config.from_dict(cfg.to_dict(), "stored") == cfg
        raw["space"]["n_conv"] = 4
        with pytest.raises(ConfigError, match=r"n_conv 4 halves a 8px image 4 times, below 1px"):
            config.parse(raw)
        return
    with pytest.raises(ConfigError, match=message):
        config.parse(raw)


def test_a_study_file_without_a_data_section_trains_on_fashion_mnist() -> None:
    cfg = config.load("cnn-quick")
    assert cfg.data == DataSettings()
    assert config.parse(study_file('[data]\nsource = "folder"\npath = "x"\n')).data.image_size == 32


SPACE = """
[space]
n_conv = 1
filters = 4
kernel_size = 3
n_fc = 1
fc_size = 8
dropout = 0.0
optimizer = "adam"
lr = 1e-3
batch_size = 16
weight_decay = 0.0
"""


def bad_folder(root: Path, case: str) -> str:
    """A data set with one defect, and the [data] lines that point at it."""
    root.mkdir(parents=True)
    if case in ("csv-row", "csv-label"):
        rng = np.random.default_rng(0)
        write_csv(root / "train.csv", rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), np.arange(30) % 3)
        lines = (root / "train.csv").read_text().splitlines()
        if case == "csv-row":
            lines[9] = lines[9].rsplit(",", 1)[0]
        (root / "train.csv").write_text("\n".join(lines) + "\n")
        classes = 'classes = ["a", "b"]\n' if case == "csv-label" else ""
        return f'source = "csv"\npath = "{root}"\ntrain = "train.csv"\n{classes}'
    arrays = {"a": random_images(12), "b": random_images(12, seed=1)}
    write_folder(root, arrays)
    if case == "unreadable":
        (root / "b" / "0005.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif case == "empty":
        (root / "c").mkdir()
    elif case == "few":
        write_folder(root, {"c": random_images(3)})
    elif case == "mixed":
        write_folder(root, {"c": random_images(12, colour=True)}, "RGB")
    return f'source = "folder"\npath = "{root}"\nimage_size = 8\n'


@pytest.mark.parametrize(
    "case, message",
    [
        ("unreadable", r"b/0005\.png: not a readable image"),
        ("empty", r"/c: class folder with no images \(PNG or JPEG\)\. Add images, or remove the folder\."),
        ("few", r"class 'c' has 3 image\(s\), but a class needs at least 10"),
        ("mixed", r"mixed grey and colour images"),
        ("csv-row", r"train\.csv:10: 784 values, but the header has 785\. Fix the line\."),
        ("csv-label", r"train\.csv:4: label 2 is outside the 2 classes of \[data\] classes"),
    ],
)
def test_bad_data_gets_one_line_and_exit_1_and_stores_nothing(run, tmp_path: Path, case: str, message: str) -> None:
    lines = bad_folder(tmp_path / "data", case)
    (tmp_path / "bad.toml").write_text(f'name = "bad"\n[data]\n{lines}{SPACE}')
    result = run("optimize", "--study", "bad.toml", "--workers", "1")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), result.output
    assert not (tmp_path / "runs").exists()  # no storage was opened, so no study exists


def test_the_settings_stored_in_a_study_read_its_data_when_the_file_has_changed(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "p", {"a": random_images(12), "b": random_images(12, seed=1)})
    lines = f'[data]\nsource = "folder"\npath = "{root}"\nimage_size = 8\n'
    stored = config.parse(study_file("seed = 0\n" + lines))
    edited = config.parse(study_file("seed = 1\n" + lines))  # another seed holds another test split out
    from_file = sources.open_for(edited)
    assert sources.for_study(from_file, edited) is from_file
    as_stored = sources.for_study(from_file, stored)
    assert as_stored.digest == sources.open_for(stored).digest != from_file.digest


def test_a_workers_read_never_opens_the_test_files_and_the_finalizer_completes_the_fingerprint(tmp_path: Path) -> None:
    import optuna

    directory = make_dataset(tmp_path / "idx")
    (directory / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not an idx file")  # a worker must not care
    settings = DataSettings(source="idx", path=str(directory))
    worker = sources.load(settings, directory, 0, with_test=False)
    assert worker.test is None and worker.fingerprint()["test_sha256"] is None
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: not an IDX file"):
        sources.load(settings, directory, 0)  # the finalizer reads it, and refuses it

    make_dataset(directory)  # intact test files again
    study = optuna.create_study(study_name="fp")
    sources.check(study, worker)  # the first host: a worker records the pool's fingerprint
    assert sources.recorded(study)["test_sha256"] is None
    assert sources.test_count(study, worker) == 0
    finalizer = sources.load(settings, directory, 0)
    sources.check(study, finalizer)  # the first finalizer adds its test split's
    assert sources.recorded(study)["test_sha256"] == finalizer.test_digest
    assert sources.test_count(study, worker) == 50

    other = make_dataset(tmp_path / "other", seed=1)  # another draw of every file...
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (other / name).write_bytes((directory / name).read_bytes())  # the same pool, another test split
    changed = sources.load(settings, other, 0)
    assert changed.digest == finalizer.digest and changed.test_digest != finalizer.test_digest
    with pytest.raises(DataError, match=r"differs from the data of study 'fp'.*test split sha256"):
        sources.check(study, changed)
    sources.check(study, sources.load(settings, other, 0, with_test=False))  # a worker's read still matches
