"""The local rule: what each worker does between rounds, and the optimizer state it keeps, by name.

A local rule names the state tensors it keeps per parameter (:attr:`MomentumSGD.state_names`: momentum SGD keeps
``momentum_buffer`` when momentum > 0, none without); the engines allocate one tensor per name and parameter, the
sync rules average, clear or keep all of them (:attr:`prsgd.algorithm.rules.SyncRule.state`), and checkpoints carry
them under those names. The update itself is a stateless function (:mod:`prsgd.algorithm.functional`) over the
tensors of one :class:`UpdateGroup`, so it works on one worker's tensors and on stacked ``(N, ...)`` ones alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from prsgd.algorithm.functional import momentum_sgd_
from prsgd.errors import InvalidArgument, check_bool, check_number


@dataclass(frozen=True)
class Hyperparameters:
    """Local update settings: lr (gamma), momentum (beta), nesterov (option II), weight_decay."""

    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_number("lr", self.lr)
        if not self.lr >= 0:  # 0 is where some schedules end (cosine annealing); a start needs > 0
            raise InvalidArgument(f"lr={self.lr!r} is not allowed; the learning rate must be >= 0")
        check_number("momentum", self.momentum)
        if not 0 <= self.momentum < 1:
            raise InvalidArgument(f"momentum={self.momentum!r} is not allowed; it must be in [0, 1)")
        check_bool("nesterov", self.nesterov)
        if self.nesterov and self.momentum == 0:
            raise InvalidArgument("nesterov=True needs momentum > 0 (got momentum=0), as in torch.optim.SGD")
        check_number("weight_decay", self.weight_decay)
        if not self.weight_decay >= 0:
            raise InvalidArgument(f"weight_decay={self.weight_decay!r} is not allowed; it must be >= 0")

    @classmethod
    def at_start(cls, **kwargs: Any) -> Hyperparameters:
        """The hyperparameters an engine is built with: as any, and a learning rate > 0."""
        lr = check_number("lr", kwargs.get("lr"))
        if not lr > 0:
            raise InvalidArgument(f"lr={lr!r} is not allowed; the learning rate must be > 0")
        return cls(**kwargs)

    def as_kwargs(self) -> dict[str, float | bool]:
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
        }


@dataclass
class UpdateGroup:
    """Tensors that share one set of hyperparameters (one ``param_group`` of a torch optimizer): the parameters
    updated this step, their gradients, and the local rule's state for them, by name (empty lists when the rule
    keeps none)."""

    params: list[Tensor]
    grads: list[Tensor]
    state: Mapping[str, list[Tensor]]
    hyper: Hyperparameters


class MomentumSGD:
    """Momentum SGD, Polyak (eq. 4) or Nesterov (eq. 5) in ``torch.optim.SGD``'s form: the local rule of
    Algorithm 1. Its state is one ``momentum_buffer`` per parameter, kept when momentum > 0."""

    name = "sgd"
    STATE = ("momentum_buffer",)

    def state_names(self, has_state: bool) -> tuple[str, ...]:
        """The state tensors kept per parameter: ``momentum_buffer``, or none when no group has momentum."""
        return self.STATE if has_state else ()

    def update_(self, group: UpdateGroup) -> None:
        """One local step of ``group``, in place on its parameters and state."""
        buffers = group.state.get("momentum_buffer", [])
        momentum_sgd_(group.params, group.grads, buffers, **group.hyper.as_kwargs())


LOCAL_RULE = MomentumSGD()
"""The local rule both engines run (issue 27 adds AdamW next to it)."""
