"""The finalizer's members: their seeds, and the models the search trained already that join beside
their retrained copies (which trials join: hpo.search.join, the rule the time budget reads too)."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any

import optuna
import torch

from hpo import attrs
from hpo.learn import checkpoints
from hpo.learn.data import DeviceData
from hpo.learn.model import with_weights
from hpo.learn.params import TrialParams
from hpo.learn.seeds import derive_seed
from hpo.learn.train import EpochStats
from hpo.search import artifacts
from hpo.settings.config import StudyConfig

log = logging.getLogger(__name__)

FINAL_SEED_TAG = 0x46494E41  # "FINA": keeps the final run's seed apart from every trial's


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
    from hpo.search.objective import TRIAL_MODEL_FILE

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
