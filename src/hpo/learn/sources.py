"""Which images a study trains on: the `[data]` section's source read into arrays, the test split
(the source's own test files, or a seeded, stratified share held out once), and the fingerprint
that every host's copy must match.

Sources: `fashion-mnist` (the default), `idx` (any MNIST-format directory), `csv` (Kaggle's layout:
a label column, then one column per pixel) and `folder` (one subdirectory of PNG/JPEG images per
class, resized once to `image_size`). Every reader returns uint8 images (N, C, H, W) and int64
labels, and refuses bad data in one line that names the file (and the line), before anything is
stored.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpo import attrs
from hpo.errors import DataError
from hpo.learn import data
from hpo.settings.config import FOLDER_IMAGE_SIZE, DataSettings, StudyConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HOLDOUT_SEED_OFFSET = 7919  # the test hold-out's seed is the study's plus this: another stream than validation's
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


@dataclass(frozen=True)
class Labelled:
    """Images (N, C, H, W) uint8 and their labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(repr(self.images.shape).encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class DataSet:
    """A study's data, decoded once per process: the labelled pool trials split into training and
    validation, the test split only the finalizer scores, and what the model and its outputs need."""

    source: str
    origin: str  # where it was read from, for log lines
    train: Labelled  # the pool: trials split it into training and validation (hpo.learn.data.trial_data)
    test: Labelled | None  # None: a worker's read, which leaves a source's own test files unopened
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, of the pool's pixels on a 0..1 scale
    std: tuple[float, ...]
    held_out: dict[str, Any] | None = None  # how the test split was held out, when the source has none
    light_on_dark: bool = False  # MNIST-style images: hpo predict inverts a dark-on-light photo to match
    digest: str = field(default="", compare=False)  # of the class names and the pool
    test_digest: str | None = field(default=None, compare=False)  # of the test split, where it was read
    read_as: tuple[Any, ...] = ()  # (settings, seed, val_fraction) it was read with: see for_study

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[2])

    def info(self) -> dict[str, Any]:
        """What a model trained on this data needs to take new images (stored in the checkpoint)."""
        return {
            "source": self.source,
            "classes": list(self.classes),
            "channels": self.channels,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "light_on_dark": self.light_on_dark,
        }

    def fingerprint(self) -> dict[str, Any]:
        """What makes two copies the same data set: the class names, the images per split and a hash of
        the decoded images and labels (so a re-compressed copy of the same images still matches)."""
        return {
            "source": self.source,
            "classes": list(self.classes),
            "shape": [self.channels, self.image_size, self.image_size],
            "images": {"train": len(self.train), "test": None if self.test is None else len(self.test)},
            "sha256": self.digest,
            "test_sha256": self.test_digest,
            "held_out": self.held_out,
        }


def describe(fingerprint: dict[str, Any]) -> str:
    """A fingerprint in a few words: `sha256 1a2b3c4d5e6f (60,000 train images, 10 classes, 1x28x28; test
    split sha256 0f1e2d3c4b5a, 10,000 images)`."""
    counts, test = fingerprint["images"], fingerprint.get("test_sha256")
    tested = f"test split sha256 {test[:12]}, {counts['test']:,} images" if test else "test split not read here"
    return (
        f"sha256 {fingerprint['sha256'][:12]} ({counts['train']:,} train images, {len(fingerprint['classes'])} "
        f"classes, {'x'.join(str(n) for n in fingerprint['shape'])}; {tested})"
    )


def data_dir(settings: DataSettings, explicit: str | os.PathLike | None = None) -> Path:
    """The directory this host reads: --data-dir or HPO_DATA_DIR, else the study's `path` (for
    Fashion-MNIST: Debian's package or the download cache, as hpo.learn.data.find_data_dir finds them)."""
    if settings.source == "fashion-mnist":
        return data.find_data_dir(explicit or settings.path or None)
    chosen = Path(explicit or os.environ.get("HPO_DATA_DIR") or settings.path)
    if not chosen.is_dir():
        raise DataError(
            f"data directory {chosen} does not exist. Set [data] path in the study file, or pass --data-dir DIR "
            "(or HPO_DATA_DIR) on this host."
        )
    return chosen


def open_for(cfg: StudyConfig, explicit: str | os.PathLike | None = None, with_test: bool = True) -> DataSet:
    """The study's data as this host has it (`explicit`: --data-dir), read and checked."""
    return load(cfg.data, data_dir(cfg.data, explicit), cfg.seed, cfg.budget.val_fraction, with_test)


def for_study(dataset: DataSet, cfg: StudyConfig, explicit: str | os.PathLike | None = None) -> DataSet:
    """`dataset`, read with a study file's settings before the study was opened, as the settings
    stored in the study read it: the same object unless the study's [data], seed or validation
    share differ from the file's (the stored ones win, as everywhere)."""
    if dataset.read_as == (cfg.data, cfg.seed, cfg.budget.val_fraction):
        return dataset
    return open_for(cfg, explicit, with_test=dataset.test is not None)


def load(
    settings: DataSettings, directory: Path, seed: int, val_fraction: float = 0.1, with_test: bool = True
) -> DataSet:
    """Read the study's data from `directory` (see data_dir), checked, with its test split.
    `with_test=False` (a worker): a source's own test files are not opened; a held-out test split is
    still set apart, since the pool it comes from must be read."""
    started = time.perf_counter()
    reader = {"fashion-mnist": _fashion_mnist, "idx": _idx, "csv": _csv, "folder": _folder}[settings.source]
    pool, test, classes, names, own_test = reader(settings, directory, with_test)
    held_out = None
    if not own_test:
        pool, test, held_out = hold_out(pool, classes, settings.test_fraction, seed + HOLDOUT_SEED_OFFSET, names)
    _check_counts(pool, test, classes, val_fraction)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    if settings.source == "fashion-mnist":
        mean, std = (data.MEAN,), (data.STD,)  # the published statistics the shipped studies were measured with
    else:
        mean, std = channel_stats(pool.images)
    h = hashlib.sha256(("\n".join(classes) + "\n").encode())
    h.update(pool.digest().encode())
    dataset = DataSet(
        settings.source,
        str(directory),
        pool,
        test,
        classes,
        mean,
        std,
        held_out,
        light_on_dark=settings.source != "folder",
        digest=h.hexdigest(),
        test_digest=None if test is None else test.digest(),
        read_as=(settings, seed, val_fraction),
    )
    log.info(
        "data: %s from %s, %s, read in %.1fs",
        settings.source,
        directory,
        describe(dataset.fingerprint()),
        time.perf_counter() - started,
    )
    return dataset


def _check_counts(pool: Labelled, test: Labelled | None, classes: tuple[str, ...], val_fraction: float) -> None:
    counts = np.bincount(pool.labels, minlength=len(classes))
    for i, n in enumerate(counts[: len(classes)]):
        held = int(round(n * val_fraction))
        if n and (held < 1 or held >= n):
            raise DataError(
                f"class {classes[i]!r} has {n} training image(s), too few to hold {val_fraction:g} of them out for "
                f"validation and train on the rest: give it at least {int(np.ceil(0.5 / val_fraction))}."
            )
    for name, part in (("training", pool), ("test", test)):
        if part is None:
            continue
        counts = np.bincount(part.labels, minlength=len(classes))
        if len(counts) > len(classes):
            raise DataError(f"the {name} split has label {len(counts) - 1}, outside the {len(classes)} classes.")
        empty = [classes[i] for i, n in enumerate(counts) if n == 0]
        if empty:
            raise DataError(
                f"the {name} split has no image of class {empty[0]!r}: every class needs images in every split. "
                "Add images of it, or drop the class."
            )


MIN_PER_CLASS = 10  # a class needs this many images before its test share is held out: 1 test, 1 validation, 8 train


def hold_out(
    pool: Labelled, classes: tuple[str, ...], fraction: float, seed: int, names: Sequence[str] | None = None
) -> tuple[Labelled, Labelled, dict[str, Any]]:
    """Hold `fraction` of every class out as the test split, once and the same for a seed, and say how."""
    counts = np.bincount(pool.labels, minlength=len(classes))
    few = [(classes[i], int(n)) for i, n in enumerate(counts) if n < MIN_PER_CLASS]
    if few:
        raise DataError(
            f"class {few[0][0]!r} has {few[0][1]} image(s), but a class needs at least {MIN_PER_CLASS} to give "
            "the test, validation and training splits each some. Add images, or give the source its own test files."
        )
    rest, held = data.stratified_split(pool.labels, fraction, seed)
    chosen = np.asarray(names)[held] if names is not None else held.astype(str)
    record = {
        "seed": seed,
        "fraction": fraction,
        "per_class": {name: int(n) for name, n in zip(classes, np.bincount(pool.labels[held], minlength=len(classes)))},
        "sha256": hashlib.sha256("\n".join(str(c) for c in chosen).encode()).hexdigest(),
    }
    return (Labelled(pool.images[rest], pool.labels[rest]), Labelled(pool.images[held], pool.labels[held]), record)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and standard deviation of each channel, on a 0..1 scale (a flat channel gets 1)."""
    mean, std = [], []
    for c in range(images.shape[1]):
        pixels = images[:, c].astype(np.float64) / 255.0
        mean.append(round(float(pixels.mean()), 4))
        std.append(round(float(pixels.std()) or 1.0, 4))
    return tuple(mean), tuple(std)


# --------------------------------------------------------------------------- readers

# What a reader returns: the labelled pool, the source's own test split (None: not read, or none), the
# class names, a name per pool image for a hold-out's record (None: their indices), and whether the
# source has test files of its own (else a test split is held out of the pool).
Read = tuple[Labelled, Labelled | None, tuple[str, ...], list[str] | None, bool]


def _classes_for(settings: DataSettings, labels: np.ndarray, where: str) -> tuple[str, ...]:
    """Class names for integer labels: the file's `classes`, else the labels 0..max as digits."""
    if len(labels) and labels.min() < 0:
        raise DataError(f"{where}: label {labels.min()} is negative; labels are 0, 1, ... per class.")
    if settings.classes:
        if len(labels) and labels.max() >= len(settings.classes):
            raise DataError(
                f"{where}: label {labels.max()} is outside the {len(settings.classes)} classes of [data] classes. "
                "Fix the label, or name every class in classes."
            )
        return settings.classes
    return tuple(str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0))


def _fashion_mnist(settings: DataSettings, directory: Path, with_test: bool) -> Read:
    images, labels = data.load_split(directory, "train")
    test = None
    if with_test:
        test_images, test_labels = data.load_split(directory, "test")
        test = Labelled(test_images[:, None], test_labels)
    return Labelled(images[:, None], labels), test, data.CLASSES, None, True


def _idx_split(directory: Path, split: str, required: bool) -> Labelled | None:
    image_stem, label_stem = data.FILES[split]
    image_path, label_path = data.find_file(directory, image_stem), data.find_file(directory, label_stem)
    if image_path is None or label_path is None:
        if required or image_path is not None or label_path is not None:
            missing = label_stem if image_path is not None else image_stem
            raise DataError(
                f"{directory} lacks {missing}[.gz]: an idx data set needs {image_stem} and {label_stem} "
                "(gzipped or not), and may add the t10k-* pair for its test split."
            )
        return None
    images, labels = data.read_idx(image_path), data.read_idx(label_path)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise DataError(f"{image_path}: expected square grey images (N, H, W), got shape {images.shape}.")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{label_path} holds {labels.shape} labels for {len(images)} images in {image_path}. "
            "Replace them with a matching pair."
        )
    return Labelled(images[:, None], labels.astype(np.int64))


def _idx(settings: DataSettings, directory: Path, with_test: bool) -> Read:
    pool = _idx_split(directory, "train", required=True)
    assert pool is not None
    own_test = any(data.find_file(directory, stem) for stem in data.FILES["test"])
    test = _idx_split(directory, "test", required=False) if with_test else None
    if test is not None and test.images.shape[1:] != pool.images.shape[1:]:
        raise DataError(
            f"{directory}: test images are {test.images.shape[2]}px, training ones {pool.images.shape[2]}px."
        )
    both = np.concatenate([pool.labels, test.labels]) if test is not None else pool.labels
    classes = _classes_for(settings, both, str(directory))
    return pool, test, classes, None, own_test


def read_csv(path: Path, settings: DataSettings) -> Labelled:
    """Kaggle's layout: a header (label, pixel1, ...), then one image a row: its label, then its
    pixels 0-255 row by row. A row of the wrong length, or with a value that is no pixel, is refused
    by its line number."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}). Check the path and its permissions.") from e
    lines = raw.splitlines()
    if not lines:
        raise DataError(f"{path}: the file is empty. Give a CSV with a header line: label,pixel1,pixel2,...")
    width = lines[0].count(b",") + 1
    side = int(round((width - 1) ** 0.5))
    if width < 2 or side * side != width - 1:
        raise DataError(
            f"{path}:1: the header has {width} columns; a label and a square image's pixels are 1 + N*N "
            "(785 for 28x28). Fix the header."
        )
    body = [(number, line) for number, line in enumerate(lines[1:], start=2) if line.strip()]
    if not body:
        raise DataError(f"{path}: no image rows after the header.")
    for number, line in body:
        if line.count(b",") + 1 != width:
            raise DataError(
                f"{path}:{number}: {line.count(b',') + 1} values, but the header has {width}. Fix the line."
            )
    try:  # one C-level parse of the whole body; a bad value is looked for line by line below
        values = np.loadtxt([line.decode() for _, line in body], delimiter=",", dtype=np.int64, ndmin=2)
    except (ValueError, UnicodeDecodeError):
        for number, line in body:
            try:
                [int(v) for v in line.split(b",")]
            except ValueError:
                raise DataError(f"{path}:{number}: a value that is not a whole number. Fix the line.") from None
        raise DataError(f"{path}: not a CSV of whole numbers. Give Kaggle's layout: label,pixel1,...") from None
    bad = np.flatnonzero((values[:, 1:] < 0).any(1) | (values[:, 1:] > 255).any(1))
    if len(bad):
        raise DataError(f"{path}:{body[bad[0]][0]}: pixel values must be 0-255. Fix the line.")
    labels = values[:, 0].copy()
    negative = np.flatnonzero(labels < 0)
    if len(negative):
        raise DataError(f"{path}:{body[negative[0]][0]}: label {labels[negative[0]]} is negative. Fix the line.")
    if settings.classes and (outside := np.flatnonzero(labels >= len(settings.classes))).size:
        raise DataError(
            f"{path}:{body[outside[0]][0]}: label {labels[outside[0]]} is outside the {len(settings.classes)} "
            "classes of [data] classes. Fix the label, or name every class in classes."
        )
    return Labelled(values[:, 1:].astype(np.uint8).reshape(-1, 1, side, side), labels)


def _csv(settings: DataSettings, directory: Path, with_test: bool) -> Read:
    pool = read_csv(directory / settings.train, settings)
    test = read_csv(directory / settings.test, settings) if settings.test and with_test else None
    if test is not None and test.images.shape[1:] != pool.images.shape[1:]:
        raise DataError(
            f"{settings.test}: {test.images.shape[2]}px images, but {settings.train} has {pool.images.shape[2]}px."
        )
    both = np.concatenate([pool.labels, test.labels]) if test is not None else pool.labels
    names = [f"{settings.train}:{line}" for line in range(2, len(pool) + 2)]  # approximate if blank lines
    return pool, test, _classes_for(settings, both, str(directory / settings.train)), names, bool(settings.test)


# --------------------------------------------------------------------------- folders of images


def image_channels(mode: str) -> int:
    return 1 if mode in GREY_MODES else 3


def decode_image(source: Any, size: int, channels: int, name: str = "") -> np.ndarray:
    """One image file (a path or an open file) as uint8 (channels, size, size): turned upright as its
    EXIF orientation says (a phone's photo reads as a viewer shows it), alpha dropped, grey or colour
    as asked, resized (squashed, as torchvision's Resize((s, s)) and Keras do) with Lanczos."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(source) as img:
            img.draft("L" if channels == 1 else "RGB", (size, size))  # JPEG: decode near the target size
            upright = ImageOps.exif_transpose(img)
            converted = upright.convert("L" if channels == 1 else "RGB")
            resized = converted.resize((size, size), Image.Resampling.LANCZOS)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{name or source}: not a readable image ({e}). Replace or remove the file.") from None
    array = np.asarray(resized, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _peek_channels(path: Path) -> int:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return image_channels(img.mode)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({e}). Replace or remove the file.") from None


def _class_files(root: Path, settings: DataSettings, known: tuple[str, ...] | None) -> dict[str, list[Path]]:
    """Each class folder's image files, sorted; `known`: the training split's classes, which a test
    folder may not go beyond."""
    try:
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise DataError(f"{root}: cannot list ({e.strerror}). Check the path and its permissions.") from e
    if not folders:
        raise DataError(
            f"{root}: no class folders. A folder data set holds one subdirectory of PNG/JPEG images per class "
            "(or train/ and test/ directories that do)."
        )
    if known is not None:
        extra = [f for f in folders if f not in known]
        if extra:
            raise DataError(f"{root / extra[0]}: class {extra[0]!r} is not one of the training classes. Remove it.")
        classes = [c for c in known if c in folders]
    elif settings.classes:
        missing = [c for c in settings.classes if c not in folders]
        if missing:
            raise DataError(f"{root}: no folder for class {missing[0]!r} of [data] classes. Add it, or fix classes.")
        extra = [f for f in folders if f not in settings.classes]
        if extra:
            raise DataError(f"{root / extra[0]}: class {extra[0]!r} is not in [data] classes. Add it, or remove it.")
        classes = list(settings.classes)
    else:
        classes = folders
    files = {}
    for name in classes:
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise DataError(
                f"{root / name}: class folder with no images (PNG or JPEG). Add images, or remove the folder."
            )
        files[name] = found
    return files


def _decode_all(files: list[Path], size: int, channels: int, what: str) -> np.ndarray:
    """Decode `files` on every core (Pillow releases the GIL), with a progress bar on a terminal."""
    from tqdm import tqdm

    out = np.empty((len(files), channels, size, size), dtype=np.uint8)
    workers = max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        decoded = pool.map(lambda p: decode_image(p, size, channels), files, chunksize=64)
        bar = tqdm(decoded, total=len(files), desc=f"decoding {what}", unit="img", file=sys.stderr, disable=None)
        for i, array in enumerate(bar):
            out[i] = array
    return out


def _folder_split(
    root: Path, settings: DataSettings, channels: int | None, known: tuple[str, ...] | None
) -> tuple[Labelled, tuple[str, ...], list[str], int]:
    files = _class_files(root, settings, known)
    classes = tuple(files) if known is None else known
    ordered = [p for name in files for p in files[name]]
    labels = np.asarray([classes.index(name) for name in files for _ in files[name]], dtype=np.int64)
    if channels is None:  # as the images are: all alike, or the user says which
        seen: dict[int, Path] = {}
        for path in ordered:
            seen.setdefault(_peek_channels(path), path)
            if len(seen) > 1:
                raise DataError(
                    f"{root}: mixed grey and colour images ({seen.get(1)} is grey, {seen.get(3)} colour). "
                    "Set [data] channels = 1 or 3 to convert them all."
                )
        channels = next(iter(seen))
    size = settings.image_size or FOLDER_IMAGE_SIZE  # config.parse sets it; a hand-made DataSettings may not
    images = _decode_all(ordered, size, channels, root.name or str(root))
    names = [str(p.relative_to(root)) for p in ordered]
    return Labelled(images, labels), classes, names, channels


def _folder(settings: DataSettings, directory: Path, with_test: bool) -> Read:
    train_root = directory / "train" if (directory / "train").is_dir() else directory
    pool, classes, names, channels = _folder_split(train_root, settings, settings.channels, None)
    own_test = train_root != directory and (directory / "test").is_dir()
    test = None
    if own_test and with_test:
        test, _, _, _ = _folder_split(directory / "test", settings, channels, classes)
    return pool, test, classes, names, own_test


# --------------------------------------------------------------------------- one data set per study


def recorded(study: Any) -> dict[str, Any] | None:
    """The fingerprint of the data `study` runs on (None: no host has recorded one yet)."""
    return study.user_attrs.get(attrs.DATA)


def check(study: Any, dataset: DataSet) -> None:
    """Record `dataset`'s fingerprint in a study that has none, and refuse data that differs from
    the recorded one: an honest study is never trained or scored on two data sets. Read back after
    writing, so two hosts that record at once with different data cannot both go on."""
    mine = dataset.fingerprint()
    theirs = recorded(study)
    if theirs is None:
        study.set_user_attr(attrs.DATA, mine)
    elif theirs["sha256"] == mine["sha256"] and theirs.get("test_sha256") is None and mine["test_sha256"]:
        # A worker recorded the pool (it never opens test files); the first finalizer adds the test split.
        images = {**theirs["images"], "test": mine["images"]["test"]}
        study.set_user_attr(attrs.DATA, {**theirs, "images": images, "test_sha256": mine["test_sha256"]})
    theirs = recorded(study)
    tests = (theirs or {}).get("test_sha256"), mine["test_sha256"]
    if theirs is not None and (theirs["sha256"] != mine["sha256"] or None not in tests and tests[0] != tests[1]):
        raise DataError(
            f"this host's data differs from the data of study {study.study_name!r}: the study was created on "
            f"{describe(theirs)}, this host read {describe(mine)} from {dataset.origin}. Point --data-dir "
            "(or HPO_DATA_DIR) at a copy of the study's data set."
        )


def test_images(info: dict[str, Any], explicit: str | os.PathLike | None = None) -> np.ndarray:
    """The test split of the data a final model was trained on (its checkpoint's `data`), as uint8
    (N, C, S, S): what `hpo export` checks an exported file on."""
    raw = info.get("settings") or {"source": "fashion-mnist"}
    settings = DataSettings(**{**raw, "classes": tuple(raw.get("classes", ()))})
    test = load(settings, data_dir(settings, explicit), int(info.get("seed", 0))).test
    assert test is not None  # read with its test split
    return test.images


def test_count(study: Any, dataset: DataSet) -> int:
    """Images in the study's test split, for the finalizer's time estimates: as read here, or as
    recorded by a host that read them (0 while none has)."""
    if dataset.test is not None:
        return len(dataset.test)
    return int(((recorded(study) or {}).get("images") or {}).get("test") or 0)


def fashion_mnist(directory: Path, seed: int = 0) -> DataSet:
    """Fashion-MNIST from `directory` (hpo.learn.data.find_data_dir): the benchmarks' data set."""
    return load(DataSettings(), directory, seed)
