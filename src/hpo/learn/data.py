"""Fashion-MNIST: find the IDX files, read them, split them, keep them on the device.

Trials see only the official training set, split into a seeded, stratified train and validation
part. `load_split(..., "test")` is called by the finalizer alone.
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from hpo.errors import DataError
from hpo.learn.model import InputShape
from hpo.settings.config import Augment

if TYPE_CHECKING:
    from hpo.learn.readers import Labelled
    from hpo.learn.sources import DataSet

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530  # of the training images, on a 0..1 scale
_IDX_DTYPE = 0x08  # unsigned byte, the only type Fashion-MNIST uses


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hpo"


def _torchvision_dir() -> Path:
    return cache_dir() / "FashionMNIST" / "raw"


def find_file(directory: Path, stem: str) -> Path | None:
    """`stem` or `stem.gz` in `directory`, whichever exists."""
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _complete(directory: Path) -> bool:
    return all(find_file(directory, stem) for pair in FILES.values() for stem in pair)


HOW_TO_PROVIDE = (
    "Provide the Fashion-MNIST IDX files in one of three ways: "
    "(1) --data-dir DIR or HPO_DATA_DIR=DIR pointing at train-images-idx3-ubyte[.gz] and friends; "
    f"(2) on Debian/Ubuntu, `apt-get install dataset-fashion-mnist` (installs {DEBIAN_DIR}); "
    f"(3) network access and torchvision (`pip install 'hpo-service[bench]'`), which downloads them into "
    f"{_torchvision_dir()}."
)


def find_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The first of: the given directory or HPO_DATA_DIR, Debian's package, the download cache."""
    chosen = explicit or os.environ.get("HPO_DATA_DIR")
    if chosen:
        directory = Path(chosen)
        if not directory.is_dir():
            raise DataError(f"data directory {directory} does not exist. {HOW_TO_PROVIDE}")
        if not os.access(directory, os.R_OK | os.X_OK):
            raise DataError(f"data directory {directory} is not readable by this user. Fix its permissions.")
        if not _complete(directory):
            raise DataError(f"data directory {directory} lacks some Fashion-MNIST files. {HOW_TO_PROVIDE}")
        return directory
    for directory in (DEBIAN_DIR, _torchvision_dir()):
        if _complete(directory):
            return directory
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(cache_dir()), train=True, download=True)
        FashionMNIST(str(cache_dir()), train=False, download=True)
    except Exception as e:  # any network or disk failure means "not available"
        raise DataError(f"no Fashion-MNIST files found and the download failed ({e}). {HOW_TO_PROVIDE}") from e
    return _torchvision_dir()


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a uint8 array of the shape its header gives."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e}). Replace the file with an intact copy.") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_DTYPE or not 1 <= raw[3] <= 3:
        raise DataError(
            f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex() or 'missing'}). "
            "Replace the file with an intact copy."
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header. Replace the file with an intact copy.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"{path}: {len(raw)} bytes but its header {shape} needs {expected}; the file is "
            "truncated or corrupt. Replace the file with an intact copy."
        )
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header).reshape(shape)  # writable for torch


def load_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the official 'train' or 'test' split."""
    image_stem, label_stem = FILES[split]
    image_path, label_path = find_file(directory, image_stem), find_file(directory, label_stem)
    if image_path is None or label_path is None:
        raise DataError(f"{directory} lacks the {split} files. {HOW_TO_PROVIDE}")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{image_path}: expected 28x28 images, got shape {images.shape}.")
    if labels.ndim != 1:
        raise DataError(f"{label_path}: expected a 1-D label file, got shape {labels.shape}.")
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} "
            "labels. The files come from different sets; replace them with a matching pair."
        )
    if len(labels) and labels.max() >= len(CLASSES):
        raise DataError(f"{label_path}: label {labels.max()} is not a Fashion-MNIST class (0-9).")
    return images, labels.astype(np.int64)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, held) with `fraction` of every class held, the same for a seed."""
    rng = np.random.default_rng(seed)
    rest, held = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_held = int(round(len(members) * fraction))
        held.append(members[:n_held])
        rest.append(members[n_held:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(held))


class DeviceData:
    """A labelled image set living on one device as uint8 (N, C, H, W); batches are index slices,
    normalised with the data set's per-channel statistics."""

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        device: torch.device,
        mean: tuple[float, ...] = (MEAN,),
        std: tuple[float, ...] = (STD,),
        num_classes: int = len(CLASSES),
    ):
        x = torch.as_tensor(images, dtype=torch.uint8)
        self.x = (x.unsqueeze(1) if x.dim() == 3 else x).to(device)  # (N, H, W) grey images get their channel
        self.y = torch.as_tensor(labels, dtype=torch.int64).to(device)
        self.device = device
        self.mean, self.std, self.num_classes = tuple(mean), tuple(std), num_classes
        self._mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        self._std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def shape(self) -> InputShape:
        """What a model for these images takes and gives: channels, side and classes."""
        return InputShape(int(self.x.shape[1]), int(self.x.shape[2]), self.num_classes)

    def head(self, n: int) -> DeviceData:
        """The first `n` images, with the same statistics."""
        return self.take(slice(0, n))

    def take(self, index: slice | torch.Tensor) -> DeviceData:
        return DeviceData(self.x[index], self.y[index], self.device, self.mean, self.std, self.num_classes)

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        augment: Augment | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised float batches; shuffled and augmented when a generator is given."""
        n = len(self)
        order = torch.randperm(n, device=self.device, generator=generator) if generator is not None else None
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            if order is None:
                x, y = self.x[start : start + batch_size], self.y[start : start + batch_size]
            else:
                idx = order[start : start + batch_size]
                x, y = self.x[idx], self.y[idx]
            if augment is not None and generator is not None:
                x = augment_batch(x, augment, generator)
            yield self.normalize(x), y

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self._mean, self._std)


def normalize(x: torch.Tensor, mean: torch.Tensor | float = MEAN, std: torch.Tensor | float = STD) -> torch.Tensor:
    """A uint8 (N, C, H, W) batch as floats, less `mean` and over `std` (scalars, or (1, C, 1, 1)
    tensors of per-channel figures; Fashion-MNIST's by default)."""
    # channels_last matches the model's layout (2x faster convs on CPU, measured in `hpo bench`).
    return ((x.float() / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)


def augment_batch(x: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding, random horizontal flip and random erasing, for a whole uint8
    batch at once."""
    b, _, h, w = x.shape
    if augment.crop_padding:
        p = augment.crop_padding
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (b, 1, 1), device=x.device, generator=generator)
        ox = torch.randint(0, 2 * p + 1, (b, 1, 1), device=x.device, generator=generator)
        rows = torch.arange(h, device=x.device).view(1, h, 1) + oy
        cols = torch.arange(w, device=x.device).view(1, 1, w) + ox
        batch = torch.arange(b, device=x.device).view(b, 1, 1)
        x = padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, C) from the split indexing
    if augment.hflip:
        flip = torch.rand(b, device=x.device, generator=generator) < 0.5
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    if augment.erase:
        x = random_erase(x, augment.erase, generator)
    return x


def random_erase(
    x: torch.Tensor,
    p: float,
    generator: torch.Generator,
    area: tuple[float, float] = (0.02, 0.4),
    aspect: tuple[float, float] = (0.3, 3.3),
) -> torch.Tensor:
    """Zhong et al. 2017: with probability `p`, fill one rectangle of each image with random pixels.

    `area` is the rectangle's share of the image and `aspect` its height/width, the paper's ranges.
    """
    b, _, h, w = x.shape
    dev = x.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, device=dev, generator=generator)

    share, log_ratio = uniform(*area), uniform(math.log(aspect[0]), math.log(aspect[1]))
    eh = (share * h * w * log_ratio.exp()).sqrt().round().clamp(1, h)
    ew = (share * h * w / log_ratio.exp()).sqrt().round().clamp(1, w)
    top = (uniform(0.0, 1.0) * (h - eh + 1)).floor()
    left = (uniform(0.0, 1.0) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    inside = (
        (rows >= top.view(b, 1, 1))
        & (rows < (top + eh).view(b, 1, 1))
        & (cols >= left.view(b, 1, 1))
        & (cols < (left + ew).view(b, 1, 1))
    )
    chosen = torch.rand(b, device=dev, generator=generator) < p
    mask = (inside & chosen.view(b, 1, 1)).unsqueeze(1)
    noise = torch.randint(0, 256, x.shape, device=dev, generator=generator, dtype=torch.uint8)
    return torch.where(mask, noise, x)


@dataclass
class TrialData:
    """What one worker loads once: the train and validation parts of the data set's pool, and the
    sizes of the finalizer's work (its whole pool and test split), for the time budget."""

    train: DeviceData
    val: DeviceData
    pool_images: int = 60_000
    test_images: int = 10_000


def trial_data(
    dataset: DataSet,
    val_fraction: float,
    seed: int,
    device: torch.device,
    train_subset: int = 0,
    test_images: int | None = None,
) -> TrialData:
    """Split the data set's pool (never its test split) and move both parts to the device."""
    images, labels = dataset.train.images, dataset.train.labels
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    if train_subset and train_subset < len(train_idx):
        _, keep = stratified_split(labels[train_idx], train_subset / len(train_idx), seed + 1)
        train_idx = train_idx[keep]
    stats = (dataset.mean, dataset.std, len(dataset.classes))
    return TrialData(
        DeviceData(images[train_idx], labels[train_idx], device, *stats),
        DeviceData(images[val_idx], labels[val_idx], device, *stats),
        len(dataset.train),
        test_images if test_images is not None else len(dataset.test) if dataset.test is not None else 0,
    )


def device_data(part: Labelled, dataset: DataSet, device: torch.device) -> DeviceData:
    """One split of `dataset` (its pool or its test split) on the device."""
    return DeviceData(part.images, part.labels, device, dataset.mean, dataset.std, len(dataset.classes))
