"""The one read of the test split: the ensemble's figures (the headline, with its Wilson interval),
each member's own, and the per-class accuracy; fp32, the precision of `hpo export`'s files."""

from __future__ import annotations

from typing import Any

import torch

from hpo.learn.data import DeviceData
from hpo.learn.model import Ensemble, count_parameters
from hpo.learn.train import evaluate
from hpo.results.members import Member
from hpo.results.stats import wilson_interval
from hpo.settings.config import StudyConfig


def accuracy_figures(predictions: torch.Tensor, truth: torch.Tensor) -> dict[str, Any]:
    correct = int((predictions == truth).sum())
    low, high = wilson_interval(correct, len(truth))
    return {
        "accuracy": correct / max(1, len(truth)),
        "correct": correct,
        "images": len(truth),
        "ci95": [round(low, 5), round(high, 5)],
    }


def score(
    cfg: StudyConfig, members: list[Member], test: DeviceData, classes: tuple[str, ...]
) -> tuple[dict[str, Any], Any]:
    """The ensemble's test figures (the headline), each member's own, and the per-class accuracy.

    fp32, the precision of `hpo export`'s files: the figure reported is the figure an export gets."""
    ev = evaluate(
        Ensemble([member.model for member in members], cfg.final.tta), test, cfg.train.eval_batch_size, fast=False
    )
    truth = test.y.cpu()
    member_rows = [_member_row(cfg, member, test, truth) for member in members]
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


def _member_row(cfg: StudyConfig, member: Member, test: DeviceData, truth: torch.Tensor) -> dict[str, Any]:
    """One member's own test figures (alone, with the same TTA), and what it is."""
    ev = evaluate(Ensemble([member.model], cfg.final.tta), test, cfg.train.eval_batch_size, fast=False)
    alone = accuracy_figures(ev.predictions, truth)
    return {
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
