"""An engine's view of the algorithm it runs: rule, period, counters and consensus, read-only, and the validation of
a param group's hyperparameters for the local rule. Both engines and the integrations' wrappers inherit it."""

from __future__ import annotations

from typing import Any

from prsgd.algorithm.contract import CommStats
from prsgd.algorithm.drift import DriftMeter
from prsgd.algorithm.periodic import PeriodicSync
from prsgd.algorithm.round import RoundSpec
from prsgd.algorithm.rules import SyncRule
from prsgd.errors import InvalidArgument


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
    def drift(self) -> DriftMeter:
        """How far the workers drifted apart before each round (:mod:`prsgd.algorithm.drift`): ``drift.latest``,
        ``drift.take()``; ``drift.on = False`` stops measuring."""
        return self.algorithm.drift

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
