"""Checkpoint files: the final model's format (and the one before it), loading them safely, and
writing any result file atomically. No optuna, no dashboard: `hpo predict` needs only this."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

import hpo
from hpo.errors import HpoError

FINAL_FORMAT = "hpo-checkpoint/2"  # the final model: an ensemble of members and its TTA mode
TRIAL_FORMAT = "hpo-trial-checkpoint/1"  # a running trial's last epoch, which its retry resumes from
TRIAL_MODEL_FORMAT = "hpo-trial-model/1"  # a COMPLETE trial's trained weights, which the finalizer reuses


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


def load_final(path: Path, study: str | None = None) -> dict[str, Any]:
    """Load a final checkpoint (tensors and plain values only: weights_only=True), refusing one
    written by another study or by an incompatible version of hpo."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; none of them is usable
        raise HpoError(f"{path} is not a readable hpo checkpoint ({type(e).__name__}). Re-run final-train.") from e
    found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if found != FINAL_FORMAT:
        raise HpoError(
            f"{path} has checkpoint format {found!r}, but this hpo {hpo.__version__} reads "
            f"{FINAL_FORMAT!r}. Re-run final-train with this version."
        )
    if study is not None and checkpoint["study"] != study:
        raise HpoError(
            f"{path} belongs to study {checkpoint['study']!r}, not {study!r}. "
            "Pass the matching --study, or another --out."
        )
    return checkpoint
