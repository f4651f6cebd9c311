"""The finalizer's join rule: which COMPLETE trials join the ensemble, chosen on their validation
outputs (never on test). The finalizer applies it (hpo.results.final), and the time budget sizes
its reserve by it while the search runs (hpo.search.worker), so that the search keeps time for the
members the finalizer will train and for no others."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import optuna
import torch

from hpo import attrs
from hpo.errors import HpoError
from hpo.learn.data import stratified_split
from hpo.search import artifacts
from hpo.search.trials import FINISHED, value
from hpo.settings.config import StudyConfig

log = logging.getLogger(__name__)

CANDIDATES = 10  # distinct COMPLETE trials, best first, that may join an ensemble


def choose_members(
    study: optuna.Study,
    cfg: StudyConfig,
    val_labels: torch.Tensor | None = None,
    store: Any = None,
    cache: dict[str, torch.Tensor] | None = None,
) -> tuple[list[optuna.trial.FrozenTrial], str]:
    """The members' trials, best first, and a line saying how they were chosen.

    The first is the best COMPLETE trial by validation value. With `[final] ensemble` above 1, the
    others are chosen greedily (Caruana et al. 2004, without replacement) among the next best
    distinct COMPLETE trials: the one whose validation outputs raise the averaged ensemble's
    validation accuracy most joins, until none raises it or the ensemble is full. A trial whose
    outputs are missing (a study run without an artifact store) cannot join. `cache` keeps the
    outputs read, by artifact, for a caller that asks again (they never change once written)."""
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
    outputs = {t.number: p for t in candidates if (p := val_outputs(store, t, val_labels, cache)) is not None}
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


def val_outputs(
    store: Any,
    trial: optuna.trial.FrozenTrial,
    labels: torch.Tensor | None,
    cache: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """A COMPLETE trial's validation probabilities (float32), if kept and of the same images."""
    pointer = trial.user_attrs.get(attrs.VAL_OUTPUTS)
    if store is None or not pointer or labels is None:
        return None
    if cache is not None and pointer in cache:
        return cache[pointer]
    try:
        saved = torch.load(io.BytesIO(artifacts.read_bytes(store, pointer)), map_location="cpu", weights_only=True)
    except Exception as e:  # a missing or damaged file: that trial cannot join
        log.warning("trial %d's validation outputs cannot be read (%s)", trial.number, e)
        return None
    probs = saved["probs"].float()
    if probs.shape[0] != len(labels):
        return None
    if cache is not None:
        cache[pointer] = probs
    return probs


def ensemble_accuracy(members: list[optuna.trial.FrozenTrial], labels: torch.Tensor, store: Any) -> float | None:
    """The members' averaged validation outputs scored on `labels`: what the join rule's ensemble
    scores on validation (None where a member's outputs are not kept)."""
    outputs = [val_outputs(store, t, labels) for t in members]
    if not outputs or any(o is None for o in outputs):
        return None
    return _accuracy(torch.stack([o for o in outputs if o is not None]).sum(0), labels)


def val_labels(pool_labels: Any, cfg: StudyConfig) -> torch.Tensor:
    """The labels of the trials' validation split of the data set's pool (`dataset.train.labels`), in
    the order the trials stored their validation outputs (hpo.learn.data.trial_data splits it so)."""
    _, val_idx = stratified_split(pool_labels, cfg.budget.val_fraction, cfg.seed)
    return torch.as_tensor(pool_labels[val_idx], dtype=torch.int64)


def members_now(
    study: optuna.Study, cfg: StudyConfig, val_labels: torch.Tensor, store: Any, cache: dict[str, torch.Tensor]
) -> list[optuna.trial.FrozenTrial] | None:
    """The members the finalizer would choose if the search ended now, best first (None while no
    trial is COMPLETE): what the time budget's reserve counts (hpo.search.budget.final_reserve)."""
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        return None
    return choose_members(study, cfg, val_labels, store, cache)[0]


class Reserved:
    """The members the time budget's reserve counts, asked before each trial and each epoch of a
    timed search: those the join rule keeps now (members_now), each trial's validation outputs
    read once. Logs when they change, so that a worker's log says what the search keeps time for."""

    def __init__(self, study: optuna.Study, cfg: StudyConfig, val_labels: torch.Tensor, store: Any):
        self.study, self.cfg, self.labels, self.store = study, cfg, val_labels.cpu(), store
        self.cache: dict[str, torch.Tensor] = {}
        self.numbers: list[int] | None = None

    def __call__(self) -> list[optuna.trial.FrozenTrial] | None:
        chosen = members_now(self.study, self.cfg, self.labels, self.store, self.cache)
        numbers = None if chosen is None else [t.number for t in chosen]
        if numbers is not None and numbers != self.numbers:
            log.info(
                "the finalizer's reserve counts trial(s) %s: the members its join rule keeps now",
                ", ".join(map(str, numbers)),
            )
        self.numbers = numbers
        return chosen
