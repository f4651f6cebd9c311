"""The finalizer's training: each chosen trial retrained from scratch with the recipe its trial
trained with, one after another, in the epochs that fit before the deadline (from the trial's own
measured epochs), the ensemble stopping before a member that would end past it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import optuna

from hpo.learn.data import DeviceData
from hpo.learn.params import TrialParams
from hpo.learn.train import EpochStats, Hooks, Replan, evaluate, fit, recipe, seconds_per_image, seeded_model
from hpo.results.members import Member, member_seed
from hpo.search import budget, final_epochs
from hpo.search.progress import Progress
from hpo.settings.config import StudyConfig

log = logging.getLogger(__name__)


def test_pass_seconds(
    chosen: list[optuna.trial.FrozenTrial],
    cfg: StudyConfig,
    train_all: DeviceData,
    test_images: int = budget.TEST_IMAGES,
    models: int | None = None,
) -> float:
    """Seconds `score` will take on the test split: every model's fp32 forward passes (one per TTA
    view) twice, once in the ensemble and once alone, timed on 1,024 training images with the first
    member's model (the test split is not read before it is scored). `models`: the ensemble's
    models, one per chosen trial unless its trial models join too."""
    params = TrialParams.from_flat(chosen[0].params)
    model = seeded_model(params.model.shaped(train_all.shape), 0, train_all.device)
    sample = train_all.head(1024)
    evaluate(model, sample.head(64), cfg.train.eval_batch_size, fast=False)
    started = time.perf_counter()
    evaluate(model, sample, cfg.train.eval_batch_size, fast=False)
    per_image = (time.perf_counter() - started) / max(1, len(sample))
    return per_image * test_images * test_passes(cfg, len(chosen) if models is None else models)


def test_passes(cfg: StudyConfig, members: int) -> int:
    """Forward passes `score` makes per test image: each member with each TTA view, in the ensemble
    and again alone (one member: the ensemble is the member, scored twice all the same)."""
    return budget.test_passes(cfg.final.tta) * members


def epoch_seconds(
    trial: optuna.trial.FrozenTrial, cfg: StudyConfig, train_all: DeviceData, threads: int
) -> tuple[float, str]:
    """Seconds one final epoch of `trial` takes here, and where the figure comes from: the trial's
    own measured epochs, scaled to all the training images and to the finalizer's threads; for a
    trial with none measured, 60 timed training steps after 10 untimed ones."""
    cost = budget.trial_cost(trial)
    if cost is not None:
        per_image = cost.per_image_s() * min(1.0, budget.thread_factor(cost.threads, threads))
        return per_image * len(train_all), f"from trial {trial.number}'s {len(trial.user_attrs['history'])} epochs"
    params = TrialParams.from_flat(trial.params)
    per_image = seconds_per_image(params, train_all, cfg.train, cfg.augment, steps=60, warmup=10)
    return per_image * len(train_all), "timed over 60 steps"


@dataclass(frozen=True)
class TimeLimit:
    """What bounds a timed final run: the study's deadline, the finalizer's threads, the test images
    it will score, and the trial models that join without training (their test passes count too)."""

    deadline: budget.Deadline
    threads: int = 1
    test_images: int = budget.TEST_IMAGES
    reused: int = 0


@dataclass(frozen=True)
class Retrain:
    """One member to retrain: its trial, its seed, and how the logs and the progress bar name it."""

    trial: optuna.trial.FrozenTrial
    seed: int
    which: str = "member 1/1"


def train_members(
    chosen: list[optuna.trial.FrozenTrial],
    cfg: StudyConfig,
    train_all: DeviceData,
    epochs: int,
    limit: TimeLimit | None = None,
) -> tuple[list[Member], int, str | None]:
    """Retrain each chosen trial from scratch, one after another, with the recipe its trial trained
    with. With a time limit, the first member trains the epochs that fit (all of them unless time is
    short, from its trial's measured epochs) and the ensemble stops before a member that would end
    past the deadline; the test passes of the reused trial models are kept free too. Returns the
    members, their epochs and what shrank, if anything."""
    members: list[Member] = []
    shrunk: list[str] = []
    replan = None
    requested = epochs
    test_s = 0.0
    if limit is not None:
        test_s = test_pass_seconds(chosen, cfg, train_all, limit.test_images, len(chosen) + limit.reused)
        per_epoch, source = epoch_seconds(chosen[0], cfg, train_all, limit.threads)
        epochs = final_epochs.fitted_epochs(per_epoch, limit.deadline, test_s, epochs, source)
        replan = final_epochs.timed_replan(limit.deadline, test_s, requested)
    for index, trial in enumerate(chosen):
        late = _would_end_late(members, trial, index, len(chosen), limit, test_s) if members and limit else None
        if late:
            shrunk.append(
                f"ensemble shrank from {len(chosen)} to {len(members)} member(s) to end within the time budget: {late}"
            )
            break
        retrain = Retrain(trial, member_seed(cfg, index), f"member {index + 1}/{len(chosen)}")
        members.append(_train_member(retrain, cfg, train_all, epochs, replan))
        epochs, replan = len(members[0].history), None  # the other members train as long as the first did
    if epochs < requested:
        shrunk.insert(0, f"epochs shrank from {requested} to {epochs} to end within the time budget")
    for line in shrunk:
        log.warning("final-train: %s", line)
    return members, epochs, "; ".join(shrunk) or None


def _would_end_late(
    members: list[Member], trial: optuna.trial.FrozenTrial, index: int, chosen: int, limit: TimeLimit, test_s: float
) -> str | None:
    """Why member `index` (of `chosen`) would end past the deadline, from the first member's own
    time; None if it fits. Its share of the test passes counts, the reused trial models' too."""
    share = test_s * (index + 1 + limit.reused) / (chosen + limit.reused)
    first = members[0]
    return final_epochs.would_end_late(first.trial, first.train_s, trial, len(members) + 1, limit.deadline, share)


def _train_member(
    retrain: Retrain, cfg: StudyConfig, train_all: DeviceData, epochs: int, replan: Replan | None = None
) -> Member:
    trial, seed, which = retrain.trial, retrain.seed, retrain.which
    log.info(
        f"final-train: {which} is trial {trial.number} (val {cfg.metric} {trial.value:.4f}), "
        f"{len(train_all)} images, {epochs} epochs, seed {seed}"
    )
    desc = "final-train" if which == "member 1/1" else f"final-train {which}"
    started = time.perf_counter()
    params = TrialParams.from_flat(trial.params)
    model = seeded_model(params.model.shaped(train_all.shape), seed, train_all.device)
    with Progress(epochs, desc, "epochs") as bar:

        def on_epoch(stats: EpochStats) -> None:
            loss, acc = f"{stats.train_loss:.4f}", f"{stats.train_accuracy:.4f}"
            bar.advance(
                line=f"epoch {stats.epoch}/{bar.total}  loss {loss}  train_acc {acc}  ({stats.seconds:.1f}s)",
                loss=loss,
                acc=acc,
            )

        def replan_shown(history: list[EpochStats], total: int) -> int:
            new = replan(history, total) if replan is not None else total
            bar.resize(new)
            return new

        hooks = Hooks(on_epoch, replan=replan_shown if replan is not None else None)
        history = fit(model, train_all, None, recipe(cfg, params, seed, epochs), hooks)
    return Member(trial, seed, model, history, time.perf_counter() - started)
