"""The training configuration: one frozen dataclass, validated at construction, with typed overrides."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from prsgd.algorithm import Hyperparameters, check_period, check_topology, sync_rule
from prsgd.topology import BUILT_IN

ENGINES = ("simulator", "distributed")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Epochs are *joint* epochs: examples read by all workers together
    divided by the training-set size (the paper's x-axis)."""

    engine: str = "simulator"
    dataset: str = "digits"
    model: str = "mlp"
    hidden: int = 64
    workers: int | None = None  # simulator: default 8; distributed: the world size
    batch_size: int = 16  # per worker
    epochs: float = 20.0  # joint epochs
    sync: str = "params_and_momentum"
    period: int = 8
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    topology: str = ""  # gossip rules only: ring, torus, complete, hypercube, exponential, one_peer_exponential
    evals: int = 20  # evaluations over the run (and one at step 0)
    seed: int = 0
    device: str = "cpu"
    out: str = ""  # folder for config.json and log.jsonl; empty: write nothing
    progress: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r} is not known; allowed: {', '.join(ENGINES)}")
        Hyperparameters(lr=self.lr, momentum=self.momentum, nesterov=self.nesterov, weight_decay=self.weight_decay)
        check_period(self.period)
        check_topology(sync_rule(self.sync), self.topology or None)
        if self.topology and self.topology not in BUILT_IN:
            raise ValueError(f"topology={self.topology!r} is not known; allowed: {', '.join(BUILT_IN)}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers={self.workers!r} is not allowed; it must be >= 1")
        for name in ("hidden", "batch_size", "evals"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; it must be >= 1")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"epochs={self.epochs!r} is not allowed; it must be a number > 0")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "int | None": int}


def _check_type(name: str, value: Any, annotation: str) -> None:
    if annotation == "int | None" and value is None:
        return
    expected = _TYPES[annotation]
    ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed; it must be of type {annotation}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`TrainConfig` field, typed as the field (``--nesterov/--no-nesterov`` for bools)."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=_TYPES[f.type], default=f.default, metavar=f.name.upper())


def from_arguments(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
