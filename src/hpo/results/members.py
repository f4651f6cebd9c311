"""The finalizer's members: which trials join the ensemble (chosen on validation, never on test),
their seeds, and the models the search trained already that join beside their retrained copies."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import optuna
import torch

from hpo import attrs
from hpo.errors import HpoError
from hpo.learn import checkpoints
from hpo.learn.data import DeviceData
from hpo.learn.model import with_weights
from hpo.learn.params import TrialParams
from hpo.learn.seeds import derive_seed
from hpo.learn.train import EpochStats
from hpo.search import artifacts
from hpo.search.trials import FINISHED, value
from hpo.settings.config import StudyConfig

log = logging.getLogger(__name__)

FINAL_SEED_TAG = 0x46494E41  # "FINA": keeps the final run's seed apart from every trial's

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
    ranked = sorted(complete, key=value, reverse=cfg.direction == "maximize")
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
    members, scores = _greedy(candidates, outputs, val_labels, k)
    path = " -> ".join(f"{100 * a:.2f}" for a in scores)
    why = (
        f"{len(members)} of up to {k} member(s), trials {', '.join(str(t.number) for t in members)}: each raised "
        f"the ensemble's validation accuracy ({path} %)"
    )
    if len(members) < k:
        why += f"; no other of the {len(candidates)} best distinct trials raised it further"
    return members, why + lead


def _greedy(
    candidates: list[optuna.trial.FrozenTrial], outputs: dict[int, torch.Tensor], val_labels: torch.Tensor, k: int
) -> tuple[list[optuna.trial.FrozenTrial], list[float]]:
    """Caruana's greedy selection from the first candidate: the one whose outputs raise the averaged
    ensemble's validation accuracy most joins, until none raises it or `k` have joined. Returns
    the members and the ensemble's accuracy after each joined."""
    members, total = [candidates[0]], outputs[candidates[0].number].clone()
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
    return members, scores


def warm_start_lead(study: optuna.Study, best: optuna.trial.FrozenTrial) -> str:
    """ "; trial 0 is the study file's warm start ...": said when the lead member is a configuration the
    user wrote rather than one the search found, with how many of the search's own trials it beat,
    so that a short search which found nothing better says so instead of looking like a result."""
    origin = best.user_attrs.get(attrs.WARM_START)
    if origin is None:
        return ""
    searched = [t for t in study.get_trials(deepcopy=False, states=FINISHED) if attrs.WARM_START not in t.user_attrs]
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
