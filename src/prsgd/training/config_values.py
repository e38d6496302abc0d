"""Typed config values: a field with its ``--help`` line, the error that names a bad key, and the conversion of a
value (from TOML or from a ``--flag`` string) to its field's type, checked."""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any, Literal, Union, get_args, get_origin

from prsgd.errors import InvalidArgument


def option(default: Any, doc: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with the one-line description (and allowed values) ``--help`` shows."""
    return field(default=default, metadata={"doc": doc, "choices": choices})


Theory = Literal["theory"]
"""A value the run resolves from the paper's corollaries once N and T are known (:mod:`prsgd.algorithm.theory`)."""


class ConfigError(InvalidArgument):
    """A bad configuration value; the message names the key."""


def check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}={value!r} is not allowed; it must be a finite number > 0")


def check_at_least(name: str, value: float, low: float) -> None:
    if not value >= low:
        raise ConfigError(f"{name}={value!r} is not allowed; it must be >= {low}")


def convert(key: str, value: Any, annotation: Any) -> Any:
    """``value`` checked (or, from a string, parsed) against the field type ``annotation``: bool, int, float,
    str, a tuple of floats, or a union of one of them with literals (``int | Literal["theory"]``)."""
    if get_origin(annotation) is Union:
        literals = [v for member in get_args(annotation) if get_origin(member) is Literal for v in get_args(member)]
        if value in literals:
            return value
        (plain,) = [member for member in get_args(annotation) if get_origin(member) is not Literal]
        try:
            return convert(key, value, plain)
        except ConfigError:
            allowed = " or ".join([plain.__name__, *map(repr, literals)])
            raise ConfigError(f"{key}={value!r} is not allowed; it must be of type {allowed}") from None
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif annotation in (int, float):
        numeric = isinstance(value, int if annotation is int else int | float) and not isinstance(value, bool)
        try:
            converted = annotation(value) if isinstance(value, str) or numeric else None
        except (ValueError, OverflowError):
            converted = None
        if converted is not None and (annotation is float or -(2**63) <= converted < 2**63):
            return converted
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation == tuple[float, ...]:
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if isinstance(items, list | tuple):
            return tuple(convert(key, v, float) for v in items)
    type_name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{key}={value!r} is not allowed; it must be of type {type_name}")
