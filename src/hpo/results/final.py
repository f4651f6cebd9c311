"""The finalizer: choose the members, fit their epochs to the time left, retrain them from scratch on
train + validation, score the test split once, and publish the model, its figures and the study's note."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna_dashboard import save_note

import hpo
from hpo import attrs
from hpo.errors import HpoError
from hpo.learn import checkpoints, sources
from hpo.learn.data import device_data
from hpo.learn.model import InputShape, cpu_weights
from hpo.learn.params import TrialParams
from hpo.paths import final_dir
from hpo.results import plots, report
from hpo.results.members import Member, trial_models
from hpo.results.provenance import git_revision, versions
from hpo.results.retrain import TimeLimit, train_members
from hpo.results.scoring import score
from hpo.search import artifacts, budget
from hpo.search.join import choose_members, val_labels
from hpo.search.locks import DatabaseLock
from hpo.search.session import Workspace
from hpo.search.trials import finished_count
from hpo.settings.config import StudyConfig

log = logging.getLogger(__name__)


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HpoError(f"cannot create the output directory {out_dir} ({e.strerror}). Pass a writable --out.") from e
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise HpoError(f"output directory {out_dir} is not writable. Pass a writable --out.")


def final_train(
    study: optuna.Study,
    cfg: StudyConfig,
    workspace: Workspace,
    out_dir: Path,
    epochs: int | None = None,
    deadline: budget.Deadline | None = None,
) -> dict[str, Any]:
    """Retrain the [final] ensemble on the workspace's data and device, score the test split once,
    write model.pt, metrics.json and three PNGs to `out_dir`, upload them to the study in the
    workspace's artifact store, and write the dashboard note.

    With `deadline`, members train while they fit before it and the ensemble shrinks to what did."""
    dataset, placement, store = workspace.data, workspace.placement, workspace.artifact_store
    if dataset is None or dataset.test is None:
        raise HpoError("final-train needs the data read with its test split (sources.open_for(..., with_test=True)).")
    _check_writable(out_dir)
    if (out_dir / "model.pt").exists():
        checkpoints.load_final(out_dir / "model.pt", cfg.name)  # never overwrite another study's model
    started = time.perf_counter()
    sources.check(study, dataset)  # never scored on other data than the trials saw
    held = dataset.test
    chosen, chosen_by = choose_members(study, cfg, val_labels(dataset.train.labels, cfg), store)
    log.info("final-train: %s", chosen_by)
    train_all = device_data(dataset.train, dataset, placement.device)
    reused = trial_models(chosen, cfg, train_all, store) if cfg.final.trial_models else []
    limit = None if deadline is None else TimeLimit(deadline, placement.threads, len(held), len(reused))
    members, epochs, shrunk = train_members(chosen, cfg, train_all, epochs or cfg.final.epochs, limit)
    members += reused  # chosen on these very models' validation outputs, so all join, retrained or not
    train_seconds = time.perf_counter() - started
    # The only read of the test split in the whole project.
    metrics, ev = score(cfg, members, device_data(held, dataset, placement.device), dataset.classes)
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
    files = _result_files(cfg, metrics, _checkpoint(cfg, members, ev.accuracy, dataset), ev, held, members[0])
    for name, payload in files.items():
        checkpoints.write_atomic(out_dir / name, payload)
    note = report.dashboard_note(cfg, members[0].trial, metrics)
    _record(study, f"{cfg.name}.final", workspace, _summary(metrics, out_dir), files, note)
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


def _summary(metrics: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """What the study keeps of a final run (its `final` attribute): the headline figures and where the files are."""
    summary = {k: metrics[k] for k in SUMMARY_KEYS}
    summary["members"] = [r["trial"] for r in metrics["members"] if r["trained_by"] == "final-train"]
    summary["trial_models"] = [r["trial"] for r in metrics["members"] if r["trained_by"] == "search"]
    summary["output_dir"] = str(out_dir.resolve())
    return summary


def _record(
    study: optuna.Study, lock: str, workspace: Workspace, summary: dict[str, Any], files: dict[str, bytes], note: str
) -> None:
    """Upload the files, and write the study's final summary, its headline attribute and its note,
    under the database lock `lock`: two final-trains at once each replace the other's artifacts in
    turn, never both at the same time."""
    storage, store = workspace.storage, workspace.artifact_store
    with DatabaseLock(storage.engine, lock) if storage is not None else contextlib.nullcontext():
        if store is not None:
            summary["artifacts"] = publish(study, store, files)
        study.set_user_attr(attrs.FINAL, summary)
        # Sorts first in the dashboard's user-attribute table, so a final-trained study shows it at a glance.
        study.set_user_attr(attrs.FINAL_TEST_ACCURACY, summary["test_accuracy"])
        save_note(study, note)


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
    study: optuna.Study, cfg: StudyConfig, workspace: Workspace, finished_before: int | None = None
) -> dict[str, Any]:
    """`optimize --final`: the finalizer in this process, within what is left of the time budget.
    `finished_before`: the study's finished trials when the command started; if the search added
    none and the study has a published model, it is kept."""
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
    return final_train(study, cfg, workspace, final_dir(cfg.name), deadline=deadline)


def _result_files(
    cfg: StudyConfig, metrics: dict[str, Any], checkpoint: dict[str, Any], ev: Any, held: Any, best: Member
) -> dict[str, bytes]:
    """The final run's files: model.pt, metrics.json and the three PNGs (`held`: the test split's images)."""
    test_images, truth_np, pred_np = held.images, np.asarray(held.labels), ev.predictions.numpy()
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
