"""Numbers from HPO_* environment variables: the default when unset, one line naming the variable when wrong."""

from __future__ import annotations

import math
import os

from hpo.errors import ConfigError


def env_int(name: str, default: int, least: int, unit: str = "") -> int:
    """An integer from environment variable `name` (unset or empty: `default`), or a ConfigError
    naming the variable, what it holds and what it must be."""
    return int(_env_number(name, default, least, unit, integer=True))


def env_float(name: str, default: float, least: float, unit: str = "") -> float:
    return _env_number(name, default, least, unit, integer=False)


def _env_number(name: str, default: float, least: float, unit: str, integer: bool) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
        ok = math.isfinite(value) and value >= least
    except ValueError:
        ok = False
    if not ok:
        what = "an integer" if integer else "a number"
        raise ConfigError(
            f"{name}={raw!r} is not {what} of at least {least:g}{' ' + unit if unit else ''}. "
            f"Fix it, or unset it for the default ({default:g})."
        )
    return value
