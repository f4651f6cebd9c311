"""The `[data]` sources, each read into uint8 images (N, C, H, W) and int64 labels: `fashion-mnist`
(the default), `idx` (any MNIST-format directory), `csv` (Kaggle’s layout: a label column, then one
column per pixel) and `folder` (one subdirectory of PNG/JPEG images per class, resized once to
`image_size`). Bad data is refused in one line that names the file (and the line), before anything
is stored."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpo.errors import DataError
from hpo.learn import data
from hpo.settings.config import FOLDER_IMAGE_SIZE, DataSettings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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


READERS = {"fashion-mnist": _fashion_mnist, "idx": _idx, "csv": _csv, "folder": _folder}
