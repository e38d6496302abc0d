"""The local rules: what each worker does between rounds, and the optimizer state it keeps, by name.

A local rule names the state tensors it keeps per parameter, shaped like it (:attr:`LocalRule.STATE`: momentum SGD's
``momentum_buffer``, AdamW's ``exp_avg`` and ``exp_avg_sq``) and the per-parameter counters it keeps beside them
(:attr:`LocalRule.COUNTERS`: AdamW's ``step``). The engines allocate one tensor per name and parameter under torch's
names (``opt.state[p]``), the sync rules average, clear or keep the state tensors
(:attr:`prsgd.algorithm.rules.SyncRule.state`) and checkpoints carry them. Counters are never sent: each worker
counts its own updates, as ``torch.optim`` does, and a rule that clears the state restarts them. The update itself
is a stateless function (:mod:`prsgd.algorithm.functional`) over the tensors of one :class:`UpdateGroup`, so it works
on one worker's tensors and on stacked ``(N, ...)`` ones alike.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from prsgd.algorithm.functional import adamw_, momentum_sgd_
from prsgd.errors import CheckpointError, InvalidArgument, check_bool, check_number

if TYPE_CHECKING:
    from prsgd.algorithm.round import RoundSpec


class _Settings:
    """What every local rule's settings answer: built at an engine's start (a learning rate > 0), and as keywords."""

    @classmethod
    def at_start(cls, **kwargs: Any) -> Any:
        """The hyperparameters an engine is built with: as any, and a learning rate > 0."""
        _check_start_lr(kwargs.get("lr"))
        return cls(**kwargs)

    def as_kwargs(self) -> dict[str, Any]:
        """The settings as keyword arguments of the update (every step: made once per settings, not per call)."""
        return self._kwargs

    @functools.cached_property
    def _kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class Hyperparameters(_Settings):
    """Momentum SGD's settings: lr (gamma), momentum (beta), nesterov (option II), weight_decay (L2, added to the
    gradient as ``torch.optim.SGD`` does)."""

    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        check_number("momentum", self.momentum)
        if not 0 <= self.momentum < 1:
            raise InvalidArgument(f"momentum={self.momentum!r} is not allowed; it must be in [0, 1)")
        check_bool("nesterov", self.nesterov)
        if self.nesterov and self.momentum == 0:
            raise InvalidArgument("nesterov=True needs momentum > 0 (got momentum=0), as in torch.optim.SGD")
        _check_float32("weight_decay", self.weight_decay)


@dataclass(frozen=True)
class AdamWHyperparameters(_Settings):
    """AdamW's settings, as ``torch.optim.AdamW`` takes them: lr, betas (beta1, beta2), eps, and decoupled
    weight decay (the parameters shrink by lr * weight_decay each step)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        betas = self.betas
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise InvalidArgument(f"betas={betas!r} is not allowed; it must be two numbers (beta1, beta2)")
        for beta in betas:
            check_number("betas", beta)
            if not 0 <= beta < 1:
                raise InvalidArgument(f"betas={tuple(betas)!r} is not allowed; each must be in [0, 1)")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        _check_float32("eps", self.eps)
        _check_float32("weight_decay", self.weight_decay)


def _check_start_lr(lr: object) -> None:
    if not check_number("lr", lr) > 0:
        raise InvalidArgument(f"lr={lr!r} is not allowed; the learning rate must be > 0")


def _check_float32(name: str, value: object) -> None:
    """``value`` >= 0 and no larger than float32 holds (the tensor ops it scales take it as a float32)."""
    if check_number(name, value, 0) > torch.finfo(torch.float32).max:
        largest = torch.finfo(torch.float32).max
        raise InvalidArgument(f"{name}={value!r} is not allowed; it must be at most {largest!r} (a float32)")


def _check_lr(lr: object) -> None:
    check_number("lr", lr)
    if not lr >= 0:  # type: ignore[operator]  # 0 is where some schedules end (cosine annealing); a start needs > 0
        raise InvalidArgument(f"lr={lr!r} is not allowed; the learning rate must be >= 0")
    _check_float32("lr", lr)


@dataclass
class UpdateGroup:
    """Tensors that share one set of hyperparameters (one ``param_group`` of a torch optimizer): the parameters
    updated this step, their gradients, and the local rule's state and counters for them, by name (empty lists
    when the rule keeps none)."""

    params: list[Tensor]
    grads: list[Tensor]
    state: Mapping[str, list[Tensor]]
    hyper: Any


class LocalRule:
    """A local rule: its name (``optimizer=``), its hyperparameters' class, the state tensors and counters it keeps
    per parameter, and its update."""

    name: ClassVar[str]
    Hyper: ClassVar[type]
    STATE: ClassVar[tuple[str, ...]]
    COUNTERS: ClassVar[tuple[str, ...]] = ()

    @functools.cached_property
    def keys(self) -> tuple[str, ...]:
        """The param-group keys the rule reads (its hyperparameters' fields)."""
        return tuple(f.name for f in fields(self.Hyper))

    def watched(self, group: Mapping[str, Any]) -> tuple:
        """What of a param group decides its hyperparameters: checked again whenever it changes."""
        return tuple(tuple(v) if isinstance(v, list) else v for v in (group[k] for k in self.keys))

    def hyperparameters(self, group: Mapping[str, Any]) -> Any:
        """A param group's hyperparameters, checked."""
        return self.Hyper(*(group[k] for k in self.keys))

    def keeps_state(self, groups: list[Mapping[str, Any]]) -> bool:
        """Whether the rule keeps state for these param groups."""
        return True

    def state_names(self, has_state: bool) -> tuple[str, ...]:
        """The state tensors kept per parameter (shaped like it)."""
        return self.STATE if has_state else ()

    def check_round(self, spec: RoundSpec) -> None:
        """Refuse, with :class:`InvalidArgument`, round options this rule's state cannot go through: fragments of a
        state that a round clears, where the rule keeps counters (one per parameter, shared by all its values)."""
        if spec.fragments and spec.rule.state == "clear" and self.COUNTERS:
            raise InvalidArgument(
                f"fragments={spec.fragments} with optimizer={self.name!r} and sync={spec.sync!r} is not supported: "
                f"clearing one fragment's state would restart the {', '.join(self.COUNTERS)} counter that every value "
                "of a parameter shares; use sync='params_and_momentum' or 'params_only'"
            )

    def check_saved(self, state_dict: Mapping[str, Any], kept: set[str], who: str) -> None:
        """A ``torch.optim`` state dict saved by another rule (SGD's momentum into AdamW, momentum into momentum 0)
        is refused with :class:`CheckpointError`: its tensors would be dropped, or its param groups lack this rule's
        settings. ``kept``: the state names ``who`` keeps per parameter."""
        for saved in state_dict.get("state", {}).values():
            names = {n for n, v in saved.items() if v is not None}
            if names != kept:
                raise CheckpointError(
                    f"the state keeps optimizer state {sorted(names)}; {who} (optimizer={self.name!r}) keeps "
                    f"{sorted(kept)}: load it into the optimizer (and momentum) it was saved with"
                )
        for group in state_dict.get("param_groups", []):
            missing = [k for k in self.keys if k not in group]
            if missing:
                raise CheckpointError(
                    f"the state's param groups have no {', '.join(missing)}: it was saved with another optimizer "
                    f"than optimizer={self.name!r}"
                )

    def step_(self, groups: Sequence[UpdateGroup]) -> None:
        """One local step of every group."""
        for group in groups:
            self.update_(group)

    def clear_(self, state: list[Tensor], counters: list[Tensor]) -> None:
        """A fresh optimizer's state: every state tensor and counter at zero."""
        for tensors in (state, counters):
            if tensors:
                torch._foreach_zero_(tensors)

    def counter(self) -> Tensor:
        """A new counter at zero: a 0-d float32 tensor on the CPU, as ``torch.optim`` keeps ``step``."""
        return torch.zeros((), dtype=torch.float32)

    def update_(self, group: UpdateGroup) -> None:
        raise NotImplementedError


class MomentumSGD(LocalRule):
    """Momentum SGD, Polyak (eq. 4) or Nesterov (eq. 5) in ``torch.optim.SGD``'s form: the local rule of
    Algorithm 1. Its state is one ``momentum_buffer`` per parameter, kept when momentum > 0."""

    name = "sgd"
    Hyper = Hyperparameters
    STATE = ("momentum_buffer",)

    def keeps_state(self, groups: list[Mapping[str, Any]]) -> bool:
        return any(group["momentum"] > 0 for group in groups)

    def update_(self, group: UpdateGroup) -> None:
        """One local step of ``group``, in place on its parameters and state."""
        buffers = group.state.get("momentum_buffer", [])
        momentum_sgd_(group.params, group.grads, buffers, **group.hyper.as_kwargs())


class AdamW(LocalRule):
    """AdamW (Loshchilov & Hutter 2019) in ``torch.optim.AdamW``'s form: bias-corrected moments, decoupled weight
    decay. Its state is ``exp_avg`` and ``exp_avg_sq`` per parameter and the counter ``step``."""

    name = "adamw"
    Hyper = AdamWHyperparameters
    STATE = ("exp_avg", "exp_avg_sq")
    COUNTERS = ("step",)

    def check_round(self, spec: RoundSpec) -> None:
        super().check_round(spec)
        refuse_state_through_lossy_rounds(spec, "optimizer='adamw'", "exp_avg_sq")

    def watched(self, group: Mapping[str, Any]) -> tuple:
        return (*super().watched(group), group.get("amsgrad"), group.get("maximize"))

    def hyperparameters(self, group: Mapping[str, Any]) -> Any:
        for flag in ("amsgrad", "maximize"):  # torch.optim.AdamW's options this rule does not have
            if group.get(flag):
                raise InvalidArgument(f"{flag}=True is not supported by optimizer='adamw'")
        return super().hyperparameters(group)

    def update_(self, group: UpdateGroup) -> None:
        s = group.state
        adamw_(group.params, group.grads, s["exp_avg"], s["exp_avg_sq"], s["step"], **group.hyper.as_kwargs())


def refuse_state_through_lossy_rounds(spec: RoundSpec, who: str, second_moment: str | None = None) -> None:
    """Adam's ``exp_avg_sq`` (and any second moment) must stay >= 0 and accurate where it is small, for an update
    divides by its root: a compressed round rounds it by a step of its chunk's largest value, and an overlapped
    round's correction avg(s) + (v - s) turns it negative once N (1 - beta2^delay) > 1. Both are refused where the
    rule averages the state, unless ``sync_state`` leaves ``second_moment`` out; with ``sync="params_only"`` (the
    state stays local, as in DiLoCo) they work."""
    if spec.rule.state != "average" or (spec.sync_state is not None and second_moment not in spec.sync_state):
        return
    for name, on in (("compression", spec.compression is not None), ("overlap", spec.delay > 0)):
        if on:
            raise InvalidArgument(
                f"{name}={getattr(spec, name)!r} with {who} and sync={spec.sync!r} is not supported: that round would "
                f"average the second moment through {name}, which can make it negative or round away its small "
                "values (the update divides by its root); use sync='params_only' (the state stays local, as in "
                f"DiLoCo), sync_state=('exp_avg',), or exact rounds without {name}"
            )


LOCAL_RULES: dict[str, LocalRule] = {rule.name: rule for rule in (MomentumSGD(), AdamW())}
"""The local rules both engines run, by the name ``optimizer=`` takes."""

LOCAL_RULE = LOCAL_RULES["sgd"]
"""The default local rule: Algorithm 1's momentum SGD."""

_SGD_ONLY = ("momentum", "nesterov")
_ADAMW_ONLY = ("betas", "eps")


def local_rule(optimizer: object, **given: Any) -> tuple[LocalRule, Any]:
    """The local rule named ``optimizer`` and its starting hyperparameters from the keywords ``given`` (None: the
    rule's default, as ``torch.optim`` has it); :class:`InvalidArgument` for an unknown name or a keyword that
    belongs to another rule (momentum with AdamW, betas with SGD), before any work."""
    if not isinstance(optimizer, str) or optimizer not in LOCAL_RULES:
        raise InvalidArgument(
            f"optimizer={optimizer!r} is not known; allowed: {', '.join(LOCAL_RULES)} (or, for LocalSGD, a "
            "torch.optim.Optimizer instance)"
        )
    rule = LOCAL_RULES[optimizer]
    foreign = [k for k in (_ADAMW_ONLY if rule.name == "sgd" else _SGD_ONLY) if given.get(k) is not None]
    if foreign:
        raise InvalidArgument(
            f"{foreign[0]}={given[foreign[0]]!r} is not a setting of optimizer={optimizer!r}; it takes "
            f"{', '.join(rule.keys)}"
        )
    kwargs = {k: v for k, v in given.items() if k in rule.keys and v is not None}
    return rule, rule.Hyper.at_start(**kwargs)
