"""The finalizer: choose the members, fit their epochs to the time left, retrain them from scratch on
train + validation, score the test split once, and publish the model, its figures and the study's note."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna_dashboard import save_note

import hpo
from hpo import attrs
from hpo.errors import HpoError
from hpo.learn import checkpoints, sources
from hpo.learn.data import DeviceData, device_data, stratified_split
from hpo.learn.devices import Placement
from hpo.learn.model import Ensemble, InputShape, count_parameters, cpu_weights
from hpo.learn.params import TrialParams
from hpo.learn.train import EpochStats, Replan, evaluate, fit, recipe, seconds_per_image, seeded_model
from hpo.paths import final_dir
from hpo.results import plots, report
from hpo.results.members import Member, choose_members, member_seed, trial_models
from hpo.results.stats import wilson_interval
from hpo.search import artifacts, budget
from hpo.search.progress import Progress
from hpo.search.storage import DatabaseLock
from hpo.search.trials import finished_count
from hpo.settings.config import StudyConfig

log = logging.getLogger(__name__)


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


def accuracy_figures(predictions: torch.Tensor, truth: torch.Tensor) -> dict[str, Any]:
    correct = int((predictions == truth).sum())
    low, high = wilson_interval(correct, len(truth))
    return {
        "accuracy": correct / max(1, len(truth)),
        "correct": correct,
        "images": len(truth),
        "ci95": [round(low, 5), round(high, 5)],
    }


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
        epochs = budget.fitted_epochs(per_epoch, deadline, test_s, epochs, source)
        replan = budget.timed_replan(deadline, test_s, requested)
    for index, trial in enumerate(chosen):
        if (
            members
            and deadline is not None
            and (
                late := budget.would_end_late(
                    members[0].trial,
                    members[0].train_s,
                    trial,
                    len(members) + 1,
                    deadline,
                    test_s * (index + 1 + reused) / (len(chosen) + reused),
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
    with DatabaseLock(storage.engine, f"{cfg.name}.final") if storage is not None else contextlib.nullcontext():
        if artifact_store is not None:
            summary["artifacts"] = publish(study, artifact_store, files)
        study.set_user_attr(attrs.FINAL, summary)
        # Sorts first in the dashboard's user-attribute table, so a final-trained study shows it at a glance.
        study.set_user_attr(attrs.FINAL_TEST_ACCURACY, metrics["test_accuracy"])
        save_note(study, report.dashboard_note(cfg, best, metrics))


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
    from hpo.learn.devices import place

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
