"""The seed-style notebook pipeline `hpo bench` measures the engine against: torchvision’s
FashionMNIST with per-sample PIL transforms (RandomHorizontalFlip, RandomCrop(28, padding), ToTensor,
Normalize), a DataLoader, fp32."""

from __future__ import annotations

import gzip
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from hpo.bench.pipelines import BenchSpec, PipelineResult, peak_rss_mib
from hpo.errors import DataError


def _torchvision_root(data_dir: Path) -> Path:
    """torchvision's FashionMNIST wants uncompressed files under ROOT/FashionMNIST/raw."""
    from hpo.learn.data import FILES, find_file

    root = Path(tempfile.mkdtemp(prefix="hpo-bench-"))
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stems in FILES.values():
        for stem in stems:
            source = find_file(data_dir, stem)
            if source is None:
                raise DataError(f"{data_dir} has no {stem}(.gz); bench needs all four Fashion-MNIST files")
            payload = source.read_bytes()
            (raw / stem).write_bytes(gzip.decompress(payload) if payload[:2] == b"\x1f\x8b" else payload)
    return root


def run_seed(spec: BenchSpec) -> PipelineResult:
    import numpy as np
    import torch
    from torch import nn

    from hpo.learn import data
    from hpo.learn.devices import place
    from hpo.learn.model import DynamicCNN
    from hpo.learn.params import TrialParams

    placement = place(spec.device, spec.threads)
    device = placement.device
    full = _notebook_dataset(spec)
    # The same trial split as the engine, so the accuracy check compares like with like.
    train_idx, val_idx = data.stratified_split(full.targets.numpy(), 0.1, spec.seed)
    params = TrialParams.from_flat({**spec.params, "batch_size": spec.batch_size})

    def loader(indices: np.ndarray, shuffle: bool, seed: int = spec.seed) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(
            torch.utils.data.Subset(full, indices.tolist()),
            batch_size=spec.batch_size,
            shuffle=shuffle,
            num_workers=spec.num_workers,
            generator=generator,
            drop_last=True,
        )

    def fresh_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return DynamicCNN(params.model).to(device)

    # A warm-up pass, as the engine has.
    _seed_train(fresh_model(spec.seed), loader(train_idx[:1024], True), params, device, None)
    model = fresh_model(spec.seed)
    started = time.perf_counter()
    trained = _seed_train(model, loader(train_idx[: spec.images], True), params, device, spec.images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    accuracies = []
    for seed in range(spec.seed, spec.seed + spec.repeats if spec.epochs else spec.seed):
        model = fresh_model(seed)
        batches = loader(train_idx, True, seed)
        for _ in range(spec.epochs):
            _seed_train(model, batches, params, device, None)
        accuracies.append(_evaluate_fp32(model, full, val_idx, device))
    return PipelineResult("seed", trained, seconds, trained / seconds, peak_rss_mib(), tuple(accuracies))


def _notebook_dataset(spec: BenchSpec) -> Any:
    """The training set as a notebook reads it: torchvision's FashionMNIST with per-image flip, crop,
    tensor conversion and normalisation."""
    from torchvision import datasets, transforms

    from hpo.learn import data

    root = _torchvision_root(Path(spec.data_dir))
    transform = transforms.Compose(
        [
            transforms.RandomHorizontalFlip(),
            transforms.RandomCrop(28, padding=spec.crop_padding),
            transforms.ToTensor(),
            transforms.Normalize((data.MEAN,), (data.STD,)),
        ]
    )
    try:  # torchvision reads the files into memory here, so the copy goes at once (53 MB a run)
        return datasets.FashionMNIST(str(root), train=True, download=False, transform=transform)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _seed_train(model: Any, batches: Any, params: Any, device: Any, limit: int | None) -> int:
    """The notebook's training loop: plain Adam, fp32, one host-to-device copy per batch."""
    import torch
    from torch import nn

    optimizer = torch.optim.Adam(model.parameters(), lr=params.optimizer.lr, weight_decay=params.optimizer.weight_decay)
    model.train()
    seen = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(y)
        if limit is not None and seen >= limit:
            break
    return seen


def _evaluate_fp32(model, dataset, indices, device) -> float:
    """The notebook's own evaluation: no augmentation, fp32, plain loop."""
    import torch
    from torchvision import transforms

    from hpo.learn import data

    plain = transforms.Compose([transforms.ToTensor(), transforms.Normalize((data.MEAN,), (data.STD,))])
    x = torch.stack([plain(transforms.functional.to_pil_image(dataset.data[i].numpy())) for i in indices])
    y = dataset.targets[indices]
    model.eval()
    with torch.inference_mode():
        preds = torch.cat([model(x[i : i + 1000].to(device)).argmax(1).cpu() for i in range(0, len(x), 1000)])
    return float((preds == y).float().mean())
