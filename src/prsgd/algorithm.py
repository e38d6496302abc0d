"""Algorithm 1 (PR-SGD-Momentum) and its baselines, written once for every engine.

An engine owns tensors and knows how to average them across workers; this module decides *what* happens in a
step and *when* workers communicate. One step of every worker is :func:`run_step`:

1. ``sync="gradients"`` only: average the gradients (parallel mini-batch momentum SGD);
2. the local momentum-SGD update (:func:`prsgd.functional.momentum_sgd_`, eq. 4 or 5);
3. after every ``period``-th step (I in the paper), the sync rule's averaging round (eq. 6).

The averaging itself is a callable ``average(tensors) -> bytes``: it replaces each tensor, in place, by its mean
over workers and returns the payload bytes one worker contributed. The simulator averages over the leading worker
dimension; :class:`prsgd.LocalSGD` does one ``all_reduce`` over flat storage.

Floating-point model buffers (BatchNorm running statistics) are averaged together with the parameters at every
sync; with ``sync="gradients"`` they are averaged at every step, in the gradients' collective, so that all workers
stay identical (DDP instead broadcasts rank 0's buffers before every forward; see :func:`run_step`). Integer
buffers (BatchNorm's ``num_batches_tracked``) are equal on all workers by construction and are not communicated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from prsgd.errors import InvalidArgument, check_bool, check_int, check_number
from prsgd.functional import momentum_sgd_

Average = Callable[[list[Tensor]], int]
"""Averages each tensor across workers in place; returns the bytes one worker sent (payload size)."""

Mix = Callable[[list[Tensor], int], int]
"""``mix(tensors, step)``: replaces each worker's tensors by sum_j W_ij x_j with the step's mixing matrix W
(eq. 18), in place; returns the bytes one worker sent (out-degree x payload)."""


@dataclass(frozen=True)
class SyncRule:
    """What a communication round averages, and how often rounds happen."""

    name: str
    description: str
    averages_gradients: bool = False  # every step, before the local update
    averages_params: bool = False  # every `period` steps, after the local update
    mixes: bool = False  # gossip with neighbours through W instead of averaging over all workers
    momentum_at_sync: str = "keep"  # "average" (or mix) | "clear" | "keep"


SYNC_RULES: dict[str, SyncRule] = {
    rule.name: rule
    for rule in (
        SyncRule(
            "params_and_momentum",
            "Algorithm 1: average parameters AND momentum buffers every `period` steps",
            averages_params=True,
            momentum_at_sync="average",
        ),
        SyncRule(
            "params_clear_momentum",
            "model averaging with cleared momentum (CNTK; Wang & Joshi 2018): average parameters, zero buffers",
            averages_params=True,
            momentum_at_sync="clear",
        ),
        SyncRule(
            "params_only",
            "average parameters, keep local buffers (PyTorch's PostLocalSGDOptimizer)",
            averages_params=True,
            momentum_at_sync="keep",
        ),
        SyncRule(
            "gradients",
            "parallel mini-batch momentum SGD: all-reduce gradients every step (ignores `period`)",
            averages_gradients=True,
        ),
        SyncRule(
            "gossip",
            "Algorithm 2: mix parameters AND momentum buffers with neighbours through W (every `period` steps)",
            mixes=True,
            momentum_at_sync="average",
        ),
        SyncRule(
            "gossip_params_only",
            "mix parameters with neighbours through W, keep local momentum buffers",
            mixes=True,
            momentum_at_sync="keep",
        ),
        SyncRule("none", "independent workers, no communication"),
    )
}


def sync_rule(name: str) -> SyncRule:
    """The :class:`SyncRule` called ``name``; ``ValueError`` naming the allowed ones otherwise."""
    if not isinstance(name, str) or name not in SYNC_RULES:
        raise InvalidArgument(f"sync={name!r} is not a known sync rule; allowed: {', '.join(SYNC_RULES)}")
    return SYNC_RULES[name]


@dataclass(frozen=True)
class Hyperparameters:
    """Local update settings: lr (gamma), momentum (beta), nesterov (option II), weight_decay."""

    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_number("lr", self.lr)
        if not self.lr > 0:
            raise InvalidArgument(f"lr={self.lr!r} is not allowed; the learning rate must be > 0")
        check_number("momentum", self.momentum)
        if not 0 <= self.momentum < 1:
            raise InvalidArgument(f"momentum={self.momentum!r} is not allowed; it must be in [0, 1)")
        check_bool("nesterov", self.nesterov)
        if self.nesterov and self.momentum == 0:
            raise InvalidArgument("nesterov=True needs momentum > 0 (got momentum=0), as in torch.optim.SGD")
        check_number("weight_decay", self.weight_decay)
        if not self.weight_decay >= 0:
            raise InvalidArgument(f"weight_decay={self.weight_decay!r} is not allowed; it must be >= 0")

    def as_kwargs(self) -> dict[str, float | bool]:
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
        }


def check_period(period: int) -> int:
    """``period`` (I, eq. 6) must be an integer >= 1."""
    return check_int("period", period, 1)


@dataclass
class CommStats:
    """Communication so far, per worker: ``rounds`` (collectives) and ``bytes`` (payload sent)."""

    rounds: int = 0
    bytes: int = 0

    def record(self, nbytes: int) -> None:
        """Count one round that sent ``nbytes``; a round that sent nothing (a single worker) is not counted."""
        if nbytes > 0:
            self.rounds += 1
            self.bytes += nbytes


@dataclass
class UpdateGroup:
    """Tensors that share one set of hyperparameters (one ``param_group`` of a torch optimizer)."""

    params: list[Tensor]
    grads: list[Tensor]
    momentum_buffers: list[Tensor]
    hyper: Hyperparameters


@dataclass
class SyncTensors:
    """Everything a sync round may average, per worker: all parameters (with or without a gradient this step),
    floating-point model buffers, and momentum buffers (empty when momentum is 0)."""

    params: list[Tensor]
    model_buffers: list[Tensor]
    momentum_buffers: list[Tensor]


def is_sync_step(rule: SyncRule, steps_done: int, period: int) -> bool:
    """Whether the round of eq. (6) or (18) follows local step number ``steps_done`` (counted from 1)."""
    return (rule.averages_params or rule.mixes) and steps_done % period == 0


def in_consensus(
    rule: SyncRule, steps_done: int, period: int, has_momentum: bool, synchronized_at: int | None = None
) -> bool:
    """Whether every worker holds the same parameters, float model buffers and momentum after ``steps_done``
    steps: all start equal; afterwards only right after a round that averages all of them (a scheduled one, or
    ``synchronize()`` after step ``synchronized_at``), or always with ``sync="gradients"`` (gradients and
    buffers are averaged every step). A checkpoint taken then may be resumed with a different number of workers."""
    if steps_done == 0 or rule.averages_gradients:
        return True
    full_round = rule.momentum_at_sync != "keep" or not has_momentum
    if synchronized_at == steps_done:
        return full_round
    if not rule.averages_params or steps_done % period:
        return False
    return full_round


def check_topology(rule: SyncRule, topology: object) -> None:
    """Gossip rules need a topology; the others take none."""
    if rule.mixes and topology is None:
        raise InvalidArgument(f"sync={rule.name!r} needs topology= (a name such as 'ring', a mixing matrix or a graph)")
    if not rule.mixes and topology is not None:
        raise InvalidArgument(
            f"topology={topology!r} is only used by sync='gossip' or 'gossip_params_only', not sync={rule.name!r}"
        )


def synchronize(rule: SyncRule, tensors: SyncTensors, average: Average, comm: CommStats) -> None:
    """One round of ``rule`` (eq. 6 for ``params_and_momentum``, eq. 18 for ``gossip``), as one ``average``
    call (for gossip rules, ``average`` is the step's mixing).

    The engines' ``synchronize()`` (one round now, outside the schedule: before evaluation, export or the end of
    training) calls it with the exact average over all workers, gossip rules included (the point is one common
    model); momentum is then averaged, cleared or kept as the rule's own rounds do (``params_only``,
    ``gossip_params_only``, ``gradients`` and ``none`` keep each worker's; with ``gradients`` they are equal).

    The tensors are passed in the order params, model buffers, momentum so that an engine keeping them in one
    flat storage in that order reduces one contiguous span.
    """
    if rule.momentum_at_sync == "average":
        comm.record(average([*tensors.params, *tensors.model_buffers, *tensors.momentum_buffers]))
        return
    comm.record(average([*tensors.params, *tensors.model_buffers]))
    if rule.momentum_at_sync == "clear" and tensors.momentum_buffers:
        torch._foreach_zero_(tensors.momentum_buffers)


def run_step(
    rule: SyncRule,
    period: int,
    steps_done: int,
    groups: Sequence[UpdateGroup],
    sync_tensors: SyncTensors,
    average: Average,
    comm: CommStats,
    *,
    mix: Mix | None = None,
    found_inf: bool | None = None,
) -> tuple[int, bool]:
    """One step of every worker. Returns ``(steps_done + 1, whether the local update was applied)``.

    ``groups`` hold the tensors updated this step (those with a gradient); ``sync_tensors`` all that a round
    averages (or, for gossip rules, mixes with ``mix``). ``found_inf`` comes from AMP's GradScaler (None without
    one). A step whose update is skipped for it still counts towards the period, so every worker agrees on when
    the next round happens (the failure of PyTorch issue 76282 is a worker that does not). With
    ``sync="gradients"`` the skip is decided on the averaged gradients, which are identical on every worker.

    With ``sync="gradients"`` the float model buffers (updated by this step's forward) are averaged in the same
    collective as the gradients, listed first (an engine keeping buffers and then gradients back to back in one
    flat storage reduces one contiguous span): every worker then holds identical parameters, buffers and momentum.
    """
    apply_update = not found_inf
    if rule.averages_gradients:
        grads = [g for group in groups for g in group.grads]
        comm.record(average([*sync_tensors.model_buffers, *grads]))
        if found_inf is not None:
            apply_update = all(bool(g.isfinite().all()) for g in grads)
    if apply_update:
        for group in groups:
            momentum_sgd_(group.params, group.grads, group.momentum_buffers, **group.hyper.as_kwargs())
    steps_done += 1
    if is_sync_step(rule, steps_done, period):
        combine = partial(mix, step=steps_done - 1) if rule.mixes else average
        synchronize(rule, sync_tensors, combine, comm)
    return steps_done, apply_update
