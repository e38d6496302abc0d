"""How far the workers have drifted apart just before each round: the consensus distance and the state's spread.

The consensus distance is D = (1/N) sum_i ||x_i - x_bar||^2 over the model's parameters (float buffers left out),
the quantity the paper's analysis bounds between rounds (its Lemma 5 for Algorithm 1: terms in gamma^2 I sigma^2
and gamma^2 I^2 zeta^2); the state's spread is the same over the optimizer state tensors (momentum buffers, AdamW's
``exp_avg`` and ``exp_avg_sq``). Both are measured before every scheduled round over all workers (a hierarchical
run's node rounds are not measured), by the algorithm, whichever engine holds the workers:

- an engine that holds every worker's tensors (the simulator) gives them exactly, for every rule: the sum over
  coordinates of the variance over workers;
- an engine that holds one worker's (:class:`prsgd.LocalSGD`) cannot form x_bar without sending x, so it measures
  the rounds that form it anyway, an exact average (Algorithm 1, its baselines, DiLoCo's inner average), through
  D = mean_i ||x_i||^2 - ||x_bar||^2: each worker's squared norm before the round, ||x_bar||^2 after it, and one
  all-reduce of two float64 numbers per round, which is a measurement and not counted in ``comm``. The state's
  spread is measured there when the round averages all of it (and when parameters or state are 16-bit, not at all:
  rounding ||x||^2 to 16 bits errs by more than the drift). Gossip, compressed, overlapped and fragment rounds,
  and fault-tolerant runs (whose rounds may fail and run again), are not measured on LocalSGD: their values are None,
  never an estimate.

``meter.on = False`` turns the measurement off (its cost is in ``benchmarks/README.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from prsgd.algorithm.contract import Communicator
from prsgd.algorithm.rules import Field

STATE_FIELDS: tuple[Field, ...] = ("state", "local_state")


@dataclass(frozen=True)
class Drift:
    """One round's measurement: after ``step`` local steps, just before the round."""

    step: int
    consensus_distance: float
    state_spread: float | None
    """None where the rule keeps no state, or the engine could not measure it."""


class DriftMeter:
    """Measures each round's :class:`Drift` (see the module docstring); :meth:`take` gives the mean over the rounds
    measured since it was last called, as a training run's log records it."""

    def __init__(self) -> None:
        self.on = True
        self.latest: Drift | None = None
        self._since: list[Drift] = []

    def before_round(self, engine: Communicator, step: int, averaged: Sequence[Field]) -> Callable[[], None] | None:
        """Measure before a scheduled round of ``engine``'s workers after ``step`` steps. ``averaged``: the fields
        the round replaces by their exact mean over all workers (what one-worker engines need). Returns what to
        call right after the round's exchange to finish the measurement, or None (measured already, or not
        measurable)."""
        if not self.on or engine.num_workers < 2:
            return None
        if engine.holds_every_worker:
            state = _tensors(engine, STATE_FIELDS)
            self._add(Drift(step, _variance_sum(engine.tensors("params")), _variance_sum(state) if state else None))
            return None
        if "params" not in averaged:
            return None
        params, state = engine.elementwise(("params",)), engine.tensors("state")  # params: one span on LocalSGD
        if not params or not _precise(params):
            return None
        measure_state = "state" in averaged and bool(state) and not engine.tensors("local_state") and _precise(state)
        groups = [params, *([state] if measure_state else [])]
        before = torch.stack([_square_norm(ts) for ts in groups])

        def after() -> None:
            mean = engine.worker_mean(before)
            if mean is None:
                return
            after_round = torch.stack([_square_norm(ts) for ts in groups])
            values = (mean - after_round).clamp_min(0).tolist()
            self._add(Drift(step, values[0], values[1] if measure_state else None))

        return after

    def _add(self, drift: Drift) -> None:
        self.latest = drift
        self._since.append(drift)

    def state_dict(self) -> list[list[float | None]]:
        """The rounds measured since the last :meth:`take`, which a run resumed mid-way still logs."""
        return [[d.step, d.consensus_distance, d.state_spread] for d in self._since]

    def load_state_dict(self, state: Sequence[Sequence[float | None]]) -> None:
        self._since = [Drift(int(step), float(distance), spread) for step, distance, spread in state]  # type: ignore[arg-type]
        self.latest = self._since[-1] if self._since else None

    def take(self) -> dict[str, float | None]:
        """``consensus_distance`` and ``state_spread``: their means over the rounds measured since the last call
        (None when none was), and forget them."""
        since, self._since = self._since, []
        spreads = [d.state_spread for d in since if d.state_spread is not None]
        return {
            "consensus_distance": sum(d.consensus_distance for d in since) / len(since) if since else None,
            "state_spread": sum(spreads) / len(spreads) if spreads else None,
        }


def _tensors(engine: Communicator, fields: Sequence[Field]) -> list[Tensor]:
    return [t for field in fields for t in engine.tensors(field)]


def _variance_sum(stacked: Sequence[Tensor]) -> float:
    """(1/N) sum_i ||x_i - x_bar||^2 of stacked (N, ...) tensors. The deviations are formed first, so nothing
    cancels: the tensors' own precision suffices."""
    total = 0.0
    for t in stacked:
        rows = t.detach().reshape(t.shape[0], -1)
        total += float((rows - rows.mean(0)).square().sum()) / t.shape[0]
    return total


def _precise(tensors: Sequence[Tensor]) -> bool:
    """Whether the identity's difference of two large numbers is meaningful: 16-bit values (and their 16-bit
    average) round ||x||^2 by far more than the drift between rounds."""
    return all(t.dtype in (torch.float32, torch.float64) for t in tensors)


def _square_norm(tensors: Sequence[Tensor]) -> Tensor:
    """||x||^2 of one worker's tensors in float64 (the identity subtracts two such numbers)."""
    norms = [torch.linalg.vector_norm(t.detach(), dtype=torch.float64) for t in tensors]
    return torch.stack(norms).square().sum()
