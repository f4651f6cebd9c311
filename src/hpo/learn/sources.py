"""Which images a study trains on: the `[data]` section's source read (by `readers`) into a DataSet,
the test split (the source's own test files, or a seeded, stratified share held out once), and the
fingerprint that every host's copy must match.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpo import attrs
from hpo.errors import DataError
from hpo.learn import data
from hpo.learn.readers import READERS, Labelled
from hpo.settings.config import DataSettings, StudyConfig

log = logging.getLogger(__name__)

HOLDOUT_SEED_OFFSET = 7919  # the test hold-out's seed is the study's plus this: another stream than validation's


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
    pool, test, classes, names, own_test = READERS[settings.source](settings, directory, with_test)
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


# --------------------------------------------------------------------------- folders of images


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
