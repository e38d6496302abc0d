"""An outer optimizer at the round (DiLoCo: Douillard et al., 2023): Nesterov momentum on the averaged change.

Beyond the paper. At every scheduled averaging round, after the workers' parameters have been averaged to ``m``,
the parameters the round started from (``anchor``: the values after the previous round, the same everywhere)
and ``m`` give DiLoCo's outer gradient ``g = anchor - m``; an SGD step with Nesterov momentum on it,

    v <- mu v + g,     x <- anchor - eta (g + mu v),

is what every worker holds after the round (computed as ``m + (1 - eta) g - eta mu v``, so that ``eta = 1``,
``mu = 0`` gives ``m`` itself: exactly Algorithm 1's round). ``eta`` is ``outer_lr``, ``mu`` ``outer_momentum``;
DiLoCo's own choice is 0.7 and 0.9. Only parameters take the outer step; float buffers and momentum buffers are
averaged as the rule says. :meth:`prsgd.algorithm.PeriodicSync.synchronize` stays a plain average (the anchor then
moves to it; the velocity is kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from prsgd.errors import CheckpointError, InvalidArgument, check_number

if TYPE_CHECKING:
    from prsgd.algorithm.round import RoundSpec


def check_outer(outer_lr: float | None, outer_momentum: float | None) -> tuple[float, float] | None:
    """``(outer_lr, outer_momentum)`` when either is given (the other then 1 or 0), else None (no outer step)."""
    if outer_lr is None and outer_momentum is None:
        return None
    lr = 1.0 if outer_lr is None else check_number("outer_lr", outer_lr)
    momentum = 0.0 if outer_momentum is None else check_number("outer_momentum", outer_momentum)
    if not lr > 0:
        raise InvalidArgument(f"outer_lr={outer_lr!r} is not allowed; it must be > 0 (1 with momentum 0: Algorithm 1)")
    if not 0 <= momentum < 1:
        raise InvalidArgument(f"outer_momentum={outer_momentum!r} is not allowed; it must be in [0, 1)")
    return lr, momentum


class OuterOptimizer:
    """The outer step's state over the parameters (one worker's, or stacked): ``anchor`` and ``velocity``. The
    outer stage of a round; its state is saved under ``"outer"``."""

    key = "outer"

    @classmethod
    def from_spec(cls, spec: RoundSpec) -> OuterOptimizer | None:
        """The outer step ``spec`` describes, or None without one."""
        return cls(*spec.outer) if spec.outer is not None else None

    def __init__(self, lr: float, momentum: float) -> None:
        self.lr, self.momentum = lr, momentum
        self.anchor: list[Tensor] = []
        self.velocity: list[Tensor] = []

    def forget(self) -> None:
        """Start again: the next :meth:`rebase` takes the anchor, and the velocity starts at zero."""
        self.anchor, self.velocity = [], []

    def rebase(self, params: Sequence[Tensor]) -> None:
        """Take ``params`` (in consensus) as the anchor; the velocity starts at zero the first time."""
        self.anchor = [p.detach().clone() for p in params]
        if not self.velocity:
            self.velocity = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, params: Sequence[Tensor]) -> None:
        """``params`` hold the round's average m; replace it by the outer step from the anchor, in place."""
        params = list(params)
        outer_gradient = torch._foreach_sub(self.anchor, params)  # g = anchor - m
        torch._foreach_mul_(self.velocity, self.momentum)
        torch._foreach_add_(self.velocity, outer_gradient)  # v = mu v + g
        torch._foreach_mul_(outer_gradient, 1 - self.lr)
        torch._foreach_add_(outer_gradient, self.velocity, alpha=-self.lr * self.momentum)
        torch._foreach_add_(params, outer_gradient)  # m + (1 - eta) g - eta mu v
        self.anchor = [p.detach().clone() for p in params]

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "anchor": [a.clone() for a in self.anchor],
            "velocity": [v.clone() for v in self.velocity],
        }

    def load_state_dict(self, state: dict[str, Any], params: Sequence[Tensor]) -> None:
        anchor, velocity = state["anchor"], state["velocity"]
        if len(anchor) != len(params) or any(a.shape != p.shape for a, p in zip(anchor, params, strict=True)):
            raise CheckpointError("the state's outer optimizer does not match this model's parameters")
        self.anchor = [a.to(p.device, p.dtype).clone() for a, p in zip(anchor, params, strict=True)]
        self.velocity = [v.to(p.device, p.dtype).clone() for v, p in zip(velocity, params, strict=True)]
