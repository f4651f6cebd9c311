"""The [space] section: each search dimension as a ParamSpec (a range, a choice list, a fixed value,
or for lr one range per optimizer), read and checked, and whether a configuration lies in it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hpo.settings.reader import Table, did_you_mean

# The parameters DynamicCNN and the training recipe understand, in the order they are suggested.
SPACE_KEYS = (
    "n_conv",  # conv blocks, each halves the image: 28 -> 14 -> 7 -> 3 -> 1, so at most 4
    "filters",  # output channels, suggested once per conv block
    "kernel_size",  # odd, pixels
    "n_fc",  # hidden fully connected layers before the classifier
    "fc_size",  # units per hidden FC layer
    "dropout",  # probability, after every hidden FC layer
    "optimizer",  # adam | sgd | rmsprop
    "lr",  # peak learning rate
    "batch_size",  # images per step
    "weight_decay",  # L2 coefficient
)


# Optional: a space without them has plain conv blocks, one width per block and a flattening head.
OPTIONAL_SPACE_KEYS = (
    "growth",  # width factor per block: filters sets the first block's width, each next one is growth times wider
    "residual",  # true: each conv block is a residual basic block (two convs and a shortcut)
    "pool",  # flatten | avg: the head flattens the last feature map or averages it over its pixels
)


POOLS = ("flatten", "avg")


OPTIMIZERS = ("adam", "sgd", "rmsprop")


@dataclass(frozen=True)
class ParamSpec:
    """One search dimension: a numeric range, a list of choices, or a fixed value."""

    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] | None = None
    # lr only: one range per optimizer, sampled under its own name (lr_adam, lr_sgd, lr_rmsprop)
    by_optimizer: tuple[tuple[str, ParamSpec], ...] | None = None

    def for_optimizer(self, optimizer: str) -> ParamSpec:
        """The range that applies with `optimizer`: its own, or the shared one."""
        if self.by_optimizer is None:
            return self
        return dict(self.by_optimizer)[optimizer]

    @property
    def span(self) -> tuple[float, float]:
        """low and high of a range (not of a choice list)."""
        if self.low is None or self.high is None:
            raise ValueError(f"{self.name} is a choice list, not a range")
        return self.low, self.high

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)


def spec_to_raw(spec: ParamSpec) -> Any:
    if spec.by_optimizer is not None:
        return {name: spec_to_raw(sub) for name, sub in spec.by_optimizer}
    if spec.choices is not None:
        return {"choices": list(spec.choices)}
    if spec.low == spec.high and not spec.log and spec.step is None:
        return spec.low
    raw: dict[str, Any] = {"low": spec.low, "high": spec.high}
    if spec.log:
        raw["log"] = True
    if spec.step is not None:
        raw["step"] = spec.step
    return raw


def read_space(table: Table, side: int = 28) -> dict[str, ParamSpec]:
    """The [space] table; `side`: the images' side in pixels, which bounds n_conv (each block halves it)."""
    space: dict[str, ParamSpec] = {}
    known = SPACE_KEYS + OPTIONAL_SPACE_KEYS
    for key in table.raw:
        if key not in known:
            table.fail(f"unknown parameter {key!r}.{did_you_mean(key, known)} Parameters: {', '.join(known)}")
    for key in known:
        if key not in table.raw:
            if key in OPTIONAL_SPACE_KEYS:
                continue
            table.fail(f"missing parameter {key!r}; give a range, a choice list or a fixed value")
        raw = table.raw[key]
        if key == "lr" and isinstance(raw, dict) and raw and set(raw) <= set(OPTIMIZERS):
            space[key] = _per_optimizer(raw, table)
        else:
            space[key] = _param(key, raw, table)
    _check_domain(space, table)
    deepest = max(_values(space["n_conv"]))
    if isinstance(deepest, int) and side >> deepest < 1:
        table.fail(f"n_conv {deepest} halves a {side}px image {deepest} times, below 1px. Lower n_conv")
    return space


def _per_optimizer(raw: dict[str, Any], table: Table) -> ParamSpec:
    """lr = { adam = { low = ..., high = ... }, sgd = ... }: each optimizer's own range."""
    subs = tuple((name, _param(f"lr_{name}", raw[name], table)) for name in OPTIMIZERS if name in raw)
    return ParamSpec("lr", by_optimizer=subs)


def _param(key: str, raw: Any, table: Table) -> ParamSpec:
    where = f"{key}"
    if isinstance(raw, bool):
        return ParamSpec(key, choices=(raw,))
    if isinstance(raw, (int, float, str)):
        return ParamSpec(key, choices=(raw,)) if isinstance(raw, str) else ParamSpec(key, low=raw, high=raw)
    if not isinstance(raw, dict):
        table.fail(
            f"{where} must be a table like {{ low = 1, high = 4 }}, {{ choices = [...] }} or a value, got {raw!r}"
        )
    extra = set(raw) - {"low", "high", "log", "step", "choices"}
    if extra:
        bad = sorted(extra)[0]
        table.fail(f"{where} has unknown key {bad!r}.{did_you_mean(bad, ['low', 'high', 'log', 'step', 'choices'])}")
    if "choices" in raw:
        choices = raw["choices"]
        if set(raw) != {"choices"}:
            table.fail(f"{where}: use either choices or low/high, not both")
        if not isinstance(choices, list) or not choices:
            table.fail(f"{where}: choices must be a non-empty list, got {choices!r}")
        if len({type(c) for c in choices}) != 1:
            table.fail(f"{where}: choices must all have one type, got {choices!r}")
        return ParamSpec(key, choices=tuple(choices))
    for bound in ("low", "high"):
        if bound not in raw:
            table.fail(f"{where} needs both low and high (or choices)")
        if isinstance(raw[bound], bool) or not isinstance(raw[bound], (int, float)):
            table.fail(f"{where}.{bound} must be a number, got {raw[bound]!r}")
    low, high = raw["low"], raw["high"]
    log, step = raw.get("log", False), raw.get("step")
    if not isinstance(log, bool):
        table.fail(f"{where}.log must be true or false, got {log!r}")
    if isinstance(low, int) != isinstance(high, int):
        low, high = float(low), float(high)
    if low > high:
        table.fail(f"{where}: low ({low}) is greater than high ({high}). Swap them.")
    if log and low <= 0:
        table.fail(f"{where}: a log range must be above 0, got low = {low}. Use a small positive low such as 1e-6.")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
            table.fail(f"{where}.step must be a positive number, got {step!r}")
        if log:
            table.fail(f"{where}: step and log cannot be combined")
    return ParamSpec(key, low=low, high=high, log=log, step=step)


def _values(spec: ParamSpec) -> list[Any]:
    """The extremes a parameter can take, for range checks."""
    if spec.by_optimizer is not None:
        return [value for _, sub in spec.by_optimizer for value in _values(sub)]
    return list(spec.choices) if spec.choices is not None else [spec.low, spec.high]


def _check_domain(space: dict[str, ParamSpec], table: Table) -> None:
    def need(key: str, ok: Any, what: str) -> None:
        if key not in space:
            return
        bad = [value for value in _values(space[key]) if not ok(value)]
        if bad:
            table.fail(f"{key} must be {what}, got {bad[0]!r}")

    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    need("n_conv", lambda value: integer(value) and 1 <= value <= 4, "an integer from 1 to 4 (each block halves 28x28)")
    need("filters", lambda value: integer(value) and 1 <= value <= 1024, "an integer from 1 to 1024")
    need("kernel_size", lambda value: integer(value) and value in (1, 3, 5, 7), "1, 3, 5 or 7")
    need("n_fc", lambda value: integer(value) and 0 <= value <= 4, "an integer from 0 to 4")
    need("fc_size", lambda value: integer(value) and 1 <= value <= 8192, "an integer from 1 to 8192")
    need("dropout", lambda value: isinstance(value, (int, float)) and 0 <= value < 1, "a probability in [0, 1)")
    need("optimizer", lambda value: value in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}")
    need(
        "lr",
        lambda value: isinstance(value, (int, float)) and 0 < value < 10 and math.isfinite(value),
        "a positive learning rate",
    )
    need("batch_size", lambda value: integer(value) and 1 <= value <= 65536, "a positive integer")
    need("weight_decay", lambda value: isinstance(value, (int, float)) and 0 <= value < 1, "in [0, 1)")
    need("growth", lambda value: isinstance(value, (int, float)) and 1 <= value <= 4, "a width factor from 1 to 4")
    need("residual", lambda value: isinstance(value, bool), "true or false")
    need("pool", lambda value: value in POOLS, f"one of {', '.join(POOLS)}")
    per = space["lr"].by_optimizer
    if per is not None:
        missing = [name for name in _values(space["optimizer"]) if name not in dict(per)]
        if missing:
            table.fail(
                f"lr gives a range per optimizer but none for {', '.join(missing)}: add "
                f"{missing[0]} = {{ low = ..., high = ..., log = true }} to lr, or drop it from optimizer"
            )


def _holds(spec: ParamSpec, value: Any) -> bool:
    if spec.choices is not None:
        return value in spec.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if spec.is_int and not float(value).is_integer():
        return False
    low, high = spec.span
    return low <= value <= high


def space_problems(space: dict[str, ParamSpec], params: dict[str, Any]) -> list[str]:
    """Why `params` is not a configuration of `space`, one phrase per parameter (empty: it is).
    Parameters left out are sampled as usual; `filters_i` follow `filters` up to n_conv."""
    problems = []
    n_conv = params.get(
        "n_conv", space["n_conv"].span[1] if space["n_conv"].choices is None else max(space["n_conv"].choices)
    )
    per = dict(space["lr"].by_optimizer or ())
    for key, value in params.items():
        name = "filters" if key.startswith("filters_") and key[8:].isdigit() else key
        if key.startswith("lr_") and key[3:] in per:
            name, spec = "lr", per[key[3:]]
        else:
            spec = space.get(name, ParamSpec(name))
        widths = n_conv if "growth" not in space else 1  # growth derives every width after the first
        if per and key == "lr":
            own = f"lr_{params.get('optimizer', 'adam')}"
            problems.append(f"lr: this space gives each optimizer its own range; name it {own}")
        elif name == "lr" and key != "lr" and params.get("optimizer", key[3:]) != key[3:]:
            problems.append(f"{key} is the range of {key[3:]}, but optimizer = {params['optimizer']!r}")
        elif name not in space or name == "filters" and int(key[8:]) >= widths:
            problems.append(f"{key} is not a parameter of this space")
        elif not _holds(spec, value):
            allowed = (
                f"one of {list(spec.choices)}"
                if spec.choices is not None
                else f"{spec.low}"
                if spec.low == spec.high
                else f"from {spec.low} to {spec.high}"
            )
            problems.append(f"{key} = {value!r}, but the space allows {allowed}")
    return problems
