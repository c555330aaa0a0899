"""The base of every configuration model (frozen, unknown keys refused) and how its validation errors read.

A spec such as `RoiSpec` or `TilingSpec` comes in by three roads (a station configuration file, a
station state's state.yaml, command-line options); each road reports a bad value through `problem`,
so the same mistake reads the same everywhere: the key path, what is allowed and the value given.
This module owns only that wording; it knows no file and no option (the caller adds where it came from).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError


class FrozenSpec(BaseModel):
    """A configuration value: immutable (change one with model_copy(update=...)), unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def problem(error: dict) -> str:
    """What is wrong with one entry of ValidationError.errors(), naming the value given where it is one."""
    kind, message, given = error["type"], error["msg"], error.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "value_error":  # a model's own check: its message names the values
        return message.removeprefix("Value error, ")
    if kind == "string_pattern_mismatch":
        return f"{given!r} is not allowed here (must match {error.get('ctx', {}).get('pattern', '')})"
    if isinstance(given, dict):
        return message
    return f"{message}, got {given!r}"


def problems(err: ValidationError, key: str, options: dict[str, str] | None = None) -> str:
    """'<key>.<field>: <problem>' for each error of a spec validated as the value of `key`, joined by '; '.
    `options` names the command-line option that set a key ({"tiling.overlap": "--tile-overlap"}): then
    '--tile-overlap (tiling.overlap): <problem>'."""
    lines = []
    for e in err.errors():
        where = ".".join([key, *(str(p) for p in e["loc"])])
        if options and where in options:
            where = f"{options[where]} ({where})"
        lines.append(f"{where}: {problem(e)}")
    return "; ".join(lines)
