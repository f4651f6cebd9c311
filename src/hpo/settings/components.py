"""The [sampler] and [pruner] sections: an Optuna class by name and its options, each checked against
the class's real constructor before anything is stored."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

from hpo.settings.reader import Table, did_you_mean, not_known, toml_value

SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "qmc": "QMCSampler"}


PRUNERS = {
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "none": "NopPruner",
}


@dataclass(frozen=True)
class Component:
    """A sampler or pruner: an Optuna class name key and its keyword arguments."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


# What a study file may give each sampler or pruner option: (kind, least, most, also allowed).
# Optuna checks some of these only when a trial is pruned, and some never; a study whose settings
# cannot build would stop every command that loads it, so they are checked before anything is stored.
_OPTION_RULES: dict[str, tuple[str, float | None, float | None, tuple[Any, ...]]] = {
    "n_startup_trials": ("int", 0, None, ()),
    "n_warmup_steps": ("int", 0, None, ()),
    "interval_steps": ("int", 1, None, ()),
    "n_min_trials": ("int", 1, None, ()),
    "percentile": ("float", 0.0, 100.0, ()),
    "min_resource": ("int", 1, None, ("auto",)),
    "max_resource": ("int", 1, None, ("auto",)),
    "reduction_factor": ("int", 2, None, ()),
    "min_early_stopping_rate": ("int", 0, None, ()),
    "bootstrap_count": ("int", 0, None, ()),
    "n_ei_candidates": ("int", 1, None, ()),
    "prior_weight": ("float", 1e-12, None, ()),
    "qmc_type": ("str", None, None, ("sobol", "halton")),
}


_BOOL_OPTIONS = (
    "multivariate",
    "constant_liar",
    "group",
    "consider_prior",
    "consider_magic_clip",
    "consider_endpoints",
    "scramble",
    "warn_independent_sampling",
    "warn_asynchronous_seeding",
)


def _allowed(rule: tuple[str, float | None, float | None, tuple[Any, ...]]) -> str:
    kind, least, most, also = rule
    if kind == "str":
        return "one of " + ", ".join(repr(v) for v in also)
    what = "an integer" if kind == "int" else "a number"
    if least is not None and most is not None:
        what += f" from {least:g} to {most:g}"
    elif least is not None:
        what += " above 0" if kind == "float" and 0 < least < 1e-6 else f" of at least {least:g}"
    return what + "".join(f" or {v!r}" for v in also)


def _option_problem(key: str, value: Any) -> str | None:
    """Why `value` is not a valid value of option `key`, as the allowed range; None if it is."""
    if key in _BOOL_OPTIONS:
        return None if isinstance(value, bool) else "true or false"
    rule = _OPTION_RULES.get(key)
    if rule is None:
        return None
    kind, least, most, also = rule
    if kind == "str" or (isinstance(value, str) and value in also):
        return None if value in also else _allowed(rule)
    if isinstance(value, bool) or not isinstance(value, int if kind == "int" else (int, float)):
        return _allowed(rule)
    in_range = math.isfinite(value) and (least is None or value >= least) and (most is None or value <= most)
    return None if in_range else _allowed(rule)


def read_component(
    table: Table, known: dict[str, str], default: str, module: str, check_options: bool = True
) -> Component:
    """A [sampler] or [pruner] table. `check_options=False` (settings already stored in a study) keeps
    the options as they are, so a study that no longer builds can still be listed, shown and deleted."""
    name = table.get("name", str, default)
    if name not in known:
        table.fail(not_known("name", name, list(known)))
    options = {k: value for k, value in table.raw.items() if k != "name"}
    if check_options:
        _check_options(table, known[name], module, options)
    if name == "tpe":
        # Parallel workers need constant_liar or they pile onto the same promising point; multivariate
        # TPE models the parameters jointly. Both are right for this service's parallel workers.
        options = {"multivariate": True, "constant_liar": True, **options}
    return Component(name=name, options=options)


def _check_options(table: Table, class_name: str, module: str, options: dict[str, Any]) -> None:
    """Each option is a keyword of the class, of an allowed value, and the class builds with them."""
    import importlib
    import warnings

    cls = getattr(importlib.import_module(module), class_name)
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "seed")]
    for key, value in options.items():
        if key not in accepted:
            table.fail(
                f"{class_name} has no option {key!r}.{did_you_mean(key, accepted)} Options: {', '.join(accepted)}"
            )
        if isinstance(value, (dict, list)):
            table.fail(f"{key} = {value!r}: {class_name}'s {key} cannot be given in a study file. Remove it.")
        problem = _option_problem(key, value)
        if problem is not None:
            table.fail(f"{key} = {toml_value(value)} is out of range: {class_name} needs {problem}. Fix the value.")
    required = [
        name
        for name, p in inspect.signature(cls).parameters.items()
        if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD and name != "self"
    ]
    missing = [name for name in required if name not in options]
    if missing:
        table.fail(f"{class_name} needs {', '.join(missing)}: add it, e.g. {missing[0]} = ... under [{table.where}].")
    base = {name: options[name] for name in required}  # PercentilePruner cannot build without its percentile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices: the option still works
        for key, value in options.items():  # one at a time first, so the message names the option
            try:
                cls(**{**base, key: value})
            except Exception as e:  # Optuna raises ValueError or TypeError, or others
                table.fail(f"{key} = {toml_value(value)} is refused by {class_name}: {e}. Fix the value.")
        try:
            cls(**options)
        except Exception as e:
            given = ", ".join(f"{k} = {toml_value(v)}" for k, v in options.items())
            table.fail(f"{class_name} refuses these options together ({given}): {e}. Fix one of them.")
