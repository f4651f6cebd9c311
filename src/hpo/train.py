"""The one training loop and the one evaluation, shared by trials and the finalizer."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hpo.config import Augment, Recipe
from hpo.data import DeviceData
from hpo.devices import autocast_dtype
from hpo.model import DynamicCNN, build


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the configuration cannot be trained as given."""


@dataclass(frozen=True)
class Hyper:
    optimizer: str       # adam | sgd | rmsprop
    lr: float            # peak learning rate
    batch_size: int      # images per step
    weight_decay: float  # decoupled for adam (AdamW), L2 for sgd and rmsprop

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Hyper:
        return cls(str(params["optimizer"]), float(params["lr"]), int(params["batch_size"]),
                   float(params["weight_decay"]))


@dataclass(frozen=True)
class EpochStats:
    epoch: int                 # 1-based
    train_loss: float          # mean over the epoch's training images
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    lr: float                  # at the end of the epoch
    seconds: float


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    predictions: torch.Tensor  # (N,) class indices, on the CPU
    confidence: torch.Tensor   # (N,) softmax probability of the predicted class, on the CPU


def get_lr(step: int, total: int, peak: float, schedule: str, warmup: int) -> float:
    """Learning rate at optimizer step `step` of `total` (warmup then the schedule's shape)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    # "onecycle": linear decay to zero after the warmup.
    return peak * max(0.0, 1.0 - progress)


def make_optimizer(model: nn.Module, hyper: Hyper) -> torch.optim.Optimizer:
    # Decay only weight matrices and kernels; decaying BatchNorm scales and biases only hurts.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": hyper.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused kernels update all parameters in one pass: +15 % images/s for the notebook CNN on this
    # CPU at batch 64 (`hpo bench`); RMSprop has none, so it keeps the multi-tensor path.
    if hyper.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=hyper.lr, fused=True)
    if hyper.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=hyper.lr, momentum=0.9, nesterov=True, fused=True)
    if hyper.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=hyper.lr, alpha=0.9, momentum=0.0, foreach=True)
    raise ValueError(f"unknown optimizer {hyper.optimizer!r}")


@torch.inference_mode()
def logits_of(model: nn.Module, x: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """The forward pass evaluation and prediction share: eval mode, bf16 autocast where it is fast
    (`fast=False`: fp32, the precision of an exported model)."""
    model.eval()
    amp = autocast_dtype(x.device) if fast else None
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        return model(x)


@torch.inference_mode()
def evaluate(model: nn.Module, data: DeviceData, batch_size: int = 2048, fast: bool = True) -> Evaluation:
    """Mean cross-entropy and accuracy on `data`, with no augmentation and no label smoothing."""
    loss_sum = torch.zeros((), device=data.device)
    preds, confs = [], []
    for x, y in data.batches(batch_size):
        logits = logits_of(model, x, fast)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        conf, pred = logits.float().softmax(1).max(1)
        preds.append(pred)
        confs.append(conf)
    predictions = torch.cat(preds)
    correct = (predictions == data.y).sum()
    n = max(1, len(data))
    return Evaluation(loss=float(loss_sum) / n, accuracy=float(correct) / n, predictions=predictions.cpu(),
                      confidence=torch.cat(confs).cpu())


OnEpoch = Callable[[EpochStats], None]
OnSnapshot = Callable[[dict[str, Any]], None]


def fit(model: DynamicCNN, train: DeviceData, val: DeviceData | None, hyper: Hyper, recipe: Recipe,
        augment: Augment, epochs: int, seed: int, on_epoch: OnEpoch | None = None, *,
        on_snapshot: OnSnapshot | None = None, resume: dict[str, Any] | None = None) -> list[EpochStats]:
    """Train `model` in place for `epochs`; `on_epoch` may raise to stop early (pruning).

    `on_snapshot` gets the whole training state after every epoch, before `on_epoch`;
    passing that state back as `resume` carries on from the next epoch exactly as if never stopped
    (same batches, augmentations, dropout masks and learning rates).
    """
    device = train.device
    amp = autocast_dtype(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    optimizer = make_optimizer(model, hyper)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    steps_per_epoch = max(1, len(train) // hyper.batch_size)
    total, warmup = steps_per_epoch * epochs, int(recipe.warmup_epochs * steps_per_epoch)
    history: list[EpochStats] = []
    step = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        _set_rng_state(resume["rng"], device)
        step = resume["step"]
        history = [EpochStats(**s) for s in resume["history"]]
    forward = torch.compile(model) if recipe.compile else model
    for epoch in range(len(history) + 1, epochs + 1):
        started = time.perf_counter()
        model.train()
        # Accumulate on the device and read once per epoch: no host sync inside the step loop.
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        for x, y in train.batches(hyper.batch_size, generator, augment, drop_last=True):
            lr = get_lr(step, total, hyper.lr, recipe.schedule, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = forward(x)
                loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            step += 1
        train_loss = float(loss_sum) / max(1, seen)
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"training loss became {train_loss} in epoch {epoch} (lr {hyper.lr:g}, "
                                   f"{hyper.optimizer})")
        ev = evaluate(model, val, recipe.eval_batch_size) if val is not None else None
        stats = EpochStats(epoch, train_loss, float(correct) / max(1, seen), ev.loss if ev else None,
                           ev.accuracy if ev else None, lr, time.perf_counter() - started)
        history.append(stats)
        if on_snapshot is not None:
            on_snapshot({"epoch": epoch, "step": step, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                         "rng": _rng_state(device), "history": [dataclasses.asdict(s) for s in history]})
        if on_epoch is not None:
            on_epoch(stats)
    return history


def seconds_per_image(params: dict[str, Any], data: DeviceData, recipe: Recipe, augment: Augment,
                      steps: int = 12, warmup: int = 2) -> float:
    """Training seconds per image of `params` on this device and thread count, timed over `steps`
    steps after `warmup` untimed ones (first-call allocations, kernel selection, the thread pool)."""
    hyper = Hyper.from_params(params)
    images = min(len(data), hyper.batch_size * steps)
    model = seeded_model(params, 0, data.device)
    warm = DeviceData(data.x[:warmup * hyper.batch_size], data.y[:warmup * hyper.batch_size], data.device)
    fit(model, warm, None, hyper, recipe, augment, 1, 0)
    sample = DeviceData(data.x[:images], data.y[:images], data.device)
    started = time.perf_counter()
    fit(model, sample, None, hyper, recipe, augment, 1, 0)
    return (time.perf_counter() - started) / max(1, len(sample))


def _rng_state(device: torch.device) -> torch.Tensor:
    """The global generator dropout draws from on `device`."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def seeded_model(params: dict[str, Any], seed: int, device: torch.device) -> DynamicCNN:
    """Build the model with weights drawn from `seed`, so a (params, seed) pair is reproducible."""
    torch.manual_seed(seed)
    return build(params).to(device).to(memory_format=torch.channels_last)
