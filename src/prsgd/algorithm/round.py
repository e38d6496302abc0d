"""One description of a round: :class:`RoundSpec`, every round option and every exclusion between them, in one place.

A :class:`RoundSpec` is immutable and checked when it is built, before any work: each option's own values (by the
option's check), then every exclusion between options (:data:`EXCLUSIONS`: one predicate and one error message
each). The config, the CLI, :class:`prsgd.LocalSGD`, :class:`prsgd.Simulator` and the integrations all take this
value (the engines' keyword arguments build it). The options beyond the rule and the period are data
(:data:`ROUND_OPTIONS`): the run config's fields, their ``--help`` and the test that walks every combination are made
from that table, so a new round option is declared here and used where it acts (its stage).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prsgd.algorithm.compression import COMPRESSION_FORMS, check_compression
from prsgd.algorithm.outer import check_outer
from prsgd.algorithm.overlap import check_overlap
from prsgd.algorithm.rules import SYNC_RULES, SyncRule, sync_rule
from prsgd.algorithm.topology import BUILT_IN
from prsgd.errors import InvalidArgument, check_int


@dataclass(frozen=True)
class RoundOption:
    """A round option as data: its name (a :class:`RoundSpec` field, a config key and a flag), the one-line
    description ``--help`` shows, the config file's type and the value there that means off (None in the spec),
    the names it may take (if a closed set) or a check of its value (``check(value, off="none")``, raising
    :class:`InvalidArgument`), and the values the options test walks besides off (in the spec, an option that is off
    holds the field's default: None, or False for overlap)."""

    name: str
    doc: str
    kind: type
    off: Any
    examples: tuple[Any, ...]
    choices: tuple[str, ...] | None = None
    check: Callable[..., Any] | None = None

    def from_config(self, value: Any) -> Any:
        """The spec's value for a config file's ``value``: the spec's default (off) for the config's off value, and for
        ``"none"`` where the option names its values (``--compression none``)."""
        return _DEFAULTS[self.name] if value == self.off or (self.kind is str and value == "none") else value


ROUND_OPTIONS: tuple[RoundOption, ...] = (
    RoundOption(
        "topology",
        "gossip rules only: the graph workers mix over",
        kind=str,
        off="",
        examples=("ring",),
        choices=tuple(BUILT_IN),
    ),
    RoundOption(
        "compression",
        "averaging rounds send the change since the last round in this format, with error feedback ("
        + ", ".join(COMPRESSION_FORMS)
        + "); empty: exact",
        kind=str,
        off="",
        examples=("fp16", "int8", "int4", "topk:0.1"),
        check=check_compression,
    ),
    RoundOption(
        "overlap",
        "delay in steps: an averaging round runs while training goes on, applied then; 0: off",
        kind=int,
        off=0,
        examples=(1, 2),
    ),
    RoundOption(
        "inner_period",
        "hierarchical rounds: average within each node every this many steps; 0: off",
        kind=int,
        off=0,
        examples=(2,),
    ),
    RoundOption(
        "nodes",
        "with inner_period: nodes the workers form (distributed: default from torchrun)",
        kind=int,
        off=0,
        examples=(2,),
    ),
    RoundOption(
        "outer_lr",
        "DiLoCo's outer step at each round: its learning rate (1, momentum 0: Algorithm 1)",
        kind=float,
        off=1.0,
        examples=(0.7,),
    ),
    RoundOption(
        "outer_momentum",
        "DiLoCo's outer step: Nesterov momentum in [0, 1)",
        kind=float,
        off=0.0,
        examples=(0.9,),
    ),
    RoundOption(
        "fragments",
        "streaming rounds: sync the round in this many fragments, fragment f f*period/fragments steps into each "
        "period (divides period); 0: off",
        kind=int,
        off=0,
        examples=(2,),
    ),
    RoundOption(
        "state_period",
        "rules that average the optimizer state: average it only every this many rounds; 0: every round",
        kind=int,
        off=0,
        examples=(2,),
    ),
    RoundOption(
        "sync_state",
        "rules that average the optimizer state: only these of its tensors (comma-separated, e.g. exp_avg); empty: all",
        kind=str,
        off="",
        examples=(("exp_avg",),),
    ),
)
"""Every round option beyond ``sync`` and ``period``, in the order of the config and of ``--help``."""


@dataclass(frozen=True)
class RoundSpec:
    """How workers communicate: the sync rule, the period I and every option of a round, checked together.

    Args:
        sync: the rule's name (:data:`prsgd.SYNC_RULES`): ``"params_and_momentum"`` is Algorithm 1.
        period: I >= 1, local steps between rounds (eq. 6; ignored by ``"gradients"`` and ``"none"``).
        topology: gossip rules only: a name, a :class:`prsgd.algorithm.topology.Topology`, a mixing matrix or a graph.
        compression: ``None`` (exact), ``"bf16"``, ``"fp16"``, ``"int8"``, ``"int4"`` or ``"topk:<fraction>"``:
            averaging rounds send the change since the last round in that format, with error feedback
            (:mod:`prsgd.algorithm.compression`).
        overlap: ``False``, ``True`` (1) or a delay in steps in [0, period]: an averaging round's exchange runs
            while local steps go on, applied ``delay`` steps later (:mod:`prsgd.algorithm.overlap`).
        inner_period: hierarchical rounds: average within each node every ``inner_period`` steps; divides period.
        nodes: with ``inner_period``, how many nodes of consecutive workers (LocalSGD: default from torchrun).
        outer_lr, outer_momentum: DiLoCo's outer step at every scheduled averaging round
            (:mod:`prsgd.algorithm.outer`); on when either is given (the other then 1 or 0).
        fragments: F, dividing ``period``: streaming rounds. Each round's parameters (with their optimizer state and
            the float buffers) are cut into F near-equal fragments, fragment f synced ``f * period / F`` steps into
            each period, so that a step sends at most about 1/F of a round (:mod:`prsgd.algorithm.fragments`); rules
            with periodic rounds (averaging or gossip). 1 is the same as off.
        state_period: for rules that average the optimizer state (Algorithm 1, gossip): average (or mix) it only at
            every ``state_period``-th round, the parameters at every round.
        sync_state: for those rules: the names of the state tensors a round averages (``("exp_avg",)``: AdamW's
            first moment only); the others stay local. A name the local rule does not keep is refused when an
            engine is built.

    Every exclusion between options is one entry of :data:`EXCLUSIONS`; a spec that breaks one is refused with its
    message (:class:`prsgd.InvalidArgument`) at construction.
    """

    sync: str = "params_and_momentum"
    period: int = 1
    topology: object = field(default=None, compare=False)
    compression: str | None = None
    overlap: bool | int = False
    inner_period: int | None = None
    nodes: int | None = None
    outer_lr: float | None = None
    outer_momentum: float | None = None
    fragments: int | None = None
    state_period: int | None = None
    sync_state: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        sync_rule(self.sync)
        check_int("period", self.period, 1)
        check_compression(self.compression)
        check_overlap(self.overlap, self.period)
        object.__setattr__(self, "sync_state", check_names("sync_state", self.sync_state))
        for name in ("inner_period", "nodes", "fragments", "state_period"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.fragments == 1:  # one fragment is the whole round
            object.__setattr__(self, "fragments", None)
        outer = check_outer(self.outer_lr, self.outer_momentum)
        if outer is not None:
            object.__setattr__(self, "outer_lr", outer[0])
            object.__setattr__(self, "outer_momentum", outer[1])
        for exclusion in EXCLUSIONS:
            if exclusion.applies(self):
                raise InvalidArgument(exclusion.message(self))

    @property
    def rule(self) -> SyncRule:
        return SYNC_RULES[self.sync]

    def sends_state_after(self, step: int) -> bool:
        """Whether the scheduled round after ``step`` averages (or mixes) the optimizer state."""
        return self.rule.state == "average" and (
            self.state_period is None or step % (self.state_period * self.period) == 0
        )

    @property
    def delay(self) -> int:
        """Steps between the start of an averaging round's exchange and its application (0: at once)."""
        return check_overlap(self.overlap, self.period)

    @property
    def outer(self) -> tuple[float, float] | None:
        """The outer step's (lr, momentum), or None without one."""
        return None if self.outer_lr is None else (self.outer_lr, self.outer_momentum)

    def check_workers(self, num_workers: int) -> None:
        """``nodes`` must divide the number of workers, each node holding as many."""
        if self.nodes is not None and num_workers % self.nodes:
            raise InvalidArgument(
                f"nodes={self.nodes} does not divide the {num_workers} workers; each node must hold as many workers"
            )

    def replace(self, **changes: Any) -> RoundSpec:
        """A copy with ``changes``, checked again."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, spec: RoundSpec | None = None, **options: Any) -> RoundSpec:
        """``spec`` itself, or one built from keyword ``options`` (what the engines' keywords are for); not both."""
        unknown = sorted(set(options) - set(_DEFAULTS))
        if unknown:
            raise InvalidArgument(f"{unknown[0]}= is not an option of a round; allowed: {', '.join(_DEFAULTS)}")
        given = [name for name, value in options.items() if not _is_default(value, _DEFAULTS[name])]
        if spec is None:
            return cls(**options)
        if not isinstance(spec, RoundSpec):
            raise InvalidArgument(f"round={type(spec).__name__} is not allowed; it must be a prsgd.RoundSpec")
        if given:
            raise InvalidArgument(
                f"round= was given with {', '.join(sorted(given))} as well; put every option in the RoundSpec"
            )
        return spec

    @classmethod
    def from_config(cls, sync: str, period: int, values: dict[str, Any]) -> RoundSpec:
        """The spec of a run config's ``[algorithm]`` section: ``values`` holds every :data:`ROUND_OPTIONS` key,
        with the config's off value where the option is off."""
        return cls(sync, period, **{o.name: o.from_config(values[o.name]) for o in ROUND_OPTIONS})


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RoundSpec)}


def _is_default(value: Any, default: Any) -> bool:
    return value is default or (isinstance(value, int | float | str) and value == default)


@dataclass(frozen=True)
class Exclusion:
    """Options that do not go together: ``applies(spec)`` says when, ``message(spec)`` is the one error."""

    applies: Callable[[RoundSpec], bool]
    message: Callable[[RoundSpec], str]


def _only_where(name: str, holds: Callable[[SyncRule], bool], changes: str, lacks: str) -> Exclusion:
    """``name`` changes what ``changes`` says: refused under a rule for which ``holds`` is false."""

    def message(spec: RoundSpec) -> str:
        allowed = ", ".join(rule.name for rule in SYNC_RULES.values() if holds(rule))
        return f"{name}={getattr(spec, name)!r} changes {changes}; sync={spec.sync!r} {lacks} (allowed with {allowed})"

    return Exclusion(lambda spec: _on(spec, name) and not holds(spec.rule), message)


def _averaging_only(name: str) -> Exclusion:
    """``name`` changes averaging rounds: refused under a rule that has none."""
    return _only_where(name, lambda rule: rule.averages_params, "averaging rounds", "has none")


def check_names(name: str, value: object) -> tuple[str, ...] | None:
    """None, or a non-empty tuple of distinct names (a comma-separated string is split)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = tuple(v.strip() for v in value.split(",") if v.strip())
    if not isinstance(value, tuple | list) or not value or not all(isinstance(v, str) and v for v in value):
        raise InvalidArgument(f"{name}={value!r} is not allowed; it must name state tensors, e.g. ('exp_avg',)")
    if len(set(value)) != len(value):
        raise InvalidArgument(f"{name}={tuple(value)!r} names a tensor twice")
    return tuple(value)


def _state_averaging_only(name: str) -> Exclusion:
    """``name`` changes how the optimizer state is averaged: refused under a rule that does not average it."""
    return _only_where(
        name, lambda rule: rule.state == "average", "how rounds average the optimizer state", "does not average it"
    )


def _on(spec: RoundSpec, name: str) -> bool:
    """Whether option ``name`` is on (overlap: a delay > 0)."""
    return spec.delay > 0 if name == "overlap" else getattr(spec, name) is not None


EXCLUSIONS: tuple[Exclusion, ...] = (
    Exclusion(
        lambda s: s.rule.mixes and s.topology is None,
        lambda s: f"sync={s.sync!r} needs topology= (a name such as 'ring', a mixing matrix or a graph)",
    ),
    Exclusion(
        lambda s: not s.rule.mixes and s.topology is not None,
        lambda s: f"topology={s.topology!r} is only used by sync='gossip' or 'gossip_params_only', not sync={s.sync!r}",
    ),
    _averaging_only("compression"),
    _averaging_only("inner_period"),
    _averaging_only("overlap"),
    _averaging_only("outer_lr"),
    Exclusion(
        lambda s: s.inner_period is not None and (s.inner_period > s.period or s.period % s.inner_period != 0),
        lambda s: (
            f"inner_period={s.inner_period} is not allowed with period={s.period}; the global round must fall on an "
            "inner one: inner_period must divide period"
        ),
    ),
    Exclusion(
        lambda s: s.nodes is not None and s.inner_period is None,
        lambda s: f"nodes={s.nodes!r} groups workers for inner rounds; it needs inner_period=",
    ),
    Exclusion(
        lambda s: s.delay > 0 and s.inner_period is not None,
        lambda s: f"overlap={s.overlap!r} with inner_period={s.inner_period} is not supported; use one of them",
    ),
    Exclusion(
        lambda s: s.outer is not None and s.delay > 0,
        lambda s: f"outer_lr/outer_momentum with overlap={s.overlap!r} is not supported",
    ),
    _only_where("fragments", lambda rule: rule.periodic, "periodic rounds", "has none"),
    Exclusion(
        lambda s: s.fragments is not None and s.period % s.fragments != 0,
        lambda s: (
            f"fragments={s.fragments} is not allowed with period={s.period}; fragment f is synced f*period/fragments "
            "steps into each period: fragments must divide period"
        ),
    ),
    Exclusion(
        lambda s: s.fragments is not None and s.inner_period is not None,
        lambda s: f"fragments={s.fragments} with inner_period={s.inner_period} is not supported; use one of them",
    ),
    Exclusion(
        lambda s: s.fragments is not None and s.delay > s.period // s.fragments,
        lambda s: (
            f"overlap={s.overlap!r} is not allowed with fragments={s.fragments} and period={s.period}; a fragment's "
            f"round completes before the next fragment's starts: the delay must be in [0, {s.period // s.fragments}]"
        ),
    ),
    _state_averaging_only("state_period"),
    _state_averaging_only("sync_state"),
    Exclusion(
        lambda s: (
            s.state_period is not None and (s.compression is not None or s.delay > 0 or s.inner_period or s.fragments)
        ),
        lambda s: (
            f"state_period={s.state_period} with compression, overlap, inner_period or fragments is not supported "
            "(their rounds keep one layout of what is sent); use sync_state= to send part of the state at every round"
        ),
    ),
)
"""Every exclusion between round options, checked in this order when a :class:`RoundSpec` is built."""
