"""The finalizer: choose the members, fit their epochs to the time left, retrain them from scratch on
train + validation, score the test split once, and publish the model, its figures and the study's note."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna_dashboard import save_note

import hpo
from hpo import artifacts, attrs, budget, checkpoints, plots, sources
from hpo import trials as trials_mod
from hpo.config import StudyConfig
from hpo.data import DeviceData, device_data, stratified_split
from hpo.devices import Placement
from hpo.errors import HpoError
from hpo.model import Ensemble, InputShape, count_parameters, cpu_weights, with_weights
from hpo.params import TrialParams
from hpo.progress import Progress
from hpo.storage import SlotLock, final_dir
from hpo.study import finished_count
from hpo.train import EpochStats, Replan, derive_seed, evaluate, fit, recipe, seconds_per_image, seeded_model

log = logging.getLogger(__name__)

FINAL_SEED_TAG = 0x46494E41  # "FINA": keeps the final run's seed apart from every trial's


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "hpo": hpo.__version__}
    for dist in ("torch", "torchvision", "optuna", "optuna-dashboard", "sqlalchemy", "numpy"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("HPO_GIT_REVISION")


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HpoError(f"cannot create the output directory {out_dir} ({e.strerror}). Pass a writable --out.") from e
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise HpoError(f"output directory {out_dir} is not writable. Pass a writable --out.")


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % for the default z): honest near 0 and 1,
    unlike the normal approximation, and what a 10,000-image test accuracy should be quoted with."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_figures(predictions: torch.Tensor, truth: torch.Tensor) -> dict[str, Any]:
    correct = int((predictions == truth).sum())
    low, high = wilson_interval(correct, len(truth))
    return {
        "accuracy": correct / max(1, len(truth)),
        "correct": correct,
        "images": len(truth),
        "ci95": [round(low, 5), round(high, 5)],
    }


CANDIDATES = 10  # distinct COMPLETE trials, best first, that may join an ensemble


def choose_members(
    study: optuna.Study, cfg: StudyConfig, val_labels: torch.Tensor | None = None, store: Any = None
) -> tuple[list[optuna.trial.FrozenTrial], str]:
    """The members' trials, best first, and a line saying how they were chosen.

    The first is the best COMPLETE trial by validation value. With `[final] ensemble` above 1, the
    others are chosen greedily (Caruana et al. 2004, without replacement) among the next best
    distinct COMPLETE trials: the one whose validation outputs raise the averaged ensemble's
    validation accuracy most joins, until none raises it or the ensemble is full. A trial whose
    outputs are missing (a study run without an artifact store) cannot join."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise HpoError(
            f"study {cfg.name!r} has no COMPLETE trial yet, so there is nothing to retrain. "
            f"Run `hpo optimize --study {cfg.name}` (or workers) until one completes."
        )
    ranked = sorted(complete, key=trials_mod.value, reverse=cfg.direction == "maximize")
    distinct: dict[str, optuna.trial.FrozenTrial] = {}
    for trial in ranked:
        distinct.setdefault(json.dumps(trial.params, sort_keys=True), trial)
    candidates = list(distinct.values())[:CANDIDATES]
    best, k = candidates[0], cfg.final.ensemble
    lead = warm_start_lead(study, best)
    if k == 1 or len(candidates) == 1:
        return [best], f"trial {best.number}: the best COMPLETE trial by validation {cfg.metric}{lead}"
    outputs = {t.number: p for t in candidates if (p := val_outputs(store, t, val_labels)) is not None}
    if best.number not in outputs or val_labels is None:
        return [best], (
            f"trial {best.number} alone: the best COMPLETE trial by validation {cfg.metric}{lead}; it has no "
            "validation outputs in the artifact store to choose further members on"
        )
    members, total = [best], outputs[best.number].clone()
    scores = [_accuracy(total, val_labels)]
    while len(members) < k:
        gains = {
            t.number: _accuracy(total + outputs[t.number], val_labels)
            for t in candidates
            if t.number in outputs and t not in members
        }
        if not gains or max(gains.values()) <= scores[-1]:
            break
        number = max(gains, key=lambda n: gains[n])
        members.append(next(t for t in candidates if t.number == number))
        total += outputs[number]
        scores.append(gains[number])
    path = " -> ".join(f"{100 * a:.2f}" for a in scores)
    why = (
        f"{len(members)} of up to {k} member(s), trials {', '.join(str(t.number) for t in members)}: each raised "
        f"the ensemble's validation accuracy ({path} %)"
    )
    if len(members) < k:
        why += f"; no other of the {len(candidates)} best distinct trials raised it further"
    return members, why + lead


def warm_start_lead(study: optuna.Study, best: optuna.trial.FrozenTrial) -> str:
    """ "; trial 0 is the study file's warm start ...": said when the lead member is a configuration the
    user wrote rather than one the search found, with how many of the search's own trials it beat,
    so that a short search which found nothing better says so instead of looking like a result."""
    origin = best.user_attrs.get(attrs.WARM_START)
    if origin is None:
        return ""
    searched = [
        t for t in study.get_trials(deepcopy=False, states=trials_mod.FINISHED) if attrs.WARM_START not in t.user_attrs
    ]
    complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in searched)
    return (
        f"; trial {best.number} is the warm start the study file names ({origin}): no configuration of the "
        f"search's own {len(searched)} finished trial(s) ({complete} complete, {len(searched) - complete} "
        "pruned) scored above it on validation"
    )


def _accuracy(summed_probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((summed_probs.argmax(1) == labels).float().mean())


def val_outputs(store: Any, trial: optuna.trial.FrozenTrial, labels: torch.Tensor | None) -> torch.Tensor | None:
    """A COMPLETE trial's validation probabilities (float32), if kept and of the same images."""
    pointer = trial.user_attrs.get(attrs.VAL_OUTPUTS)
    if store is None or not pointer or labels is None:
        return None
    try:
        saved = torch.load(io.BytesIO(artifacts.read_bytes(store, pointer)), map_location="cpu", weights_only=True)
    except Exception as e:  # a missing or damaged file: that trial cannot join
        log.warning("final-train: trial %d's validation outputs cannot be read (%s)", trial.number, e)
        return None
    probs = saved["probs"].float()
    return probs if probs.shape[0] == len(labels) else None


@dataclass
class Member:
    trial: optuna.trial.FrozenTrial
    seed: int
    model: torch.nn.Module
    history: list[EpochStats]
    train_s: float
    trained_by: str = "final-train"  # or "search": the trial's own model, trained on the trial split


def trial_models(
    chosen: list[optuna.trial.FrozenTrial], cfg: StudyConfig, train_all: DeviceData, store: Any
) -> list[Member]:
    """Each chosen trial's own trained model (`[final] trial_models`): the same recipe and horizon as
    its retrained copy, trained already by the search on the trial split, and the very model whose
    validation outputs chose the members. A trial without one (no artifact store, not among the
    study's best when it ended, a file that cannot be read) is retrained alone."""
    from hpo.objective import TRIAL_MODEL_FILE

    reused = []
    for trial in chosen:
        pointer = trial.user_attrs.get(attrs.TRIAL_MODEL)
        if store is None or not pointer:
            continue
        params = TrialParams.from_flat(trial.params)
        try:
            saved = torch.load(io.BytesIO(artifacts.read_bytes(store, pointer)), map_location="cpu", weights_only=True)
            if saved.get("format") != checkpoints.TRIAL_MODEL_FORMAT or saved.get("study") != cfg.name:
                raise ValueError(f"not a {checkpoints.TRIAL_MODEL_FORMAT} file of study {cfg.name!r}")
            if TrialParams.from_flat(saved["params"]) != params:
                raise ValueError("its params are not the trial's")
            model = with_weights(params.model.shaped(train_all.shape), saved["state_dict"])
        except Exception as e:  # a missing or damaged file: that member is retrained alone
            log.warning("final-train: trial %d's %s cannot be reused (%s)", trial.number, TRIAL_MODEL_FILE, e)
            continue
        model = model.to(train_all.device).to(memory_format=torch.channels_last)
        reused.append(Member(trial, int(saved["seed"]), model, [], 0.0, "search"))
    return reused


def member_seed(cfg: StudyConfig, index: int) -> int:
    # Member 0 keeps the seed a single-model final run always had, so its results reproduce.
    return derive_seed(cfg.seed, FINAL_SEED_TAG) if index == 0 else derive_seed(cfg.seed, FINAL_SEED_TAG, index)


SHRINK_MARGIN = 1.05  # an epoch is counted 5 % slower than measured when fitting epochs to the time left


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


def fitted_epochs(per_epoch: float, deadline: budget.Deadline, test_s: float, epochs: int, source: str) -> int:
    """The first member's epochs that end before `deadline`, `test_s` for the test passes kept free:
    all of them unless time is short, else as many as fit (at least one)."""
    fitted = _epochs_that_fit(per_epoch, _time_left(deadline, test_s), epochs)
    log.info(
        f"final-train: {per_epoch:.1f}s per epoch ({source}), {deadline.left():.0f}s left ({test_s:.0f}s of "
        f"them for the test passes): {fitted} of {epochs} epochs fit"
    )
    return fitted


def _time_left(deadline: budget.Deadline, test_s: float) -> float:
    """Seconds left for training epochs: the deadline less the slack and the measured test passes."""
    return deadline.left() - budget.slack_s(deadline.time_s) - test_s


def _epochs_that_fit(per_epoch: float, left: float, epochs: int, done: int = 0) -> int:
    """Epochs in all (`done` of them trained already), up to `epochs`, that end in `left` seconds more."""
    return max(done or 1, min(epochs, done + int(left // (SHRINK_MARGIN * per_epoch))))


def timed_replan(deadline: budget.Deadline, test_s: float, epochs: int) -> Replan:
    """Re-fit the first member's epochs to the epochs it has timed itself, through its first half:
    fewer where the time left is short of them (another load on the machine), more, up to the
    `epochs` asked for, where the estimate it started from was slow (a trial's epochs timed beside
    another worker, scaled to the finalizer's threads: 15.1 s where it trained 12.9 s in the 2026-12-06
    quick start, which ended 58 s early with 12 of 17 epochs). Past halfway the schedule is left
    alone, since stretching it late would raise the learning rate again."""

    def replan(history: list[EpochStats], total: int) -> int:
        done = len(history)
        if done >= total or 2 * done > total:
            return total
        per_epoch = statistics.median(s.seconds for s in history)
        new = _epochs_that_fit(per_epoch, _time_left(deadline, test_s), epochs, done)
        if new != total:
            log.info(f"final-train: {per_epoch:.1f}s per epoch trained after epoch {done}: {new} epochs fit")
        return new

    return replan


def train_members(
    chosen: list[optuna.trial.FrozenTrial],
    cfg: StudyConfig,
    train_all: DeviceData,
    epochs: int,
    deadline: budget.Deadline | None,
    threads: int = 1,
    test_images: int = budget.TEST_IMAGES,
    reused: int = 0,
) -> tuple[list[Member], int, str | None]:
    """Retrain each chosen trial from scratch, one after another, with the recipe its trial trained
    with. With a deadline, the first member trains the epochs that fit (all of them unless time is
    short, from its trial's measured epochs) and the ensemble stops before a member that would end
    past it; the test passes of `reused` trial models are kept free too. Returns the members, their
    epochs and what shrank, if anything."""
    members: list[Member] = []
    shrunk: list[str] = []
    replan = None
    requested = epochs
    test_s = 0.0
    if deadline is not None:
        test_s = test_pass_seconds(chosen, cfg, train_all, test_images, len(chosen) + reused)
        per_epoch, source = epoch_seconds(chosen[0], cfg, train_all, threads)
        epochs = fitted_epochs(per_epoch, deadline, test_s, epochs, source)
        replan = timed_replan(deadline, test_s, requested)
    for index, trial in enumerate(chosen):
        if (
            members
            and deadline is not None
            and (
                late := _would_end_late(
                    members, trial, deadline, test_s * (index + 1 + reused) / (len(chosen) + reused)
                )
            )
        ):
            shrunk.append(
                f"ensemble shrank from {len(chosen)} to {len(members)} member(s) to end within the time budget: {late}"
            )
            break
        which = f"member {index + 1}/{len(chosen)}"
        members.append(_train_member(trial, cfg, train_all, epochs, member_seed(cfg, index), which, replan))
        epochs, replan = len(members[0].history), None  # the other members train as long as the first did
    if epochs < requested:
        shrunk.insert(0, f"epochs shrank from {requested} to {epochs} to end within the time budget")
    for line in shrunk:
        log.warning("final-train: %s", line)
    return members, epochs, "; ".join(shrunk) or None


def _would_end_late(
    members: list[Member], trial: optuna.trial.FrozenTrial, deadline: budget.Deadline, test_s: float
) -> str | None:
    """Why the next member would end past the deadline: the first member's measured time, scaled by
    the trials' relative cost per image, plus `test_s`, the test passes of the ensemble with it;
    None if it fits."""
    first, this = budget.trial_cost(members[0].trial), budget.trial_cost(trial)
    ratio = this.per_image_s() / first.per_image_s() if first and this else 1.0
    needed = members[0].train_s * ratio + budget.slack_s(deadline.time_s) + test_s
    if deadline.left() >= needed:
        return None
    return (
        f"member {len(members) + 1} (trial {trial.number}) needs about {needed:.0f}s, "
        f"{max(0.0, deadline.left()):.0f}s are left"
    )


def _train_member(
    trial: optuna.trial.FrozenTrial,
    cfg: StudyConfig,
    train_all: DeviceData,
    epochs: int,
    seed: int,
    which: str,
    replan: Replan | None = None,
) -> Member:
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

        history = fit(
            model,
            train_all,
            None,
            recipe(cfg, params, seed, epochs),
            on_epoch,
            replan=replan_shown if replan is not None else None,
        )
    return Member(trial, seed, model, history, time.perf_counter() - started)


def final_train(
    study: optuna.Study,
    cfg: StudyConfig,
    dataset: sources.DataSet,
    placement: Placement,
    out_dir: Path,
    epochs: int | None = None,
    artifact_store=None,
    storage: optuna.storages.RDBStorage | None = None,
    deadline: budget.Deadline | None = None,
) -> dict[str, Any]:
    """Retrain the [final] ensemble, score the test split once, write model.pt, metrics.json and three
    PNGs to `out_dir`, upload them to the study in `artifact_store`, and write the dashboard note.

    With `deadline`, members train while they fit before it and the ensemble shrinks to what did."""
    _check_writable(out_dir)
    if (out_dir / "model.pt").exists():
        checkpoints.load_final(out_dir / "model.pt", cfg.name)  # never overwrite another study's model
    epochs = epochs or cfg.final.epochs
    started = time.perf_counter()
    sources.check(study, dataset)  # never scored on other data than the trials saw
    held = dataset.test
    if held is None:
        raise HpoError("final-train needs the data read with its test split (sources.open_for(..., with_test=True)).")
    labels = dataset.train.labels
    _, val_idx = stratified_split(labels, cfg.budget.val_fraction, cfg.seed)  # the trials' validation split
    chosen, chosen_by = choose_members(study, cfg, torch.as_tensor(labels[val_idx], dtype=torch.int64), artifact_store)
    log.info("final-train: %s", chosen_by)
    train_all = device_data(dataset.train, dataset, placement.device)
    reused = trial_models(chosen, cfg, train_all, artifact_store) if cfg.final.trial_models else []
    members, epochs, shrunk = train_members(
        chosen, cfg, train_all, epochs, deadline, placement.threads, len(held), len(reused)
    )
    members += reused  # chosen on these very models' validation outputs, so all join, retrained or not
    train_seconds = time.perf_counter() - started

    # The only read of the test split in the whole project.
    test_images = held.images
    test = device_data(held, dataset, placement.device)
    metrics, ev = score(cfg, members, test, dataset.classes)
    metrics.update(
        epochs=epochs,
        train_images=len(train_all),
        ensemble={**metrics["ensemble"], "chosen_by": chosen_by, "shrunk": shrunk},
        wall_time_s=round(time.perf_counter() - started, 2),
        train_time_s=round(train_seconds, 2),
        device=placement.describe(),
        versions=versions(),
        git_revision=git_revision(),
    )
    files = _result_files(
        cfg, metrics, _checkpoint(cfg, members, ev.accuracy, dataset), ev, test.y.cpu(), test_images, members[0]
    )
    for name, payload in files.items():
        checkpoints.write_atomic(out_dir / name, payload)
    _record(study, cfg, members[0].trial, metrics, files, out_dir, artifact_store, storage)
    return metrics


SUMMARY_KEYS = (
    "test_accuracy",
    "test_ci95",
    "test_loss",
    "best_trial",
    "best_trial_value",
    "seed",
    "epochs",
    "wall_time_s",
)


def _record(
    study: optuna.Study,
    cfg: StudyConfig,
    best: optuna.trial.FrozenTrial,
    metrics: dict[str, Any],
    files: dict[str, bytes],
    out_dir: Path,
    artifact_store: Any,
    storage: optuna.storages.RDBStorage | None,
) -> None:
    """Upload the files, and write the study's final summary, its headline attribute and its note."""
    summary = {k: metrics[k] for k in SUMMARY_KEYS}
    summary["members"] = [r["trial"] for r in metrics["members"] if r["trained_by"] == "final-train"]
    summary["trial_models"] = [r["trial"] for r in metrics["members"] if r["trained_by"] == "search"]
    summary["output_dir"] = str(out_dir.resolve())
    # Two final-trains at once each replace the other's artifacts in turn, never both at the same time.
    with SlotLock(storage, f"{cfg.name}.final") if storage is not None else contextlib.nullcontext():
        if artifact_store is not None:
            summary["artifacts"] = publish(study, artifact_store, files)
        study.set_user_attr(attrs.FINAL, summary)
        # Sorts first in the dashboard's user-attribute table, so a final-trained study shows it at a glance.
        study.set_user_attr(attrs.FINAL_TEST_ACCURACY, metrics["test_accuracy"])
        save_note(study, note(cfg, best, metrics))


def score(
    cfg: StudyConfig, members: list[Member], test: DeviceData, classes: tuple[str, ...]
) -> tuple[dict[str, Any], Any]:
    """The ensemble's test figures (the headline), each member's own, and the per-class accuracy.

    fp32, the precision of `hpo export`'s files: the figure reported is the figure an export gets."""
    ev = evaluate(
        Ensemble([member.model for member in members], cfg.final.tta), test, cfg.train.eval_batch_size, fast=False
    )
    truth = test.y.cpu()
    member_rows = []
    for member in members:
        alone = accuracy_figures(
            evaluate(Ensemble([member.model], cfg.final.tta), test, cfg.train.eval_batch_size, fast=False).predictions,
            truth,
        )
        member_rows.append(
            {
                "trial": member.trial.number,
                "value": member.trial.value,
                "seed": member.seed,
                "params": member.trial.params,
                "test_accuracy": alone["accuracy"],
                "ci95": alone["ci95"],
                "train_time_s": round(member.train_s, 2),
                "trained_by": member.trained_by,
                "n_params": count_parameters(member.model),
            }
        )
    best = members[0]
    metrics: dict[str, Any] = {
        "study": cfg.name,
        "test_accuracy": ev.accuracy,
        "test_ci95": accuracy_figures(ev.predictions, truth)["ci95"],
        "test_loss": ev.loss,
        "test_images": len(test),
        "per_class_accuracy": {
            name: float((ev.predictions[truth == i] == i).float().mean()) for i, name in enumerate(classes)
        },
        "ensemble": {
            "requested": cfg.final.ensemble,
            "models": len(members),
            "trained": sum(m.trained_by == "final-train" for m in members),
            "from_search": sum(m.trained_by == "search" for m in members),
            "tta": cfg.final.tta,
            "gain_over_best_member": ev.accuracy - max(r["test_accuracy"] for r in member_rows),
        },
        "members": member_rows,
        "best_trial": best.trial.number,
        "best_trial_value": best.trial.value,
        "metric": cfg.metric,
        "params": best.trial.params,
        "seed": best.seed,
        "n_params": sum(r["n_params"] for r in member_rows),
        "history": [
            {"epoch": s.epoch, "train_loss": s.train_loss, "train_accuracy": s.train_accuracy} for s in best.history
        ],
    }
    return metrics, ev


def _checkpoint(
    cfg: StudyConfig, members: list[Member], test_accuracy: float, dataset: sources.DataSet
) -> dict[str, Any]:
    """model.pt: every member's weights and spec (checkpoints.FINAL_FORMAT)."""
    best = members[0]
    shape = InputShape(dataset.channels, dataset.image_size, len(dataset.classes))
    return {
        "format": checkpoints.FINAL_FORMAT,
        "study": cfg.name,
        "trial": best.trial.number,
        "params": best.trial.params,
        "tta": cfg.final.tta,
        # What the model takes and gives, and how to read its data set again (hpo export checks on its test split).
        "data": {**dataset.info(), "settings": cfg.to_dict()["data"], "seed": cfg.seed},
        "members": [
            {
                "trial": m.trial.number,
                "params": m.trial.params,
                "seed": m.seed,
                "trained_by": m.trained_by,
                "model_spec": TrialParams.from_flat(m.trial.params).model.shaped(shape).to_dict(),
                "state_dict": cpu_weights(m.model),
            }
            for m in members
        ],
        "test_accuracy": test_accuracy,
        "hpo_version": hpo.__version__,
    }


def after_search(
    study: optuna.Study,
    cfg: StudyConfig,
    storage: optuna.storages.RDBStorage,
    dataset: sources.DataSet,
    device: str | None,
    artifact_store: Any,
    finished_before: int | None = None,
) -> dict[str, Any]:
    """`optimize --final`: the finalizer in this process, within what is left of the time budget.
    `finished_before`: the study's finished trials when the command started; if the search added
    none and the study has a published model, it is kept."""
    from hpo.devices import place

    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise HpoError(
            f"--final: study {cfg.name!r} has no COMPLETE trial after the search, so there is nothing "
            "to retrain. Give a longer --time (or more [budget] n_trials) and run again."
        )
    deadline = budget.get_deadline(study)
    published = study.user_attrs.get(attrs.FINAL)
    if published and finished_before is not None and finished_count(study) == finished_before:
        # Nothing new to retrain from, and inside a spent budget the retrain could only be shorter.
        left = "" if deadline is None else f" with {max(0.0, deadline.left()):.0f}s of its time budget left"
        raise HpoError(
            f"--final: the search finished no new trial{left}, so the published model (test accuracy "
            f"{100 * published['test_accuracy']:.2f} %) is kept. Give more time (`hpo extend --study "
            f"{cfg.name} --time 10m`, or --time 10m), or retrain by hand with `hpo final-train`."
        )
    # A GPU for the finalizer without taking a worker's claim on it (the workers have exited).
    placement = place(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    return final_train(
        study, cfg, dataset, placement, final_dir(cfg.name), None, artifact_store, storage, deadline=deadline
    )


def _result_files(
    cfg: StudyConfig,
    metrics: dict[str, Any],
    checkpoint: dict[str, Any],
    ev: Any,
    truth: torch.Tensor,
    test_images: Any,
    best: Member,
) -> dict[str, bytes]:
    truth_np, pred_np = truth.numpy(), ev.predictions.numpy()
    classes = checkpoint["data"]["classes"]
    counts = plots.confusion_matrix(truth_np, pred_np, classes)
    metrics["confusion_matrix"] = counts.tolist()
    what = "final model" if len(metrics["members"]) == 1 else f"ensemble of {len(metrics['members'])}"
    return {
        "model.pt": artifacts.torch_bytes(checkpoint),
        "metrics.json": json.dumps(metrics, indent=2).encode(),
        "confusion_matrix.png": plots.confusion_matrix_png(
            counts, classes, f"{cfg.name}: {what} on the test split, accuracy {ev.accuracy:.4f}"
        ),
        "learning_curve.png": plots.learning_curve_png(
            best.trial.user_attrs.get(attrs.HISTORY, []), metrics["history"], ev.accuracy, best.trial.number
        ),
        "misclassified.png": plots.misclassified_png(test_images, truth_np, pred_np, ev.confidence.numpy(), classes),
    }


def publish(study: optuna.Study, store, files: dict[str, bytes]) -> dict[str, str]:
    """Upload the final files to the study, replacing an earlier final-train's."""
    earlier = (study.user_attrs.get(attrs.FINAL) or {}).get("artifacts", {})
    ids = {name: artifacts.upload_bytes(store, study, name, payload) for name, payload in files.items()}
    for artifact_id in earlier.values():
        artifacts.remove(store, study, artifact_id)
    return ids


SEARCHED = {"final-train": "", "search": ", its trial's own model"}


def describe_accuracy(accuracy: float, ci95: list[float]) -> str:
    """ "93.61 % (95 % CI 93.12-94.07)": the headline figure with its Wilson interval, in percent."""
    return f"{100 * accuracy:.2f} % (95 % CI {100 * ci95[0]:.2f}-{100 * ci95[1]:.2f})"


def note(cfg: StudyConfig, best: optuna.trial.FrozenTrial, metrics: dict[str, Any]) -> str:
    """The study's dashboard note: the final result first, so a final-trained study is obvious."""
    val, test = metrics["best_trial_value"], metrics["test_accuracy"]
    ens = metrics["ensemble"]
    params = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in best.params.items()
    )
    worst = min(metrics["per_class_accuracy"].items(), key=lambda kv: kv[1])
    what = "the final model" if ens["models"] == 1 else f"the ensemble of {ens['models']}"
    rows = [
        f"| validation {cfg.metric} of trial {best.number} | {val:.4f} |",
        f"| test accuracy of {what} | {describe_accuracy(test, metrics['test_ci95'])} |",
    ]
    rows += [
        f"| member: trial {r['trial']} (val {r['value']:.4f}, seed {r['seed']}{SEARCHED[r['trained_by']]}) | "
        f"{describe_accuracy(r['test_accuracy'], r['ci95'])} |"
        for r in metrics["members"]
    ]
    if ens["models"] > 1:
        rows.append(f"| gain of the ensemble over its best member | {100 * ens['gain_over_best_member']:+.2f} points |")
    if cfg.metric == "val_accuracy":
        rows.append(f"| gap, test minus validation | {100 * (test - val):+.2f} points |")
    rows.append(f"| weakest class | {worst[0]} ({worst[1]:.4f}) |")
    table = "\n".join(rows)
    chosen_by = ens.get("chosen_by") or f"the best trial by validation {cfg.metric}"
    policy = (
        f"Members chosen on the validation split: {chosen_by}. Each is retrained with its own seed and the "
        f"recipe its trial trained with; softmax outputs averaged"
        f"{', each image also with its mirror image' if ens['tta'] == 'flip' else ''}. "
        "Nothing was chosen by test accuracy."
    )
    if ens["from_search"]:
        policy += (
            f" The ensemble also holds the {ens['from_search']} trial model(s) the search trained (`[final] "
            "trial_models`): the models whose validation outputs chose the members, trained on the trial split."
        )
    if ens["shrunk"]:
        policy += f" The {ens['shrunk']}."
    others = "" if ens["trained"] == 1 else f", and {ens['trained'] - 1} more"  # retrained members
    which = (
        "the warm start the study file names, which no trial of the search beat on validation"
        if attrs.WARM_START in best.user_attrs
        else "the best of the search"
    )
    subset = (
        f"{cfg.budget.train_subset:,} images of the trial training split"
        if cfg.budget.train_subset
        else ("the trial training split")
    )
    return f"""## Final-trained: test accuracy {describe_accuracy(test, metrics["test_ci95"])}

Trial {best.number}, {which}{others}, retrained from scratch by `hpo final-train` for
{metrics["epochs"]} epochs on all {metrics["train_images"]:,} training images, then scored once on the untouched
{metrics["test_images"]:,}-image test split. {policy}

| | |
|---|---|
{table}

Trials train the same recipe for {cfg.budget.epochs} epochs on {subset}, unless a pruner or the time
budget stops them; the final run adds the validation images to its training data.

### Params of the first member (trial {best.number})

| param | value |
|---|---|
{params}

Study artifacts: `confusion_matrix.png`, `learning_curve.png`, `misclassified.png`, `model.pt`,
`metrics.json`. Written {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, hpo {hpo.__version__},
code {metrics["git_revision"] or "unknown"}.
"""
