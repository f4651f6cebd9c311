"""A trial's parameters as one typed object: the model's spec and the optimizer's settings.

Optuna stores a trial's parameters flat (`n_conv`, `filters_0`, ..., `lr`); `TrialParams.from_flat`
reads that form (a trial's `params`, a checkpoint, a warm-start table) and `flat()` writes it, so
this module is the only one that knows the names. The search space builds a TrialParams
(hpo.space); the model and the training loop take its two halves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hpo.model import ModelSpec


@dataclass(frozen=True)
class OptimizerSettings:
    """How the weights are updated: the optimizer's half of a trial's parameters."""

    name: str  # adam | sgd | rmsprop
    lr: float  # peak learning rate
    batch_size: int  # images per step
    weight_decay: float  # decoupled for adam (AdamW), L2 for sgd and rmsprop


@dataclass(frozen=True)
class TrialParams:
    model: ModelSpec
    optimizer: OptimizerSettings

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> TrialParams:
        """Read Optuna's flat form; keys beyond the parameters are ignored."""
        optimizer = OptimizerSettings(
            str(flat["optimizer"]), float(flat["lr"]), int(flat["batch_size"]), float(flat["weight_decay"])
        )
        return cls(model_spec(flat), optimizer)

    def flat(self) -> dict[str, Any]:
        """Optuna's flat form, in the order the search space samples it."""
        model, optimizer = self.model, self.optimizer
        return {
            "n_conv": len(model.filters),
            **{f"filters_{i}": f for i, f in enumerate(model.filters)},
            "kernel_size": model.kernel_size,
            "n_fc": model.n_fc,
            "fc_size": model.fc_size,
            "dropout": model.dropout,
            "optimizer": optimizer.name,
            "lr": optimizer.lr,
            "batch_size": optimizer.batch_size,
            "weight_decay": optimizer.weight_decay,
        }


def model_spec(flat: Mapping[str, Any]) -> ModelSpec:
    """The model's half of Optuna's flat form; the optimizer's keys may be absent."""
    return ModelSpec(
        filters=tuple(int(flat[f"filters_{i}"]) for i in range(int(flat["n_conv"]))),
        kernel_size=int(flat["kernel_size"]),
        n_fc=int(flat["n_fc"]),
        fc_size=int(flat["fc_size"]),
        dropout=float(flat["dropout"]),
    )
