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
from prsgd.algorithm.drift import DriftMeter
from prsgd.algorithm.exchange import ExactExchange, Exchange, make_exchange
from prsgd.algorithm.fragments import fragment_tensors
from prsgd.algorithm.local import LOCAL_RULE, LocalRule, UpdateGroup
from prsgd.algorithm.outer import OuterOptimizer
from prsgd.algorithm.overlap import OverlappedRounds
from prsgd.algorithm.round import RoundSpec
from prsgd.algorithm.rules import Field
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
    (None when off); with ``fragments`` F > 1, ``exchanges`` and ``outers`` hold one exchange and one outer step per
    fragment (``exchange`` and ``outer`` are the first's), each over its fragment's views
    (:mod:`prsgd.algorithm.fragments`). Both engines and :func:`prsgd.experiments.problems.run` hold one; their
    ``steps_done``, ``comm``, ``in_consensus``, ``drift`` (:class:`~prsgd.algorithm.drift.DriftMeter`: how far the
    workers drifted apart before each round) and the ``"prsgd"`` part of their state dicts are this object's.
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
        self.fragments = spec.fragments or 1
        self.exchanges = [make_exchange(spec) for _ in range(self.fragments)]
        self.outers = [OuterOptimizer.from_spec(spec) for _ in range(self.fragments)]
        self.overlap = OverlappedRounds.from_spec(spec)
        self.engine: Communicator = engine  # type: ignore[assignment]
        self.has_state = has_state
        self.steps_done = 0
        self.fragment_in_flight = 0  # the fragment an overlapped round in flight started on
        self.synchronized_at: int | None = None
        self.drift = DriftMeter()

    @property
    def exchange(self) -> Exchange:
        """The (first fragment's) exchange stage."""
        return self.exchanges[0]

    @property
    def outer(self) -> OuterOptimizer | None:
        """The (first fragment's) outer step, or None without one."""
        return self.outers[0]

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
        forward pass (which changes BatchNorm statistics per worker). With fragments, the parameters must have at
        least one value per fragment (:class:`InvalidArgument` otherwise)."""
        self.engine = engine
        values = sum(t[0].numel() for t in engine.elementwise(("params",)))
        if values < self.fragments:
            raise InvalidArgument(
                f"fragments={self.fragments} is more than the {values} values of the model's parameters; each "
                "fragment must hold some: use at most that many"
            )
        self.take_x0()

    def take_x0(self) -> None:
        """The stages whose starting point is still to be taken (after :meth:`attach`, or after loading a state
        that restarts them) take it from the engine's tensors as they are now, which must be in consensus."""
        self._start_stages(every=False)

    def _start_stages(self, every: bool) -> None:
        """Each fragment's anchored exchange restarts, and its outer step rebases, from the engine's tensors as they
        are now (in consensus): ``every`` one (after an exact round, everything is sent), or those not started."""
        for f, exchange in enumerate(self.exchanges):
            if exchange.anchored and (every or exchange.needs_start):
                exchange.restart(self._round_tensors(f))
        for f, outer in enumerate(self.outers):
            if outer is not None and (every or not outer.anchor):
                outer.rebase(self._tensors(f, ("params",)))

    @property
    def _needs_start(self) -> bool:
        return any(e.needs_start for e in self.exchanges) or any(o is not None and not o.anchor for o in self.outers)

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
        if self._needs_start:
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

    def _tensors(self, f: int, fields: Sequence[Field]) -> list[Tensor]:
        """The fields' tensors of fragment ``f`` for elementwise work (all of them without fragments)."""
        return fragment_tensors(self.engine, fields, f, self.fragments)

    def _round_tensors(self, f: int = 0) -> list[Tensor]:
        return self._tensors(f, self.rule.round_fields())

    def _round(self, exact: bool) -> None:
        fields = self.rule.round_fields()
        if exact:
            self.engine.average(fields)
            self._start_stages(every=True)  # the next change, and the outer step, start from the plain average
            self._apply_state_rule()
            return
        f = self.schedule.fragment_after(self.steps_done)
        if not self.spec.sends_state_after(self.steps_done):  # state_period: the state waits for a later round
            fields = ("params", "buffers")
        averages = type(self.exchange) is ExactExchange and self.overlap is None and self.fragments == 1
        measured = self.drift.before_round(self.engine, self.steps_done, fields if averages else ())
        if self.overlap is not None:
            self.fragment_in_flight = f
            self.overlap.start_round(self._round_tensors(f), self.exchanges[f], self.engine, self.steps_done)
            return  # the state rule applies when the round is applied
        if self.fragments > 1:
            self.exchanges[f].round_of(self._round_tensors(f), self.engine, self.steps_done - 1)
        else:
            self.exchange.exchange_round(self.engine, fields, self.steps_done - 1)
        if measured is not None:  # before the outer step moves the average
            measured()
        if self.outers[f] is not None:  # the outer optimizer's step (:mod:`prsgd.algorithm.outer`)
            self.outers[f].step(self._tensors(f, ("params",)))
            if self.exchanges[f].anchored:
                self.exchanges[f].rebase(self._round_tensors(f))  # the values every worker holds now
        self._apply_state_rule(f)

    def _apply_state_rule(self, f: int | None = None) -> None:
        """Clear the optimizer state after a round (of fragment ``f``'s state only, with fragments), for the rules
        that do, and restart the local rule's counters (a fresh optimizer: AdamW's bias correction starts again);
        averaging the state is the round's own work."""
        if self.rule.state != "clear":
            return
        if f is None or self.fragments == 1:
            state = [*self.engine.tensors("state"), *self.engine.tensors("local_state")]
            self.local_rule.clear_(state, self.engine.counters)
        else:  # rules with counters refuse fragments with this rule (a counter is per parameter, not per value)
            self.local_rule.clear_(self._tensors(f, ("state",)), [])

    def _complete_due(self) -> None:
        if self.overlap is not None and self.overlap.due == self.steps_done:
            self._complete()

    def _complete(self) -> None:
        """Apply the overlapped round in flight, if any: x <- avg(snapshot) + (x - snapshot), over the fragment it
        started on."""
        if self.overlap is not None and self.overlap.in_flight:
            self.overlap.complete(self._round_tensors(self.fragment_in_flight))
            self._apply_state_rule(self.fragment_in_flight)

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
        if self.fragments > 1:
            return False  # a fragment's round leaves the others as each worker holds them
        if self.overlap is not None and (self.overlap.delay or self.overlap.in_flight):
            return False  # every worker keeps its own progress made while the round was in flight
        if self.has_state and self.rule.state == "average" and not self.spec.sends_state_after(self.steps_done):
            return False  # state_period: this round left the state out
        return self.rule.averages_params and self.schedule.ends_a_period(self.steps_done) and state_equal

    def _stage_states(self) -> dict[str, Any]:
        """Each stage's state under its key; with fragments, a list of one per fragment for the outer step and the
        exchange."""

        def per_fragment(stages: list[Any]) -> Any:
            return stages[0].state_dict() if self.fragments == 1 else [s.state_dict() for s in stages]

        states: dict[str, Any] = {}
        if self.exchange.key is not None:
            states[self.exchange.key] = per_fragment(self.exchanges)
        if self.overlap is not None:  # with the fragment it started on: a later period moves the schedule, not it
            states[self.overlap.key] = {**self.overlap.state_dict(), "fragment": self.fragment_in_flight}
        if self.outer is not None:
            states[self.outer.key] = per_fragment(self.outers)
        return states

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
            **({"fragments": self.fragments} if self.fragments > 1 else {}),
            **self._stage_states(),
            **({"node_rounds": self.comm.node_rounds, "node_bytes": self.comm.node_bytes} if nodes else {}),
            **({"synchronized_at": self.synchronized_at} if self.synchronized_at is not None else {}),
            **({"drift": pending} if (pending := self.drift.state_dict()) else {}),
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
        fragments = int(state.get("fragments", 1))
        if fragments != self.fragments and not from_consensus:
            raise CheckpointError(
                f"the state was saved with fragments={fragments}; this run uses fragments={self.fragments} (a state "
                "taken in consensus, after synchronize(), can be loaded with from_consensus=True)"
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
        self.drift.load_state_dict(state.get("drift", []))
        synchronized = state.get("synchronized_at")  # a consensus state continued by other workers: at its step
        self.synchronized_at = None if synchronized is None else rescaled_steps(int(synchronized), saved, workers)
        # a consensus state continued by another number of workers starts afresh from its (common) values
        restored = not from_consensus
        if self.outer is not None:
            saved_outer = self._per_fragment(state.get("outer") if restored else None)
            for f, outer in enumerate(self.outers):
                if saved_outer:
                    outer.load_state_dict(saved_outer[f], self._tensors(f, ("params",)))
                else:
                    outer.forget()
        if self.overlap is not None:
            overlap = state.get("overlap", {})
            self.fragment_in_flight = f = int(overlap.get("fragment", 0))  # states saved before fragments: 0
            self.overlap.load_state_dict(overlap, self._round_tensors(f), self.exchanges[f].averaged)
        if self.exchange.anchored:
            saved_exchange = self._per_fragment(state.get(self.exchange.key) if restored else None)
            for f, exchange in enumerate(self.exchanges):
                if saved_exchange:
                    exchange.load_state_dict(saved_exchange[f], self._round_tensors(f))
                else:
                    exchange.forget()

    def _per_fragment(self, saved: Any) -> list[dict[str, Any]] | None:
        """A stage's saved state as one per fragment (None if not saved)."""
        if saved is None:
            return None
        return [saved] if self.fragments == 1 else list(saved)


def rescaled_steps(steps_done: int, saved_workers: int, workers: int) -> int:
    """The step counter that keeps the joint epoch (steps x workers) when a consensus state of ``saved_workers``
    workers continues with ``workers``."""
    return round(steps_done * saved_workers / workers)
