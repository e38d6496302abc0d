"""The run config as command-line flags: one ``--flag`` per config leaf, typed and described (``prsgd train``), and
``KEY=VALUE`` assignments (``prsgd run --set``)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from prsgd.training.config import LEAVES, SECTIONS, ConfigError, RunConfig


def parse_assignments(items: list[str] | None) -> dict[str, str]:
    """``["algorithm.period=4", "lr=0.1"]`` -> ``{"algorithm.period": "4", "lr": "0.1"}``."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def add_flat_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per config leaf (``--period``, ``--sync``, ``--nesterov/--no-nesterov``, ...), its help the
    field's description, type, allowed values and default; a flag not given leaves the config's value."""
    groups = {
        "": parser.add_argument_group("run"),
        **{section: parser.add_argument_group(section) for section in SECTIONS},
    }
    for leaf, dotted in LEAVES.items():
        flag = "--" + leaf.replace("_", "-")
        section, _, name = dotted.rpartition(".")
        owner = SECTIONS[section] if section else RunConfig
        annotation = get_type_hints(owner)[name]
        meta = next(f for f in dataclasses.fields(owner) if f.name == name)
        help_text = f"{meta.metadata.get('doc', '')} ({_describe(annotation, meta)}) [{dotted}]".lstrip()
        help_text = help_text.replace("%", "%%")
        group = groups[section]
        if annotation is bool:
            group.add_argument(flag, dest=leaf, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, dest=leaf, default=None, metavar=name.upper(), help=help_text)


def _describe(annotation: Any, meta: dataclasses.Field) -> str:
    """'int or 'theory'; default: 8', 'str; one of: a, b; default: 'a'' for a field's --help."""
    if get_origin(annotation) is Union:
        literals = [v for member in get_args(annotation) if get_origin(member) is Literal for v in get_args(member)]
        plain = [m for m in get_args(annotation) if get_origin(m) is not Literal]
        kind = " or ".join([*(getattr(m, "__name__", str(m)) for m in plain), *map(repr, literals)])
    elif annotation == tuple[float, ...]:
        kind = "comma-separated numbers"
    else:
        kind = getattr(annotation, "__name__", str(annotation))
    parts = [kind]
    if meta.metadata.get("choices"):
        parts.append("one of: " + ", ".join(meta.metadata["choices"]))
    default = meta.default
    shown = ",".join(f"{v:g}" for v in default) if isinstance(default, tuple) else repr(default)
    parts.append(f"default: {shown if default not in ('', ()) else 'empty'}")
    return "; ".join(parts)


def from_flat_arguments(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    given = {leaf: getattr(args, leaf) for leaf in LEAVES if getattr(args, leaf) is not None}
    return (base or RunConfig()).with_overrides(given)
