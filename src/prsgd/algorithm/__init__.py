"""Algorithm 1 (PR-SGD-Momentum), Algorithm 2 and their baselines, written once for every engine.

:class:`PeriodicSync` is the algorithm as one object: the sync rule, the period I, the step counter and the
communication so far, with one state-dict format. An engine hands it its :class:`Communicator` (the engine
contract) and calls :meth:`PeriodicSync.step` once per step of every worker:

1. ``sync="gradients"`` only: average the gradients (parallel mini-batch momentum SGD);
2. the local momentum-SGD update (:func:`prsgd.algorithm.functional.momentum_sgd_`, eq. 4 or 5);
3. after every ``period``-th step, the rule's round: average (eq. 6) or mix through W (eq. 18).

The algorithm says *what* a round communicates, as field names (``"params"``, ``"buffers"``, ``"grads"``,
``"momentum"``); the engine owns where those tensors live and how they travel, and counts what it sent. The
simulator's communicator averages over a leading worker dimension (:mod:`prsgd.engines.stacked`);
:class:`prsgd.LocalSGD`'s reduces one span of its flat storage with one ``all_reduce``
(:mod:`prsgd.engines.distributed`). Beyond the paper, three options change how a round travels, each defined once
here and in its module, and each off by default: compressed rounds (:mod:`prsgd.algorithm.compression`), overlapped
rounds
(:mod:`prsgd.algorithm.overlap`) and hierarchical rounds (``inner_period``: an exact average within each node every
``inner_period`` steps, over all workers every ``period`` steps).

Floating-point model buffers (BatchNorm running statistics) travel with the parameters at every round; with
``sync="gradients"`` they are averaged at every step, in the gradients' collective, so that all workers stay
identical (DDP instead broadcasts rank 0's buffers before every forward). Integer buffers (BatchNorm's
``num_batches_tracked``) are equal on all workers by construction and are not communicated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from prsgd.algorithm.compression import Codec, CompressedRounds, check_compression
from prsgd.algorithm.functional import momentum_sgd_
from prsgd.algorithm.outer import OuterOptimizer, check_outer
from prsgd.algorithm.overlap import OverlappedRounds, check_overlap
from prsgd.errors import CheckpointError, InvalidArgument, check_bool, check_int, check_number

Field = Literal["params", "buffers", "grads", "momentum"]
"""What a round communicates: all parameters, floating-point model buffers, this step's gradients, momentum."""

Round = Literal["gradients", "average", "mix", "nothing"]
Scope = Literal["all", "node"]
"""Who averages together: every worker, or the workers of each node (a hierarchical run's inner rounds)."""
Momentum = Literal["average", "clear", "keep"]


@dataclass(frozen=True)
class SyncRule:
    """What a round communicates and what happens to momentum buffers at a round.

    ``communicates``: ``"gradients"`` (every step, before the local update; ``period`` ignored), ``"average"``
    (parameters and float buffers over all workers every ``period`` steps, eq. 6), ``"mix"`` (with neighbours
    through W every ``period`` steps, eq. 18) or ``"nothing"``. ``momentum``: averaged (or mixed) with the
    parameters, cleared, or kept per worker; only ``"keep"`` for rules that do not average or mix parameters.
    """

    name: str
    description: str
    communicates: Round
    momentum: Momentum = "keep"

    def __post_init__(self) -> None:
        if self.communicates not in ("gradients", "average", "mix", "nothing"):
            raise ValueError(f"SyncRule {self.name}: communicates={self.communicates!r} is not a kind of round")
        if self.momentum not in ("average", "clear", "keep"):
            raise ValueError(f"SyncRule {self.name}: momentum={self.momentum!r} is not average, clear or keep")
        if self.communicates in ("gradients", "nothing") and self.momentum != "keep":
            raise ValueError(f"SyncRule {self.name}: a rule without parameter rounds keeps momentum per worker")

    @property
    def averages_gradients(self) -> bool:
        return self.communicates == "gradients"

    @property
    def averages_params(self) -> bool:
        return self.communicates == "average"

    @property
    def mixes(self) -> bool:
        return self.communicates == "mix"

    @property
    def periodic(self) -> bool:
        """Whether rounds happen every ``period`` steps (after the local update)."""
        return self.communicates in ("average", "mix")

    def round_fields(self) -> tuple[Field, ...]:
        """What a parameter round communicates: parameters, float buffers and, when averaged, momentum."""
        return ("params", "buffers", "momentum") if self.momentum == "average" else ("params", "buffers")


SYNC_RULES: dict[str, SyncRule] = {
    rule.name: rule
    for rule in (
        SyncRule(
            "params_and_momentum",
            "Algorithm 1: average parameters AND momentum buffers every `period` steps",
            "average",
            "average",
        ),
        SyncRule(
            "params_clear_momentum",
            "model averaging with cleared momentum (CNTK; Wang & Joshi 2018): average parameters, zero buffers",
            "average",
            "clear",
        ),
        SyncRule(
            "params_only",
            "average parameters, keep local buffers (PyTorch's PostLocalSGDOptimizer)",
            "average",
            "keep",
        ),
        SyncRule(
            "gradients",
            "parallel mini-batch momentum SGD: all-reduce gradients every step (ignores `period`)",
            "gradients",
        ),
        SyncRule(
            "gossip",
            "Algorithm 2: mix parameters AND momentum buffers with neighbours through W (every `period` steps)",
            "mix",
            "average",
        ),
        SyncRule(
            "gossip_params_only",
            "mix parameters with neighbours through W, keep local momentum buffers",
            "mix",
            "keep",
        ),
        SyncRule("none", "independent workers, no communication", "nothing"),
    )
}


def sync_rule(name: str) -> SyncRule:
    """The :class:`SyncRule` called ``name``; :class:`prsgd.InvalidArgument` naming the allowed ones otherwise."""
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


def check_period(period: int) -> int:
    """``period`` (I, eq. 6) must be an integer >= 1."""
    return check_int("period", period, 1)


def check_topology(rule: SyncRule, topology: object) -> None:
    """Gossip rules need a topology; the others take none."""
    if rule.mixes and topology is None:
        raise InvalidArgument(f"sync={rule.name!r} needs topology= (a name such as 'ring', a mixing matrix or a graph)")
    if not rule.mixes and topology is not None:
        raise InvalidArgument(
            f"topology={topology!r} is only used by sync='gossip' or 'gossip_params_only', not sync={rule.name!r}"
        )


def check_compression_rule(rule: SyncRule, compression: str | None) -> None:
    """Compression is a known codec, and only for the rules whose rounds average parameters."""
    check_compression(compression)
    if compression is not None:
        check_averaging_option(rule, "compression", compression)


def check_round_options(
    rule: SyncRule,
    period: int,
    *,
    overlap: bool | int = False,
    inner_period: int | None = None,
    outer_lr: float | None = None,
    outer_momentum: float | None = None,
) -> tuple[int, int | None, tuple[float, float] | None]:
    """The options of averaging rounds beyond compression, checked together (they exclude one another in part):
    the overlap's delay (:func:`prsgd.algorithm.overlap.check_overlap`), ``inner_period`` and the outer step's (lr,
    momentum) or None (:func:`prsgd.algorithm.outer.check_outer`). Each only for rules that average parameters."""
    inner_period = check_inner_period(rule, inner_period, period)
    delay = check_overlap(overlap, period)
    if delay:
        check_averaging_option(rule, "overlap", overlap)
        if inner_period is not None:
            raise InvalidArgument(
                f"overlap={overlap!r} with inner_period={inner_period} is not supported; use one of them"
            )
    outer = check_outer(outer_lr, outer_momentum)
    if outer is not None:
        check_averaging_option(rule, "outer_lr", outer[0])
        if delay:
            raise InvalidArgument(f"outer_lr/outer_momentum with overlap={overlap!r} is not supported")
    return delay, inner_period, outer


def check_averaging_option(rule: SyncRule, name: str, value: object) -> None:
    """An option of averaging rounds (compression, overlap, inner_period) is only for the rules that have them."""
    if not rule.averages_params:
        allowed = ", ".join(name for name, r in SYNC_RULES.items() if r.averages_params)
        raise InvalidArgument(
            f"{name}={value!r} changes averaging rounds; sync={rule.name!r} has none (allowed with {allowed})"
        )


def check_inner_period(rule: SyncRule, inner_period: int | None, period: int) -> int | None:
    """``inner_period`` (steps between averages within a node) is None, or in [1, period] and divides ``period``,
    for the averaging rules."""
    if inner_period is None:
        return None
    check_averaging_option(rule, "inner_period", inner_period)
    check_int("inner_period", inner_period, 1)
    if inner_period > period or period % inner_period:
        raise InvalidArgument(
            f"inner_period={inner_period} is not allowed with period={period}; the global round must fall on an "
            "inner one: inner_period must divide period"
        )
    return inner_period


def check_nodes(nodes: int | None, num_workers: int, inner_period: int | None) -> int | None:
    """``nodes`` (hierarchical rounds' groups of consecutive workers) divides the number of workers, and is given
    with ``inner_period`` only."""
    if nodes is None:
        return None
    if inner_period is None:
        raise InvalidArgument(f"nodes={nodes!r} groups workers for inner rounds; it needs inner_period=")
    check_int("nodes", nodes, 1)
    if num_workers % nodes:
        raise InvalidArgument(
            f"nodes={nodes} does not divide the {num_workers} workers; each node must hold as many workers"
        )
    return nodes


@dataclass
class CommStats:
    """Communication so far, per worker: ``rounds`` (collectives) and ``bytes`` (payload sent), of which
    ``node_rounds`` and ``node_bytes`` within a node (hierarchical runs' inner rounds)."""

    rounds: int = 0
    bytes: int = 0
    node_rounds: int = 0
    node_bytes: int = 0

    def record(self, nbytes: int, scope: Scope = "all") -> None:
        """Count one round that sent ``nbytes``; a round that sent nothing (a single worker) is not counted."""
        if nbytes > 0:
            self.rounds += 1
            self.bytes += nbytes
            if scope == "node":
                self.node_rounds += 1
                self.node_bytes += nbytes

    def add(self, other: CommStats) -> None:
        """Count ``other``'s rounds too (an overlapped round's, once it has been waited for)."""
        self.rounds += other.rounds
        self.bytes += other.bytes
        self.node_rounds += other.node_rounds
        self.node_bytes += other.node_bytes


class Communicator(Protocol):
    """The engine contract: where each field's tensors live, and how they are averaged or mixed across workers.

    ``average(fields)`` replaces the listed fields' tensors, in place, by their mean over all workers;
    ``mix(fields, step)`` replaces each worker's by sum_j W_ij x_j with the step's mixing matrix W (eq. 18). Both
    count in ``comm`` what one worker sent (nothing when it sent nothing). ``tensors(field)`` lists the field's
    tensors (one worker's, or stacked ``(N, ...)``), in the order the optimizer's param groups give them."""

    num_workers: int
    comm: CommStats

    def tensors(self, field: Field) -> list[Tensor]: ...

    def average(self, fields: Sequence[Field], scope: Scope = "all") -> None:
        """Replace the fields' tensors by their mean over all workers (``scope="all"``) or over the workers of each
        node (``"node"``), in place, and count it."""
        ...

    def average_tensors(self, tensors: list[Tensor]) -> None:
        """As :meth:`average` over all workers, of tensors that are not fields (an overlapped round's snapshot)."""
        ...

    def start(self, work: Callable[[Communicator], None]) -> Callable[[], None]:
        """Run ``work`` (an overlapped round's exchange) with a communicator for exchanges that overlap training,
        and return how to wait for it: at once on the simulator, on a background thread and a process group of
        its own under ``torch.distributed``. What it sends is counted in ``comm`` when it is waited for, on both
        engines alike."""
        ...

    def mix(self, fields: Sequence[Field], step: int) -> None: ...

    def elementwise(self, fields: Sequence[Field]) -> list[Tensor]:
        """The fields' tensors for elementwise work over all of them (compressed and overlapped rounds), with the
        workers as leading dimension: the stacked tensors, or one row (1, n) of a flat span where the engine keeps
        them contiguous."""
        ...

    def mean_residual(self, payload: Tensor, codec: Codec) -> Tensor: ...

    def average_payload(self, payload: Tensor, residual: Tensor, codec: Codec) -> None:
        """A compressed round's exchange (not a field: its payload, one row per worker, in the codec's dtype); see
        :class:`prsgd.algorithm.compression.PayloadExchange`. Counts the payload's bytes in ``comm``."""
        ...


@dataclass
class UpdateGroup:
    """Tensors that share one set of hyperparameters (one ``param_group`` of a torch optimizer)."""

    params: list[Tensor]
    grads: list[Tensor]
    momentum_buffers: list[Tensor]
    hyper: Hyperparameters


class PeriodicSync:
    """One run of a sync rule over some workers: the rule, the period I, the step counter and the communication.

    Args:
        sync: the rule's name (see :data:`SYNC_RULES`).
        period: I >= 1, local steps between rounds (ignored by ``"gradients"`` and ``"none"``).
        has_momentum: whether momentum buffers exist (momentum > 0 in some group).
        topology: whatever the engine builds its mixing from; only checked here (gossip rules need one).
        compression: ``None`` (exact rounds), ``"bf16"``, ``"fp16"`` or ``"int8"``: averaging rounds send the
            change since the last round in that format, with error feedback (:mod:`prsgd.algorithm.compression`); only
            for
            the rules that average parameters. :meth:`synchronize` stays exact.
        overlap: ``False`` (rounds applied at once), ``True`` or a delay in steps (1..period): an averaging
            round's exchange runs on a snapshot while local steps continue, and is applied ``delay`` steps later
            as x <- avg(snapshot) + (x - snapshot) (:mod:`prsgd.algorithm.overlap`).
        inner_period: hierarchical rounds: average within each node (exactly, over the fast link) every
            ``inner_period`` steps and over all workers every ``period`` steps; must divide ``period``. Momentum
            is averaged at both levels for Algorithm 1 (cleared at both for ``params_clear_momentum``). The
            engine knows the nodes.
        outer_lr, outer_momentum: an outer optimizer at every scheduled averaging round (DiLoCo: Nesterov
            momentum on the averaged change of the parameters, :mod:`prsgd.algorithm.outer`); on when either is given.
            1 and
            0 give Algorithm 1 exactly. Not with ``overlap``.
        engine: the engine's :class:`Communicator`; an engine that validates its arguments before building its
            storage (as both do) attaches it afterwards (``algorithm.engine = ...``), before the first step.

    Both engines and :func:`prsgd.experiments.problems.run` hold one; their ``steps_done``, ``comm``, ``in_consensus``
    and the
    ``"prsgd"`` part of their state dicts are this object's.
    """

    def __init__(
        self,
        sync: str,
        period: int,
        *,
        has_momentum: bool,
        topology: object = None,
        engine: Communicator | None = None,
        compression: str | None = None,
        overlap: bool | int = False,
        inner_period: int | None = None,
        outer_lr: float | None = None,
        outer_momentum: float | None = None,
    ) -> None:
        self.rule = sync_rule(sync)
        self.period = check_period(period)
        check_topology(self.rule, topology)
        check_compression_rule(self.rule, compression)
        delay, self.inner_period, outer = check_round_options(
            self.rule,
            self.period,
            overlap=overlap,
            inner_period=inner_period,
            outer_lr=outer_lr,
            outer_momentum=outer_momentum,
        )
        self.compression = CompressedRounds(compression) if compression is not None else None
        self.overlap = OverlappedRounds(delay) if delay else None
        self.outer = OuterOptimizer(*outer) if outer is not None else None
        self.engine: Communicator = engine  # type: ignore[assignment]
        self.has_momentum = has_momentum
        self.steps_done = 0
        self.synchronized_at: int | None = None

    @property
    def comm(self) -> CommStats:
        return self.engine.comm

    def round_after(self, step_number: int) -> bool:
        """Whether a round (eq. 6 or 18) follows local step number ``step_number`` (counted from 1)."""
        return self.rule.periodic and step_number % self.period == 0

    def inner_round_after(self, step_number: int) -> bool:
        """Whether a round within each node (and no global one) follows local step number ``step_number``."""
        return (
            self.inner_period is not None and step_number % self.inner_period == 0 and not self.round_after(step_number)
        )

    @property
    def communicates_next_step(self) -> bool:
        """Whether the next :meth:`step` communicates, or applies a round (gradients every step, a round after it,
        an inner round, or an overlapped round that completes)."""
        following = self.steps_done + 1
        return (
            self.rule.averages_gradients
            or self.round_after(following)
            or self.inner_round_after(following)
            or (self.overlap is not None and self.overlap.due == following)
        )

    def step(self, groups: Sequence[UpdateGroup], found_inf: bool | None = None) -> bool:
        """One step of every worker; returns whether the local update was applied.

        ``groups`` hold the tensors updated this step (those with a gradient). ``found_inf`` comes from AMP's
        GradScaler (None without one). A step whose update is skipped for it still counts towards the period, so
        every worker agrees on when the next round happens (the failure of PyTorch issue 76282 is a worker that
        does not). With ``sync="gradients"`` the float buffers (updated by this step's forward) and the gradients
        are averaged in one collective, and the skip is decided on the averaged gradients, identical everywhere.
        """
        apply_update = not found_inf
        if self.compression is not None and not self.compression.anchor:  # x^0: every worker starts equal
            self.compression.restart(self._round_tensors())
        if self.outer is not None and not self.outer.anchor:
            self.outer.rebase(self.engine.elementwise(("params",)))
        if self.rule.averages_gradients:
            self.engine.average(("buffers", "grads"))
            if found_inf is not None:
                apply_update = all(bool(g.isfinite().all()) for g in self.engine.tensors("grads"))
        if apply_update:
            for group in groups:
                momentum_sgd_(group.params, group.grads, group.momentum_buffers, **group.hyper.as_kwargs())
        self.steps_done += 1
        self._complete_due()  # a round started `delay` steps ago, before the next one starts
        if self.round_after(self.steps_done):
            self._round(exact=False)
            self._complete_due()  # delay 0: at once
        elif self.inner_round_after(self.steps_done):
            self.engine.average(self.rule.round_fields(), scope="node")
            self._clear_momentum_if_the_rule_does()
        return apply_update

    def synchronize(self) -> None:
        """One round now, outside the schedule (before evaluation, export or the end of training), with the exact
        average over all workers, gossip rules included (the point is one common model). Momentum is averaged,
        cleared or kept as the rule's own rounds do (``params_only``, ``gossip_params_only``, ``gradients`` and
        ``none`` keep each worker's; with ``gradients`` they are equal). Counted; the schedule is unchanged.
        An overlapped round in flight is completed first."""
        self._complete()
        self._round(exact=True)
        self.synchronized_at = self.steps_done

    def _round_tensors(self) -> list[Tensor]:
        return self.engine.elementwise(self.rule.round_fields())

    def _round(self, exact: bool) -> None:
        fields = self.rule.round_fields()
        if self.rule.mixes and not exact:
            self.engine.mix(fields, self.steps_done - 1)
        elif self.overlap is not None and not exact:
            self._start_overlapped()
            return  # momentum is cleared when the round is applied
        elif self.compression is not None and not exact:
            self.compression.round(self._round_tensors(), self.engine)
        else:
            self.engine.average(fields)
            if self.compression is not None:  # everything is sent now: the next change starts from here
                self.compression.restart(self._round_tensors())
        if self.outer is not None:
            self._outer_step(exact)
        self._clear_momentum_if_the_rule_does()

    def _outer_step(self, exact: bool) -> None:
        """After a scheduled round the outer optimizer's step (:mod:`prsgd.algorithm.outer`); after
        :meth:`synchronize` its
        anchor moves to the plain average."""
        params = self.engine.elementwise(("params",))
        if exact:
            self.outer.rebase(params)
            return
        self.outer.step(params)
        if self.compression is not None:  # the values every worker holds now
            self.compression.rebase(self._round_tensors())

    def _clear_momentum_if_the_rule_does(self) -> None:
        if self.rule.momentum == "clear":
            momentum = self.engine.tensors("momentum")
            if momentum:
                torch._foreach_zero_(momentum)

    def _start_overlapped(self) -> None:
        """Start an overlapped round (:mod:`prsgd.algorithm.overlap`) on the round's tensors as they are now."""
        tensors, compression = self._round_tensors(), self.compression
        if compression is not None:
            result = [compression.encode(tensors)]

            def exchange(engine: Communicator) -> None:
                compression.exchange(result[0], engine)
        else:
            result = [t.detach().clone() for t in tensors]

            def exchange(engine: Communicator) -> None:
                engine.average_tensors(result)

        due = self.steps_done + self.overlap.delay
        self.overlap.start(tensors, due, result, self.engine.start(exchange), self._finish_overlapped)

    def _finish_overlapped(self, exchanged: list[Tensor]) -> list[Tensor]:
        """avg(snapshot) from an overlapped round's exchanged result: itself, or the new compressed anchor."""
        return self.compression.decode(exchanged[0]) if self.compression is not None else exchanged

    def _complete_due(self) -> None:
        if self.overlap is not None and self.overlap.due == self.steps_done:
            self._complete()

    def _complete(self) -> None:
        """Apply the overlapped round in flight, if any: x <- avg(snapshot) + (x - snapshot)."""
        if self.overlap is not None and self.overlap.in_flight:
            self.overlap.complete(self._round_tensors())
            self._clear_momentum_if_the_rule_does()

    @property
    def in_consensus(self) -> bool:
        """Whether every worker holds the same parameters, float buffers and momentum now: all start equal;
        afterwards only right after a round that averages all of them (a scheduled one, or :meth:`synchronize`),
        or always with ``sync="gradients"`` (gradients and buffers are averaged every step). A checkpoint taken
        then may be resumed with a different number of workers."""
        if self.steps_done == 0 or self.rule.averages_gradients:
            return True
        full_round = self.rule.momentum != "keep" or not self.has_momentum
        if self.synchronized_at == self.steps_done:
            return full_round
        if self.overlap is not None and (self.overlap.delay or self.overlap.in_flight):
            return False  # every worker keeps its own progress made while the round was in flight
        return self.rule.averages_params and self.steps_done % self.period == 0 and full_round

    def state_dict(self) -> dict[str, Any]:
        """The one format both engines save: the rule and period, the number of workers, steps and communication."""
        if self.overlap is not None:
            self.overlap.wait()  # a round in flight is saved exchanged, and counted
        return {
            "sync": self.rule.name,
            "workers": self.engine.num_workers,
            "period": self.period,
            "steps_done": self.steps_done,
            "rounds": self.comm.rounds,
            "bytes": self.comm.bytes,
            **({"compression": self.compression.state_dict()} if self.compression is not None else {}),
            **({"overlap": self.overlap.state_dict()} if self.overlap is not None else {}),
            **({"outer": self.outer.state_dict()} if self.outer is not None else {}),
            **(
                {"node_rounds": self.comm.node_rounds, "node_bytes": self.comm.node_bytes}
                if self.inner_period is not None
                else {}
            ),
        }

    def load_state_dict(self, state: dict[str, Any], *, from_consensus: bool = False) -> None:
        """Restore :meth:`state_dict` output. The rule must be the same (momentum means something else under
        another); the period may change (later rounds follow the new one). A state of another number of workers
        is refused unless ``from_consensus`` says it was taken in consensus (:attr:`in_consensus`); the step
        counter is then rescaled so that the run continues at the same joint epoch (steps x workers kept)."""
        if state.get("sync", self.rule.name) != self.rule.name:
            raise CheckpointError(
                f"the state was saved with sync={state['sync']!r}; this run uses sync={self.rule.name!r}"
            )
        saved, workers = int(state.get("workers", self.engine.num_workers)), self.engine.num_workers
        if saved != workers and not from_consensus:
            raise CheckpointError(
                f"the state was saved by {saved} workers; this run has {workers} (a state taken in consensus can "
                "be loaded with from_consensus=True)"
            )
        self.steps_done = rescaled_steps(int(state["steps_done"]), saved, workers)
        in_flight = state.get("overlap", {}).get("due") is not None
        if in_flight and (self.overlap is None or from_consensus):
            raise CheckpointError(
                "the state was saved with an overlapped round in flight; continue it with overlap= on the same "
                "workers, or save after synchronize()"
            )
        self.comm.rounds, self.comm.bytes = int(state["rounds"]), int(state["bytes"])
        self.comm.node_rounds, self.comm.node_bytes = int(state.get("node_rounds", 0)), int(state.get("node_bytes", 0))
        self.synchronized_at = None
        if self.outer is not None:
            params = self.engine.elementwise(("params",))
            if "outer" in state and not from_consensus:
                self.outer.load_state_dict(state["outer"], params)
            else:
                self.outer.velocity = []
                self.outer.rebase(params)
        if self.overlap is not None:
            self.overlap.load_state_dict(state.get("overlap", {}), self._round_tensors(), self._finish_overlapped)
        if self.compression is not None:
            # a consensus state continued by another number of workers starts afresh from its (common) values;
            # call this after the engine's tensors are loaded
            if "compression" in state and not from_consensus:
                self.compression.load_state_dict(state["compression"], self._round_tensors())
            else:
                self.compression.restart(self._round_tensors())


class FollowsAlgorithm:
    """An engine's view of the :class:`PeriodicSync` it holds as ``self.algorithm``: its rule, period, counters
    and consensus, read-only (both engines expose them under these names)."""

    algorithm: PeriodicSync

    @property
    def rule(self) -> SyncRule:
        return self.algorithm.rule

    @property
    def period(self) -> int:
        return self.algorithm.period

    @property
    def steps_done(self) -> int:
        """Local steps taken so far (each worker's count; rounds follow every ``period``-th)."""
        return self.algorithm.steps_done

    @property
    def synchronized_at(self) -> int | None:
        """The step after which ``synchronize()`` last ran (None if not since the last load)."""
        return self.algorithm.synchronized_at

    @property
    def comm(self) -> CommStats:
        """Communication so far, per worker: rounds and payload bytes."""
        return self.algorithm.comm

    @property
    def in_consensus(self) -> bool:
        """Whether every worker holds the same parameters, float buffers and momentum now: at the start, right
        after a round that averages all three (or ``synchronize()``), and always with ``sync="gradients"`` (see
        :attr:`PeriodicSync.in_consensus`)."""
        return self.algorithm.in_consensus

    def _group_hyperparameters(self, index: int, group: dict[str, Any]) -> Hyperparameters:
        """A param group's hyperparameters, validated when they change (a ``torch.optim.lr_scheduler`` sets ``lr``,
        some also ``momentum``, between steps). Momentum buffers exist only if the engine was built with momentum:
        turning momentum on later is refused (until the engine sets ``_built``, any value is allowed)."""
        key = (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"])
        cache: dict[int, tuple[tuple, Hyperparameters]] = self.__dict__.setdefault("_hyper", {})
        cached = cache.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        hyper = Hyperparameters(*key)
        if hyper.momentum > 0 and getattr(self, "_built", True) and not self.algorithm.has_momentum:
            raise InvalidArgument(
                f"momentum={hyper.momentum!r} was set after {type(self).__name__} was built with momentum 0; "
                "momentum buffers are allocated at construction: construct it with momentum > 0"
            )
        cache[index] = (key, hyper)
        return hyper


def rescaled_steps(steps_done: int, saved_workers: int, workers: int) -> int:
    """The step counter that keeps the joint epoch (steps x workers) when a consensus state of ``saved_workers``
    workers continues with ``workers``."""
    return round(steps_done * saved_workers / workers)
