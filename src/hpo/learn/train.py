"""The one training loop and the one evaluation, shared by trials and the finalizer."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hpo.learn.data import DeviceData
from hpo.learn.devices import autocast_dtype
from hpo.learn.model import DynamicCNN, ModelSpec
from hpo.learn.params import OptimizerSettings, TrialParams
from hpo.learn.seeds import derive_seed
from hpo.settings.config import Augment, StudyConfig, TrainSettings

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the configuration cannot be trained as given."""


@dataclass(frozen=True)
class TrainingRun:
    """What one call of `fit` trains with, besides the model and the data."""

    optimizer: OptimizerSettings
    settings: TrainSettings  # the study's [train] section
    augment: Augment
    epochs: int
    seed: int  # batches, augmentations and dropout masks


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    train_loss: float  # mean over the epoch's training images
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    lr: float  # at the end of the epoch
    seconds: float


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    predictions: torch.Tensor  # (N,) class indices, on the CPU
    confidence: torch.Tensor  # (N,) softmax probability of the predicted class, on the CPU


def recipe(cfg: StudyConfig, params: TrialParams, seed: int, epochs: int | None = None) -> TrainingRun:
    """How a configuration is trained, by a trial and by the finalizer alike: the study's [train]
    schedule and settings, its [augment], and the trials' horizon (the finalizer's [final] epochs,
    the same by default). Only the data differ: the trial training split, or all training images."""
    return TrainingRun(params.optimizer, cfg.train, cfg.augment, cfg.budget.epochs if epochs is None else epochs, seed)


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


def make_optimizer(model: nn.Module, settings: OptimizerSettings) -> torch.optim.Optimizer:
    # Decay only weight matrices and kernels; decaying BatchNorm scales and biases only hurts.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused kernels update all parameters in one pass: +15 % images/s for the notebook CNN on this
    # CPU at batch 64 (`hpo bench`); RMSprop has none, so it keeps the multi-tensor path.
    if settings.name == "adam":
        return torch.optim.AdamW(groups, lr=settings.lr, fused=True)
    if settings.name == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=0.9, nesterov=True, fused=True)
    if settings.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=settings.lr, alpha=0.9, momentum=0.0, foreach=True)
    raise ValueError(f"unknown optimizer {settings.name!r}")


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
    return Evaluation(
        loss=float(loss_sum) / n,
        accuracy=float(correct) / n,
        predictions=predictions.cpu(),
        confidence=torch.cat(confs).cpu(),
    )


@torch.inference_mode()
def probabilities(model: nn.Module, data: DeviceData, batch_size: int = 2048) -> torch.Tensor:
    """(N, classes) softmax outputs on `data`, float32 on the CPU: what an ensemble averages."""
    return torch.cat([logits_of(model, x).float().softmax(1).cpu() for x, _ in data.batches(batch_size)])


OnEpoch = Callable[[EpochStats], None]
OnSnapshot = Callable[[dict[str, Any]], None]
Replan = Callable[[list[EpochStats], int], int]


@dataclass
class _EpochSums:
    """One epoch's training figures, accumulated on the device: no host sync inside the step loop."""

    loss: torch.Tensor
    correct: torch.Tensor
    seen: int = 0


@dataclass(frozen=True)
class Hooks:
    """What a caller hears from a training run, and may change in it: `on_epoch` gets each epoch's
    figures and may raise to stop early (pruning); `on_snapshot` gets the whole training state after
    every epoch, before `on_epoch` (checkpoints); `replan(history, epochs)` after each epoch may
    change the number of epochs (never below those done)."""

    on_epoch: OnEpoch | None = None
    on_snapshot: OnSnapshot | None = None
    replan: Replan | None = None


def fit(
    model: DynamicCNN,
    train: DeviceData,
    val: DeviceData | None,
    run: TrainingRun,
    hooks: Hooks = Hooks(),
    resume: dict[str, Any] | None = None,
) -> list[EpochStats]:
    """Train `model` in place for `run.epochs`, telling `hooks` after each epoch.

    A re-planned run's learning-rate schedule stretches or shrinks to its new length from the next
    step. Passing a snapshot back as `resume` carries on from the next epoch exactly as if never
    stopped (same batches, augmentations, dropout masks and learning rates).
    """
    device, settings = train.device, run.settings
    generator = torch.Generator(device=device)
    generator.manual_seed(run.seed)
    optimizer = make_optimizer(model, run.optimizer)
    step, history = _resume(resume, model, optimizer, generator, run.seed) if resume is not None else (0, [])
    forward = torch.compile(model) if settings.compile else model
    while len(history) < run.epochs:
        epoch, started = len(history) + 1, time.perf_counter()
        model.train()
        sums, step, lr = _train_epoch(forward, optimizer, train, run, generator, step)
        train_loss = float(sums.loss) / max(1, sums.seen)
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"training loss became {train_loss} in epoch {epoch} (lr {run.optimizer.lr:g}, {run.optimizer.name})"
            )
        ev = evaluate(model, val, settings.eval_batch_size) if val is not None else None
        val_loss, val_accuracy = (ev.loss, ev.accuracy) if ev else (None, None)
        accuracy, seconds = float(sums.correct) / max(1, sums.seen), time.perf_counter() - started
        stats = EpochStats(epoch, train_loss, accuracy, val_loss, val_accuracy, lr, seconds)
        history.append(stats)
        if hooks.on_snapshot is not None:
            hooks.on_snapshot(_snapshot(epoch, step, model, optimizer, generator, history))
        if hooks.on_epoch is not None:
            hooks.on_epoch(stats)
        if hooks.replan is not None:
            run = dataclasses.replace(run, epochs=max(epoch, hooks.replan(history, run.epochs)))
    return history


def _resume(
    state: dict[str, Any], model: DynamicCNN, optimizer: Any, generator: torch.Generator, seed: int
) -> tuple[int, list[EpochStats]]:
    """Restore a snapshot: weights and optimizer state move to this device (load_state_dict copies
    them there), and every random stream; returns the step and the history it had reached."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    restore_random_state(state, generator, seed, generator.device)
    return state["step"], [EpochStats(**s) for s in state["history"]]


def _snapshot(
    epoch: int,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    history: list[EpochStats],
) -> dict[str, Any]:
    """The whole training state after `epoch`: what `fit(resume=...)` carries on from."""
    return {
        "epoch": epoch,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "rng": _rng_state(generator.device),
        "device": generator.device.type,  # random states of one device type mean nothing on another
        "history": [dataclasses.asdict(s) for s in history],
    }


def _train_epoch(
    forward: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    train: DeviceData,
    run: TrainingRun,
    generator: torch.Generator,
    step: int,
) -> tuple[_EpochSums, int, float]:
    """One pass over `train`; returns the epoch's sums, the step after it and the last learning rate."""
    settings, batch_size = run.settings, run.optimizer.batch_size
    steps_per_epoch = max(1, len(train) // batch_size)
    total, warmup = steps_per_epoch * run.epochs, int(settings.warmup_epochs * steps_per_epoch)
    amp = autocast_dtype(train.device)
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    sums = _EpochSums(torch.zeros((), device=train.device), torch.zeros((), device=train.device, dtype=torch.int64))
    lr = get_lr(step, total, run.optimizer.lr, settings.schedule, warmup)
    for x, y in train.batches(batch_size, generator, run.augment, drop_last=True):
        lr = get_lr(step, total, run.optimizer.lr, settings.schedule, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(train.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = forward(x)
            loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums.loss += loss.detach() * len(y)
        sums.correct += (logits.detach().argmax(1) == y).sum()
        sums.seen += len(y)
        step += 1
    return sums, step, lr


def seconds_per_image(
    params: TrialParams, data: DeviceData, settings: TrainSettings, augment: Augment, steps: int = 12, warmup: int = 2
) -> float:
    """Training seconds per image of `params` on this device and thread count, timed over `steps`
    steps after `warmup` untimed ones (first-call allocations, kernel selection, the thread pool)."""
    batch = params.optimizer.batch_size
    images = min(len(data), batch * steps)
    model = seeded_model(params.model.shaped(data.shape), 0, data.device)
    run = TrainingRun(params.optimizer, settings, augment, epochs=1, seed=0)
    fit(model, data.head(warmup * batch), None, run)
    sample = data.head(images)
    started = time.perf_counter()
    fit(model, sample, None, run)
    return (time.perf_counter() - started) / max(1, len(sample))


def snapshot_device(resume: dict[str, Any]) -> str:
    """The device type a snapshot's random states belong to (snapshots before the "device" key: a
    CUDA generator's state is 16 bytes, seed and offset; a CPU one's is the 5,056-byte Mersenne Twister)."""
    return resume.get("device") or ("cuda" if resume["generator"].numel() == 16 else "cpu")


def restore_random_state(resume: dict[str, Any], generator: torch.Generator, seed: int, device: torch.device) -> bool:
    """Put back the batch generator and the dropout RNG a snapshot saved, so the run goes on exactly
    as if never stopped; True if it did. Both setters take CPU byte tensors only, whatever the device.

    A snapshot from another device type (a trial killed on a GPU host and retried on a CPU one, or
    the other way round) has states that mean nothing here: the streams restart from a seed derived
    from the trial's and the epoch, so the retry is reproducible but not bit-identical."""
    if snapshot_device(resume) == device.type:
        generator.set_state(resume["generator"].to("cpu", torch.uint8))
        _set_rng_state(resume["rng"].to("cpu", torch.uint8), device)
        return True
    fresh = derive_seed(seed, int(resume["epoch"]))
    generator.manual_seed(fresh)
    if device.type == "cuda":
        torch.cuda.manual_seed(fresh)
    else:
        torch.manual_seed(fresh)
    log.warning(
        "resuming on %s from a snapshot taken on %s after epoch %d: weights and optimizer carry on; batch "
        "order and dropout restart from seed %d, so this retry is not bit-identical to an unbroken run",
        device.type,
        snapshot_device(resume),
        resume["epoch"],
        fresh,
    )
    return False


def _rng_state(device: torch.device) -> torch.Tensor:
    """The global generator dropout draws from on `device`."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def seeded_model(spec: ModelSpec, seed: int, device: torch.device) -> DynamicCNN:
    """Build the model with weights drawn from `seed`, so a (spec, seed) pair is reproducible."""
    torch.manual_seed(seed)
    return DynamicCNN(spec).to(device).to(memory_format=torch.channels_last)
