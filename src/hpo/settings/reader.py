"""Reading one TOML table of a study file: typed keys, dataclass sections, unknown keys refused
with a "did you mean", and the TOML form of a value for messages and `hpo create --explain`."""

from __future__ import annotations

import dataclasses
import difflib
import json
from typing import Any

from hpo.errors import ConfigError


def not_known(key: str, value: str, options: list[str] | tuple[str, ...], verb: str = "is not known") -> str:
    return f"{key} {value!r} {verb}.{did_you_mean(value, options)} Use one of: {', '.join(options)}"


def did_you_mean(word: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


# A dataclass field's annotation (a string, under `from __future__ import annotations`) -> the TOML type.
_KINDS: dict[str, type] = {
    "int": int,
    "float": float,
    "bool": bool,
    "str": str,
    "int | None": int,
    "float | None": float,
    "str | None": str,
}


class Table:
    """Walks one table of the file, checking types and refusing keys nobody reads."""

    def __init__(self, raw: Any, where: str, source: str):
        self.source, self.where = source, where
        if not isinstance(raw, dict):
            self.fail(f"must be a table, got {type(raw).__name__}")
        self.raw = dict(raw)
        self.used: set[str] = set()

    def fail(self, message: str) -> None:
        where = f"[{self.where}] " if self.where else ""
        raise ConfigError(f"{self.source}: {where}{message}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.raw:
            if default is ...:
                self.fail(f"missing required key {key!r}")
            return default
        value = self.raw[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML ints are valid floats; bools are not numbers here.
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            self.fail(f"{key} must be {names}, got {type(value).__name__} {value!r}")
        return value

    def section(
        self, cls: Any, keys: dict[str, str] | None = None, defaults: dict[str, Any] | None = None, **given: Any
    ) -> Any:
        """The dataclass `cls` read from this table: every field under its name (or `keys[field]`), of
        its annotated type, with its default (or `defaults[field]`); `given` fields are the caller's.
        Any other key in the table is refused."""
        keys, defaults = keys or {}, defaults or {}
        values = dict(given)
        for spec_field in dataclasses.fields(cls):
            if spec_field.name in given:
                continue
            default = defaults.get(spec_field.name, spec_field.default)
            values[spec_field.name] = self.get(
                keys.get(spec_field.name, spec_field.name),
                _KINDS[str(spec_field.type)],
                ... if default is dataclasses.MISSING else default,
            )
        self.done()
        return cls(**values)

    def table(self, key: str) -> Table:
        self.used.add(key)
        where = f"{self.where}.{key}" if self.where else key
        return Table(self.raw.get(key, {}), where, self.source)

    def done(self, known: tuple[str, ...] | None = None) -> None:
        for key in self.raw:
            if key not in self.used:
                hint = did_you_mean(key, list(known or self.used))
                self.fail(f"unknown key {key!r}.{hint} Remove it or fix its spelling.")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")
