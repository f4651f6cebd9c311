"""The search space: the one place that calls `trial.suggest_*`.

`suggest` turns a study's declared space into a TrialParams, sampled under the flat names Optuna
stores (`filters_0`, `filters_1`, ...), so a best trial's `params` rebuild the same model.
"""

from __future__ import annotations

import math
from typing import Any

import optuna

from hpo.learn.params import TrialParams
from hpo.settings.dimensions import ParamSpec


def _suggest(trial: optuna.Trial, name: str, spec: ParamSpec) -> Any:
    if spec.choices is not None:
        return trial.suggest_categorical(name, list(spec.choices))
    low, high = spec.span
    if spec.is_int:
        return trial.suggest_int(name, int(low), int(high), step=int(spec.step or 1), log=spec.log)
    return trial.suggest_float(name, low, high, step=spec.step, log=spec.log)


def suggest(trial: optuna.Trial, space: dict[str, ParamSpec]) -> TrialParams:
    params: dict[str, Any] = {"n_conv": _suggest(trial, "n_conv", space["n_conv"])}
    if "growth" in space:  # the first block's width and a factor per block: two dimensions, not n_conv
        params["filters_0"] = _suggest(trial, "filters_0", space["filters"])
        params["growth"] = _suggest(trial, "growth", space["growth"])
    else:  # one width per conv block; deeper blocks only exist (and are only sampled) when n_conv says so
        for i in range(params["n_conv"]):
            params[f"filters_{i}"] = _suggest(trial, f"filters_{i}", space["filters"])
    for name in ("kernel_size", "residual", "pool", "n_fc", "fc_size", "dropout", "optimizer"):
        if name in space:
            params[name] = _suggest(trial, name, space[name])
    # A range per optimizer is sampled under its own name, so TPE models each optimizer's apart.
    lr_name = "lr" if space["lr"].by_optimizer is None else f"lr_{params['optimizer']}"
    params[lr_name] = _suggest(trial, lr_name, space["lr"].for_optimizer(params["optimizer"]))
    for name in ("batch_size", "weight_decay"):
        params[name] = _suggest(trial, name, space[name])
    return TrialParams.from_flat(params)


def _middle(spec: ParamSpec) -> Any:
    if spec.choices is not None:
        return spec.choices[len(spec.choices) // 2]
    low, high = spec.span
    value = math.sqrt(low * high) if spec.log else (low + high) / 2
    return round(value) if spec.is_int else value


def first(space: dict[str, ParamSpec], warm: tuple[dict[str, Any], ...] = ()) -> TrialParams:
    """The study's first trial as far as it is known: its first warm-start point, completed with
    the middle of the space (the middle alone without a warm start)."""
    flat = middle(space).flat()
    if not warm:
        return TrialParams.from_flat(flat)
    flat.update(warm[0])
    if "growth" not in space:
        for i in range(int(flat["n_conv"])):
            flat.setdefault(f"filters_{i}", _middle(space["filters"]))
    if space["lr"].by_optimizer is not None:
        flat.setdefault(f"lr_{flat['optimizer']}", _middle(space["lr"].for_optimizer(flat["optimizer"])))
    return TrialParams.from_flat(flat)


def middle(space: dict[str, ParamSpec]) -> TrialParams:
    """The configuration in the middle of every range (geometric for log ranges): a typical trial,
    timed to estimate what trials cost before any has run."""
    params: dict[str, Any] = {"n_conv": _middle(space["n_conv"])}
    widths = 1 if "growth" in space else params["n_conv"]
    for i in range(widths):
        params[f"filters_{i}"] = _middle(space["filters"])
    params.update({name: _middle(space[name]) for name in space if name not in ("n_conv", "filters", "lr")})
    lr_name = "lr" if space["lr"].by_optimizer is None else f"lr_{params['optimizer']}"
    params[lr_name] = _middle(space["lr"].for_optimizer(params["optimizer"]))
    return TrialParams.from_flat(params)
