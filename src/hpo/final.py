"""The finalizer: retrain the best trial from scratch on train + validation, score the test split once."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna_dashboard import save_note

import hpo
from hpo import artifacts, plots
from hpo import data as data_mod
from hpo.config import StudyConfig
from hpo.data import CLASSES, DeviceData
from hpo.devices import Placement
from hpo.errors import HpoError
from hpo.model import ModelSpec, count_parameters
from hpo.objective import derive_seed
from hpo.progress import Progress
from hpo.storage import SlotLock
from hpo.study import FINAL_ATTR
from hpo.train import EpochStats, Hyper, evaluate, fit, seeded_model

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "hpo-checkpoint/1"
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
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("HPO_GIT_REVISION")


def write_atomic(path: Path, payload: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide results from the dashboard's and other users' processes
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, study: str | None = None) -> dict[str, Any]:
    """Load a final checkpoint (tensors and plain values only: weights_only=True), refusing one
    written by another study or by an incompatible version of hpo."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; none of them is usable
        raise HpoError(f"{path} is not a readable hpo checkpoint ({type(e).__name__}). Re-run final-train.") from e
    found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if found != CHECKPOINT_FORMAT:
        raise HpoError(f"{path} has checkpoint format {found!r}, but this hpo {hpo.__version__} reads "
                       f"{CHECKPOINT_FORMAT!r}. Re-run final-train with this version.")
    if study is not None and checkpoint["study"] != study:
        raise HpoError(f"{path} belongs to study {checkpoint['study']!r}, not {study!r}. "
                       "Pass the matching --study, or another --out.")
    return checkpoint


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HpoError(f"cannot create the output directory {out_dir} ({e.strerror}). Pass a writable --out.") from e
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise HpoError(f"output directory {out_dir} is not writable. Pass a writable --out.")


def final_train(study: optuna.Study, cfg: StudyConfig, data_dir: Path, placement: Placement,
                out_dir: Path, epochs: int | None = None, artifact_store=None,
                storage: optuna.storages.RDBStorage | None = None) -> dict[str, Any]:
    """Retrain, score the test split once, write model.pt, metrics.json and three PNGs to `out_dir`,
    upload them all to the study in the artifact store `artifact_store`, and write the study's dashboard note."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise HpoError(f"study {cfg.name!r} has no COMPLETE trial yet, so there is nothing to retrain. "
                       f"Run `hpo optimize --study {cfg.name}` (or workers) until one completes.")
    _check_writable(out_dir)
    if (out_dir / "model.pt").exists():
        load_checkpoint(out_dir / "model.pt", cfg.name)  # never overwrite another study's model
    best = study.best_trial
    epochs = epochs or cfg.final.epochs
    seed = derive_seed(cfg.seed, FINAL_SEED_TAG)
    device = placement.device

    images, labels = data_mod.load_split(data_dir, "train")
    train_all = DeviceData(images, labels, device)
    log.info("final-train: trial %d (val %s %.4f) from scratch on %d images for %d epochs on %s",
             best.number, cfg.metric, best.value, len(train_all), epochs, placement.name)

    started = time.perf_counter()
    model = seeded_model(best.params, seed, device)
    with Progress(epochs, "final-train", "epochs") as bar:
        def on_epoch(stats: EpochStats) -> None:
            bar.advance(line=f"epoch {stats.epoch}/{epochs}  loss {stats.train_loss:.4f}  train_acc "
                             f"{stats.train_accuracy:.4f}  ({stats.seconds:.1f}s)",
                        loss=f"{stats.train_loss:.4f}", acc=f"{stats.train_accuracy:.4f}")

        history = fit(model, train_all, None, Hyper.from_params(best.params), cfg.train, cfg.augment, epochs, seed,
                      on_epoch)
    train_seconds = time.perf_counter() - started

    # The only read of the test split in the whole project.
    test_images, test_labels = data_mod.load_split(data_dir, "test")
    test = DeviceData(test_images, test_labels, device)
    ev = evaluate(model, test, cfg.train.eval_batch_size)
    truth = test.y.cpu()
    per_class = {name: float((ev.predictions[truth == i] == i).float().mean()) for i, name in enumerate(CLASSES)}

    metrics: dict[str, Any] = {
        "study": cfg.name,
        "test_accuracy": ev.accuracy,
        "test_loss": ev.loss,
        "test_images": len(test),
        "per_class_accuracy": per_class,
        "best_trial": best.number,
        "best_trial_value": best.value,
        "metric": cfg.metric,
        "params": best.params,
        "seed": seed,
        "epochs": epochs,
        "train_images": len(train_all),
        "n_params": count_parameters(model),
        "history": [{"epoch": s.epoch, "train_loss": s.train_loss, "train_accuracy": s.train_accuracy}
                    for s in history],
        "wall_time_s": round(time.perf_counter() - started, 2),
        "train_time_s": round(train_seconds, 2),
        "device": placement.describe(),
        "versions": versions(),
        "git_revision": git_revision(),
    }
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "study": cfg.name,
        "trial": best.number,
        "params": best.params,
        "model_spec": ModelSpec.from_params(best.params).to_dict(),
        "test_accuracy": ev.accuracy,
        "hpo_version": hpo.__version__,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    truth_np, pred_np = truth.numpy(), ev.predictions.numpy()
    counts = plots.confusion_matrix(truth_np, pred_np, CLASSES)
    metrics["confusion_matrix"] = counts.tolist()
    files = {
        "model.pt": artifacts.torch_bytes(checkpoint),
        "metrics.json": json.dumps(metrics, indent=2).encode(),
        "confusion_matrix.png": plots.confusion_matrix_png(
            counts, CLASSES, f"{cfg.name}: final model on the test split, accuracy {ev.accuracy:.4f}"),
        "learning_curve.png": plots.learning_curve_png(best.user_attrs.get("history", []), metrics["history"],
                                                       ev.accuracy, best.number),
        "misclassified.png": plots.misclassified_png(test_images, truth_np, pred_np,
                                                     ev.confidence.numpy(), CLASSES),
    }
    for name, payload in files.items():
        write_atomic(out_dir / name, payload)
    summary = {k: metrics[k] for k in ("test_accuracy", "test_loss", "best_trial", "best_trial_value", "seed",
                                       "epochs", "wall_time_s")}
    summary["output_dir"] = str(out_dir.resolve())
    # Two final-trains at once each replace the other's artifacts in turn, never both at the same time.
    with SlotLock(storage, f"{cfg.name}.final") if storage is not None else contextlib.nullcontext():
        if artifact_store is not None:
            summary["artifacts"] = publish(study, artifact_store, files)
        study.set_user_attr(FINAL_ATTR, summary)
        # Sorts first in the dashboard's user-attribute table, so a final-trained study shows it at a glance.
        study.set_user_attr("final_test_accuracy", ev.accuracy)
        save_note(study, note(cfg, best, metrics))
    return metrics


def publish(study: optuna.Study, store, files: dict[str, bytes]) -> dict[str, str]:
    """Upload the final files to the study, replacing an earlier final-train's."""
    earlier = (study.user_attrs.get(FINAL_ATTR) or {}).get("artifacts", {})
    ids = {name: artifacts.upload_bytes(store, study, name, payload) for name, payload in files.items()}
    for artifact_id in earlier.values():
        artifacts.remove(store, study, artifact_id)
    return ids


def note(cfg: StudyConfig, best: optuna.trial.FrozenTrial, metrics: dict[str, Any]) -> str:
    """The study's dashboard note: the final result first, so a final-trained study is obvious."""
    val, test = metrics["best_trial_value"], metrics["test_accuracy"]
    params = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                       for k, v in best.params.items())
    worst = min(metrics["per_class_accuracy"].items(), key=lambda kv: kv[1])
    rows = [f"| validation {cfg.metric} of trial {best.number} | {val:.4f} |",
            f"| test accuracy of the final model | {test:.4f} |"]
    if cfg.metric == "val_accuracy":
        rows.append(f"| gap, test minus validation | {100 * (test - val):+.2f} points |")
    rows.append(f"| weakest class | {worst[0]} ({worst[1]:.4f}) |")
    table = "\n".join(rows)
    return f"""## Final-trained: test accuracy {100 * test:.2f} %

Trial {best.number}, the best of the search, retrained from scratch by `hpo final-train` for
{metrics['epochs']} epochs on all {metrics['train_images']:,} training images (seed {metrics['seed']}),
then scored once on the untouched {metrics['test_images']:,}-image test split.

| | |
|---|---|
{table}

Trials train on the study's `train_subset` for {cfg.budget.epochs} epochs; the final run trains longer on
more images, so its test accuracy can exceed the trial's validation score.

### Best params

| param | value |
|---|---|
{params}

Study artifacts: `confusion_matrix.png`, `learning_curve.png`, `misclassified.png`, `model.pt`,
`metrics.json`. Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, hpo {hpo.__version__},
code {metrics['git_revision'] or 'unknown'}.
"""
