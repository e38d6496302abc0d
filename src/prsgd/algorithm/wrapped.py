"""Any ``torch.optim.Optimizer`` instance as the local rule: its own step between rounds, and whatever tensors it keeps
per parameter averaged, cleared or kept at a round as the sync rule says.

Users who train with Adam, RMSprop, Adagrad or an optimizer of their own keep it: ``prsgd.LocalSGD(model,
optimizer=torch.optim.Adam(model.parameters(), lr=...), period=8)``. The instance keeps its state lazily in
``opt.state[p]`` under its own names; a round reads it there (every floating-point tensor shaped like its parameter:
``exp_avg``, ``square_avg``, ``momentum_buffer``, ...) and sends it with the parameters in one collective. Scalars
(``step``) are counters: each worker keeps its own. Clearing the state is what a fresh optimizer has: no state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from prsgd.algorithm.engine_view import FollowsAlgorithm
from prsgd.algorithm.local import LocalRule, UpdateGroup, refuse_state_through_lossy_rounds
from prsgd.errors import InvalidArgument

if TYPE_CHECKING:
    from prsgd.algorithm.round import RoundSpec


class WrappedOptimizer(LocalRule):
    """A torch optimizer instance as the local rule (``prsgd.LocalSGD`` only: the simulator runs stacked rules)."""

    name = "wrapped"
    STATE = ()

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    @property
    def keys(self) -> tuple[str, ...]:
        return ()

    def watched(self, group: Any) -> tuple:
        return ()

    def hyperparameters(self, group: Any) -> None:
        return None  # the instance reads its own param groups

    def check_round(self, spec: RoundSpec) -> None:
        who = f"optimizer={type(self.optimizer).__name__}(...)"
        refuse_state_through_lossy_rounds(spec, who)
        if spec.fragments and spec.rule.state != "keep":
            raise InvalidArgument(
                f"fragments={spec.fragments} with {who} and sync={spec.sync!r} is not supported: its state, kept "
                "by the instance, is sent or cleared whole; use sync='params_only' (the state stays local)"
            )

    def step_(self, groups: Sequence[UpdateGroup]) -> None:
        """The instance's own step, on the gradients the engine hands over (averaged ones with
        ``sync="gradients"``, which are then put where the instance reads them: ``p.grad``)."""
        for group in groups:
            for p, g in zip(group.params, group.grads, strict=True):
                if p.grad is None:
                    p.grad = g
                elif p.grad is not g:
                    p.grad.copy_(g)
        self.optimizer.step()

    def clear_(self, state: list[Tensor], counters: list[Tensor]) -> None:
        self.optimizer.state.clear()  # the instance creates it again, fresh, at its next step

    def params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def state_tensors(self) -> list[Tensor]:
        """Every floating-point tensor the instance keeps shaped like its parameter, parameter by parameter in its
        param groups' order and name by name in the order it created them: the same layout on every worker. A
        parameter without state while others have some (it never got a gradient) is refused: a round would then
        send different layouts from different workers."""
        tensors, names = [], None
        for p in self.params():
            kept = [(n, t) for n, t in self.optimizer.state.get(p, {}).items() if _per_element(t, p)]
            if names is None:
                names = [n for n, _ in kept]
            elif [n for n, _ in kept] != names:
                raise InvalidArgument(
                    f"the wrapped {type(self.optimizer).__name__} keeps {[n for n, _ in kept]} for one parameter "
                    f"and {names} for another (a parameter without a gradient so far?); a round averages the same "
                    "state for every parameter: give every parameter a gradient before the first round"
                )
            for n, t in kept:
                if t.dtype != p.dtype:
                    raise InvalidArgument(
                        f"the wrapped {type(self.optimizer).__name__} keeps {n} in {t.dtype} for a {p.dtype} "
                        "parameter; a round sends the state with the parameters, in their dtype: keep them alike"
                    )
            tensors += [t for _, t in kept]
        return tensors


def _per_element(value: object, param: Tensor) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point() and value.shape == param.shape


def wrap(optimizer: torch.optim.Optimizer, model: object, settings: dict[str, Any]) -> tuple[WrappedOptimizer, None]:
    """The local rule of a torch optimizer instance, checked: the engine's own settings are refused (the instance has
    its own), the model must be given, and the instance's param groups must cover its trainable parameters."""
    given = sorted(k for k, v in settings.items() if v is not None)
    if given:
        raise InvalidArgument(
            f"{given[0]}= was given with an optimizer instance ({type(optimizer).__name__}); its settings are its "
            "own: set them when building it"
        )
    if isinstance(optimizer, FollowsAlgorithm):
        raise InvalidArgument(f"optimizer= is a {type(optimizer).__name__}; wrap the inner torch optimizer once")
    if not isinstance(model, nn.Module):
        raise InvalidArgument(
            f"with an optimizer instance, LocalSGD takes the model (an nn.Module) as its first argument, not "
            f"{type(model).__name__}: LocalSGD(model, optimizer=torch.optim.Adam(model.parameters()), period=...)"
        )
    check_covers(optimizer, [p for p in model.parameters() if p.requires_grad])
    return WrappedOptimizer(optimizer), None


def check_covers(optimizer: torch.optim.Optimizer, trainable: list[Tensor]) -> None:
    """The instance's param groups must hold exactly the model's trainable parameters (those that require grad)."""
    theirs = {id(p) for group in optimizer.param_groups for p in group["params"]}
    ours = {id(p) for p in trainable}
    missing, strangers = len(ours - theirs), len(theirs - ours)
    if missing or strangers:
        raise InvalidArgument(
            f"the optimizer's param groups do not cover the model: {missing} of its {len(ours)} trainable parameters "
            f"are missing and {strangers} parameters are not the model's; build the optimizer from "
            "model.parameters() (or param groups that hold each of them once)"
        )
