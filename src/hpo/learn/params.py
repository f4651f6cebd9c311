"""A trial's parameters as one typed object: the model's spec and the optimizer's settings.

Optuna stores a trial's parameters flat (`n_conv`, `filters_0`, ..., `lr`); `TrialParams.from_flat`
reads that form (a trial's `params`, a checkpoint, a warm-start table) and `flat()` writes it, so
this module is the only one that knows the names. The search space builds a TrialParams
(hpo.search.space); the model and the training loop take its two halves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hpo.learn.model import ModelSpec


@dataclass(frozen=True)
class OptimizerSettings:
    """How the weights are updated: the optimizer's half of a trial's parameters."""

    name: str  # adam | sgd | rmsprop
    lr: float  # peak learning rate
    batch_size: int  # images per step
    weight_decay: float  # decoupled for adam (AdamW), L2 for sgd and rmsprop


SHAPE_KEYS = ("residual", "pool")  # optional: a flat form without them is a plain, flattening CNN


@dataclass(frozen=True)
class TrialParams:
    model: ModelSpec
    optimizer: OptimizerSettings
    # How the flat form names them: widths as filters_0 and a growth factor (None: one filters_i per
    # block), and the learning rate as lr or, in a space with a range per optimizer, lr_adam etc.
    growth: float | None = None
    lr_key: str = "lr"
    shape_keys: tuple[str, ...] = ()  # which of SHAPE_KEYS the flat form holds (a space may leave them out)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> TrialParams:
        """Read Optuna's flat form; keys beyond the parameters are ignored."""
        name = str(flat["optimizer"])
        lr_key = f"lr_{name}" if f"lr_{name}" in flat else "lr"
        optimizer = OptimizerSettings(name, float(flat[lr_key]), int(flat["batch_size"]), float(flat["weight_decay"]))
        growth = float(flat["growth"]) if "growth" in flat else None
        return cls(model_spec(flat), optimizer, growth, lr_key, tuple(k for k in SHAPE_KEYS if k in flat))

    def flat(self) -> dict[str, Any]:
        """Optuna's flat form, in the order the search space samples it."""
        model, optimizer = self.model, self.optimizer
        widths = (
            {"filters_0": model.filters[0], "growth": self.growth}
            if self.growth is not None
            else {f"filters_{i}": f for i, f in enumerate(model.filters)}
        )
        shape = {key: getattr(model, key) for key in self.shape_keys}
        return {
            "n_conv": len(model.filters),
            **widths,
            "kernel_size": model.kernel_size,
            **shape,
            "n_fc": model.n_fc,
            "fc_size": model.fc_size,
            "dropout": model.dropout,
            "optimizer": optimizer.name,
            self.lr_key: optimizer.lr,
            "batch_size": optimizer.batch_size,
            "weight_decay": optimizer.weight_decay,
        }


def stage_widths(first: int, growth: float, n_conv: int) -> tuple[int, ...]:
    """Each block's width when it grows by `growth` per block from `first`: rounded to a multiple of 8
    (whole SIMD registers and tensor-core tiles) once the width is 8 or more."""
    widths = []
    for i in range(n_conv):
        width = first * growth**i
        widths.append(8 * max(1, round(width / 8)) if first >= 8 else max(1, round(width)))
    return tuple(widths)


def model_spec(flat: Mapping[str, Any]) -> ModelSpec:
    """The model's half of Optuna's flat form; the optimizer's keys may be absent."""
    n_conv = int(flat["n_conv"])
    if "growth" in flat:
        filters = stage_widths(int(flat["filters_0"]), float(flat["growth"]), n_conv)
    else:
        filters = tuple(int(flat[f"filters_{i}"]) for i in range(n_conv))
    return ModelSpec(
        filters=filters,
        kernel_size=int(flat["kernel_size"]),
        n_fc=int(flat["n_fc"]),
        fc_size=int(flat["fc_size"]),
        dropout=float(flat["dropout"]),
        residual=bool(flat.get("residual", False)),
        pool=str(flat.get("pool", "flatten")),
    )
