"""When rounds happen: after every ``period``-th local step (eq. 6), and in hierarchical runs within each node after
every ``inner_period``-th step that is not a global round.

A schedule is a pure choice over the step count (optax's ``periodic_update``): it keeps no state of its own, the
step counter is :class:`prsgd.algorithm.periodic.PeriodicSync`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prsgd.algorithm.rules import Scope, SyncRule

if TYPE_CHECKING:
    from prsgd.algorithm.round import RoundSpec


class FlatSchedule:
    """A round over all workers after every ``period``-th step, for the rules that have periodic rounds; with
    ``fragments`` F, a round of one fragment after every ``period / F``-th step (:mod:`prsgd.algorithm.fragments`)."""

    inner_period: int | None = None

    def __init__(self, rule: SyncRule, period: int, fragments: int = 1) -> None:
        self.rule, self.period, self.fragments = rule, period, fragments
        self.every = period // fragments

    def round_after(self, step_number: int) -> Scope | None:
        """Which round follows local step number ``step_number`` (counted from 1): ``"all"``, ``"node"`` or None."""
        return "all" if self.rule.periodic and step_number % self.every == 0 else None

    def fragment_after(self, step_number: int) -> int:
        """The fragment whose round follows local step number ``step_number`` (0 without fragments)."""
        return step_number % self.period // self.every

    def ends_a_period(self, step_number: int) -> bool:
        return step_number % self.period == 0


class HierarchicalSchedule(FlatSchedule):
    """As :class:`FlatSchedule`, and a round within each node after every ``inner_period``-th step that is not a
    global round (``inner_period`` divides ``period``, so a global round always falls on an inner one)."""

    def __init__(self, rule: SyncRule, period: int, inner_period: int) -> None:
        super().__init__(rule, period)
        self.inner_period = inner_period

    def round_after(self, step_number: int) -> Scope | None:
        return super().round_after(step_number) or ("node" if step_number % self.inner_period == 0 else None)


def make_schedule(spec: RoundSpec) -> FlatSchedule:
    """The schedule ``spec`` describes."""
    if spec.inner_period is None:
        return FlatSchedule(spec.rule, spec.period, spec.fragments or 1)
    return HierarchicalSchedule(spec.rule, spec.period, spec.inner_period)
