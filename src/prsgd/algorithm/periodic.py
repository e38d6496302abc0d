"""Algorithm 1 (PR-SGD-Momentum), Algorithm 2 and their baselines as one object, written once for every engine.

:class:`PeriodicSync` runs a :class:`~prsgd.algorithm.round.RoundSpec` over some workers: it composes the round's
stages (the schedule, the exchange, and when asked for the overlap and the outer step), counts steps, and keeps one
state-dict format. An engine hands it its :class:`~prsgd.algorithm.contract.Communicator` and calls
:meth:`PeriodicSync.step` once per step of every worker:

1. ``sync="gradients"`` only: average the gradients (parallel mini-batch momentum SGD);
2. the local rule's update (:mod:`prsgd.algorithm.local`: momentum SGD, eq. 4 or 5, or AdamW);
3. after every ``period``-th step, the rule's round through the exchange stage: average (eq. 6), mix through W
   (eq. 18) or a compressed average; with overlap it starts now and is applied ``delay`` steps later; then the outer
   step, and the optimizer state averaged, cleared or kept as the rule says.

Floating-point model buffers (BatchNorm running statistics) travel with the parameters at every round; with
``sync="gradients"`` they are averaged at every step, in the gradients' collective, so that all workers stay
identical (DDP instead broadcasts rank 0's buffers before every forward). Integer buffers (BatchNorm's
``num_batches_tracked``) are equal on all workers by construction and are not communicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from prsgd.algorithm.contract import CommStats, Communicator
from prsgd.algorithm.exchange import make_exchange
from prsgd.algorithm.local import LOCAL_RULE, LocalRule, UpdateGroup
from prsgd.algorithm.outer import OuterOptimizer
from prsgd.algorithm.overlap import OverlappedRounds
from prsgd.algorithm.round import RoundSpec
from prsgd.algorithm.rules import SyncRule
from prsgd.algorithm.schedule import make_schedule
from prsgd.errors import CheckpointError, InvalidArgument


class PeriodicSync:
    """One run of a :class:`RoundSpec` over some workers: its stages, the step counter and the communication.

    Args:
        spec: the round's description (rule, period and options), checked when it was built.
        has_state: whether the local rule keeps optimizer state (momentum > 0 in some group); the engine may set
            ``has_state`` once it knows.
        engine: the engine's :class:`Communicator`; an engine that validates its arguments before building its
            storage (as both do) attaches it afterwards with :meth:`attach`, before the first step.
        local_rule: the update between rounds and the state it keeps by name (:mod:`prsgd.algorithm.local`).

    The stages are attributes: ``schedule``, ``exchange`` (exact, mixing or compressed), ``overlap`` and ``outer``
    (None when off). Both engines and :func:`prsgd.experiments.problems.run` hold one; their ``steps_done``,
    ``comm``, ``in_consensus`` and the ``"prsgd"`` part of their state dicts are this object's.
    """

    def __init__(
        self,
        spec: RoundSpec,
        *,
        has_state: bool,
        engine: Communicator | None = None,
        local_rule: LocalRule = LOCAL_RULE,
    ) -> None:
        if not isinstance(spec, RoundSpec):
            raise InvalidArgument(f"PeriodicSync takes a prsgd.RoundSpec, not {type(spec).__name__}")
        self.spec, self.rule, self.period = spec, spec.rule, spec.period
        local_rule.check_round(spec)
        self.local_rule = local_rule
        self.schedule = make_schedule(spec)
        self.exchange = make_exchange(spec)
        self.overlap = OverlappedRounds.from_spec(spec)
        self.outer = OuterOptimizer.from_spec(spec)
        self.engine: Communicator = engine  # type: ignore[assignment]
        self.has_state = has_state
        self.steps_done = 0
        self.synchronized_at: int | None = None

    def state_layout(self, names: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The local rule's state tensors ``names`` split into those rounds send (field ``"state"``) and those that
        stay local (``"local_state"``), as ``sync_state`` says; :class:`InvalidArgument` for a name the rule does not
        keep. Engines lay their state out by it."""
        wanted = self.spec.sync_state
        if wanted is None:
            return names, ()
        kept = self.local_rule.STATE
        unknown = [n for n in wanted if n not in kept]
        if unknown:
            raise InvalidArgument(
                f"sync_state names {unknown[0]!r}, which optimizer={self.local_rule.name!r} does not keep; it keeps "
                f"{', '.join(kept) if kept else 'no state tensors by name'}"
            )
        return tuple(n for n in names if n in wanted), tuple(n for n in names if n not in wanted)

    @property
    def local_state_names(self) -> tuple[str, ...]:
        """The state tensors rounds never send (those ``sync_state`` leaves out)."""
        return self.state_layout(self.local_rule.state_names(self.has_state))[1]

    def attach(self, engine: Communicator) -> None:
        """Take ``engine``'s tensors, which hold x^0 (the same on every worker), as the stages' starting point: the
        compressed exchange's anchor and the outer step's. Engines call it once they hold x^0, before the first
        forward pass (which changes BatchNorm statistics per worker)."""
        self.engine = engine
        self.take_x0()

    def take_x0(self) -> None:
        """The stages whose starting point is still to be taken (after :meth:`attach`, or after loading a state
        that restarts them) take it from the engine's tensors as they are now, which must be in consensus."""
        if self.exchange.needs_start:
            self.exchange.restart(self._round_tensors())
        if self._outer_needs_start:
            self.outer.rebase(self.engine.elementwise(("params",)))

    @property
    def _outer_needs_start(self) -> bool:
        return self.outer is not None and not self.outer.anchor

    @property
    def inner_period(self) -> int | None:
        return self.schedule.inner_period

    @property
    def comm(self) -> CommStats:
        return self.engine.comm

    @property
    def communicates_next_step(self) -> bool:
        """Whether the next :meth:`step` communicates, or applies a round (gradients every step, a round after it,
        an inner round, or an overlapped round that completes)."""
        following = self.steps_done + 1
        return (
            self.rule.averages_gradients
            or self.schedule.round_after(following) is not None
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
        if self.exchange.needs_start or self._outer_needs_start:
            raise RuntimeError("PeriodicSync.step before take_x0(): the round's stages have no starting point")
        if self.rule.averages_gradients:
            self.engine.average(("buffers", "grads"))
            if found_inf is not None:
                apply_update = all(bool(g.isfinite().all()) for g in self.engine.tensors("grads"))
        if apply_update:
            self.local_rule.step_(groups)
        self.steps_done += 1
        self._complete_due()  # a round started `delay` steps ago, before the next one starts
        scope = self.schedule.round_after(self.steps_done)
        if scope == "all":
            self._round(exact=False)
            self._complete_due()  # delay 0: at once
        elif scope == "node":
            self.engine.average(self.rule.round_fields(), scope="node")
            self._apply_state_rule()
        self.comm.end_step()
        return apply_update

    def synchronize(self) -> None:
        """One round now, outside the schedule (before evaluation, export or the end of training), with the exact
        average over all workers, gossip rules included (the point is one common model). The optimizer state is
        averaged, cleared or kept as the rule's own rounds do (``params_only``, ``gossip_params_only``,
        ``gradients`` and ``none`` keep each worker's; with ``gradients`` they are equal). Counted; the schedule is
        unchanged. An overlapped round in flight is completed first."""
        self._complete()
        self._round(exact=True)
        self.comm.end_step()
        self.synchronized_at = self.steps_done

    def _round_tensors(self) -> list[Tensor]:
        return self.engine.elementwise(self.rule.round_fields())

    def _round(self, exact: bool) -> None:
        fields = self.rule.round_fields()
        if exact:
            self.engine.average(fields)
            if self.exchange.anchored:  # everything is sent now: the next change starts here
                self.exchange.restart(self._round_tensors())
        elif self.overlap is not None:
            self.overlap.start_round(self._round_tensors(), self.exchange, self.engine, self.steps_done)
            return  # the state rule applies when the round is applied
        else:
            if not self.spec.sends_state_after(self.steps_done):  # state_period: the state waits for a later round
                fields = ("params", "buffers")
            self.exchange.exchange_round(self.engine, fields, self.steps_done - 1)
        if self.outer is not None:
            self._outer_step(exact)
        self._apply_state_rule()

    def _outer_step(self, exact: bool) -> None:
        """After a scheduled round the outer optimizer's step (:mod:`prsgd.algorithm.outer`); after
        :meth:`synchronize` its anchor moves to the plain average."""
        params = self.engine.elementwise(("params",))
        if exact:
            self.outer.rebase(params)
            return
        self.outer.step(params)
        if self.exchange.anchored:
            self.exchange.rebase(self._round_tensors())  # the values every worker holds now

    def _apply_state_rule(self) -> None:
        """Clear the optimizer state after a round, for the rules that do, and restart the local rule's counters (a
        fresh optimizer: AdamW's bias correction starts again); averaging the state is the round's own work."""
        if self.rule.state == "clear":
            state = [*self.engine.tensors("state"), *self.engine.tensors("local_state")]
            self.local_rule.clear_(state, self.engine.counters)

    def _complete_due(self) -> None:
        if self.overlap is not None and self.overlap.due == self.steps_done:
            self._complete()

    def _complete(self) -> None:
        """Apply the overlapped round in flight, if any: x <- avg(snapshot) + (x - snapshot)."""
        if self.overlap is not None and self.overlap.in_flight:
            self.overlap.complete(self._round_tensors())
            self._apply_state_rule()

    @property
    def in_consensus(self) -> bool:
        """Whether every worker holds the same parameters, float buffers and optimizer state now: all start equal;
        afterwards only right after a round that averages all of them (a scheduled one, or :meth:`synchronize`),
        or always with ``sync="gradients"`` (gradients and buffers are averaged every step). A checkpoint taken
        then may be resumed with a different number of workers."""
        if self.steps_done == 0 or self.rule.averages_gradients:
            return True
        # the state is equal everywhere after an exact round when there is none, it is cleared, or all of it is sent
        state_equal = not self.has_state or self.rule.state == "clear"
        state_equal = state_equal or (self.rule.state == "average" and not self.local_state_names)
        if self.synchronized_at == self.steps_done:
            return state_equal
        if self.overlap is not None and (self.overlap.delay or self.overlap.in_flight):
            return False  # every worker keeps its own progress made while the round was in flight
        if self.has_state and self.rule.state == "average" and not self.spec.sends_state_after(self.steps_done):
            return False  # state_period: this round left the state out
        return self.rule.averages_params and self.schedule.ends_a_period(self.steps_done) and state_equal

    def _stages(self) -> list[Any]:
        """The stages that keep state, in the order they are restored."""
        return [s for s in (self.outer, self.overlap, self.exchange) if s is not None and s.key is not None]

    def state_dict(self) -> dict[str, Any]:
        """The one format both engines save: the rule and period, the number of workers, steps and communication,
        and each stage's state under its key (``"compression"``, ``"overlap"``, ``"outer"``)."""
        if self.overlap is not None:
            self.overlap.wait()  # a round in flight is saved exchanged, and counted
        nodes = self.inner_period is not None
        return {
            "sync": self.rule.name,
            "workers": self.engine.num_workers,
            "period": self.period,
            "steps_done": self.steps_done,
            "rounds": self.comm.rounds,
            "bytes": self.comm.bytes,
            "peak_step_bytes": self.comm.peak_step_bytes,
            **{stage.key: stage.state_dict() for stage in reversed(self._stages())},
            **({"node_rounds": self.comm.node_rounds, "node_bytes": self.comm.node_bytes} if nodes else {}),
            **({"synchronized_at": self.synchronized_at} if self.synchronized_at is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any], *, from_consensus: bool = False) -> None:
        """Restore :meth:`state_dict` output. The rule must be the same (the optimizer state means something else
        under another); the period may change (later rounds follow the new one). A state of another number of
        workers is refused unless ``from_consensus`` says it was taken in consensus (:attr:`in_consensus`); the step
        counter is then rescaled so that the run continues at the same joint epoch (steps x workers kept). Stages
        without a saved state (or all, ``from_consensus``) restart from the loaded values: the engine calls
        :meth:`take_x0` once its tensors hold them (before the next forward pass), whatever order the model and the
        optimizer were loaded in."""
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
        self.comm.peak_step_bytes = int(state.get("peak_step_bytes", 0))  # states saved before it was counted: 0
        self.comm.node_rounds, self.comm.node_bytes = int(state.get("node_rounds", 0)), int(state.get("node_bytes", 0))
        synchronized = state.get("synchronized_at")  # a consensus state continued by other workers: at its step
        self.synchronized_at = None if synchronized is None else rescaled_steps(int(synchronized), saved, workers)
        # a consensus state continued by another number of workers starts afresh from its (common) values
        if self.outer is not None:
            if "outer" in state and not from_consensus:
                self.outer.load_state_dict(state["outer"], self.engine.elementwise(("params",)))
            else:
                self.outer.forget()
        if self.overlap is not None:
            self.overlap.load_state_dict(state.get("overlap", {}), self._round_tensors(), self.exchange.averaged)
        if self.exchange.anchored:
            if self.exchange.key in state and not from_consensus:
                self.exchange.load_state_dict(state[self.exchange.key], self._round_tensors())
            else:
                self.exchange.forget()


class FollowsAlgorithm:
    """An engine's view of the :class:`PeriodicSync` it holds as ``self.algorithm``: its rule, period, counters
    and consensus, read-only (both engines expose them under these names)."""

    algorithm: PeriodicSync

    @property
    def round(self) -> RoundSpec:
        """The round's description (rule, period and every option)."""
        return self.algorithm.spec

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

    def _group_hyperparameters(self, index: int, group: dict[str, Any]) -> Any:
        """A param group's hyperparameters for the local rule, validated when they change (a
        ``torch.optim.lr_scheduler`` sets ``lr``, some also ``momentum`` or ``betas``, between steps). Momentum
        buffers exist only if the engine was built with momentum: turning momentum on later is refused (until the
        engine sets ``_built``, any value is allowed)."""
        rule = self.algorithm.local_rule
        key = rule.watched(group)
        cache: dict[int, tuple[tuple, Any]] = self.__dict__.setdefault("_hyper", {})
        cached = cache.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        hyper = rule.hyperparameters(group)
        if getattr(hyper, "momentum", 0) > 0 and getattr(self, "_built", True) and not self.algorithm.has_state:
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
