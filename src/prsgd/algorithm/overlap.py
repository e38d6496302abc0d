"""Overlapped rounds: a round's exchange runs while the workers keep taking local steps.

Beyond the paper (its analysis covers rounds applied at once). At a round (after local step t) each worker takes a
snapshot ``s`` of what the round communicates and starts the exchange on it; local steps go on. ``delay`` steps
later (after local step t + delay), when the exchange has finished, each worker applies

    x <- avg(s) + (x - s)

to every tensor of the round (parameters, float buffers and, for Algorithm 1, momentum): the average of the
snapshots replaces the snapshot, and the progress made during the delay is kept. This is Overlap Local-SGD (Wang
et al., 2020) and streaming DiLoCo's overlap, here for Algorithm 1's params-and-momentum round. The node average
x_bar follows the same dynamics as without a delay (the mean over workers of ``avg(s) - s`` is zero), so eq. (10)
still holds with exact averaging; workers are never all equal after a scheduled round (each keeps its own
progress), only after :meth:`prsgd.algorithm.PeriodicSync.synchronize`, which first completes a round in flight.
With ``delay=0`` the rule is Algorithm 1's round itself: ``avg(s) + (s - s)``, bit for bit.

What is exchanged is either the snapshot itself (exact rounds) or a compressed payload of it
(:mod:`prsgd.algorithm.compression`; ``avg(s)`` is then the new anchor). The engine runs the exchange: the simulator at
once (it has no network to wait for; the delay is explicit in the rule), :class:`prsgd.LocalSGD` on a background
thread over a process group of its own, so that it never interleaves with the training's collectives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from prsgd.errors import CheckpointError, InvalidArgument, check_int

if TYPE_CHECKING:
    from prsgd.algorithm.contract import Communicator
    from prsgd.algorithm.exchange import Exchange
    from prsgd.algorithm.round import RoundSpec


def check_overlap(overlap: bool | int, period: int) -> int:
    """The delay in local steps that ``overlap`` asks for: ``False`` -> 0 (rounds applied at once), ``True`` -> 1
    (a round completes after the next step), an integer in [0, period]. A round must complete before the next
    one starts, hence at most ``period``."""
    if isinstance(overlap, bool):
        return int(overlap)
    delay = check_int("overlap", overlap, 0)
    if delay > period:
        raise InvalidArgument(
            f"overlap={delay} is not allowed with period={period}; a round completes before the next one starts: "
            f"the delay must be in [0, {period}] (True means 1)"
        )
    return delay


class OverlappedRounds:
    """The round in flight, if any: its snapshot ``s``, what the exchange fills in (``result``, which becomes
    ``avg(s)``), when it is due (``due``: the step count after which it is applied) and how to wait for it. The
    overlap stage of a round; its state is saved under ``"overlap"``."""

    key = "overlap"

    @classmethod
    def from_spec(cls, spec: RoundSpec) -> OverlappedRounds | None:
        """The overlap stage ``spec`` describes, or None when rounds are applied at once."""
        return cls(spec.delay) if spec.delay else None

    def __init__(self, delay: int) -> None:
        self.delay = delay
        self.snapshot: list[Tensor] = []
        self.result: list[Tensor] = []
        self.due: int | None = None
        self._wait: Callable[[], None] | None = None
        self._finish: Callable[[list[Tensor]], list[Tensor]] | None = None

    @property
    def in_flight(self) -> bool:
        return self.due is not None

    @torch.no_grad()
    def start(
        self,
        tensors: Sequence[Tensor],
        due: int,
        result: list[Tensor],
        wait: Callable[[], None],
        finish: Callable[[list[Tensor]], list[Tensor]],
    ) -> None:
        """Hold a round started on ``tensors`` as they are now: ``result`` is what its exchange works on (a copy of
        the snapshot, or its compressed payload), ``wait()`` waits for the exchange, ``finish(result)`` turns the
        exchanged result into ``avg(s)``. Applied after step ``due``."""
        if self.in_flight:
            raise RuntimeError("OverlappedRounds.start with a round in flight")
        self.snapshot = [t.detach().clone() for t in tensors]
        self.result, self.due, self._wait, self._finish = result, due, wait, finish

    def start_round(self, tensors: Sequence[Tensor], exchange: Exchange, engine: Communicator, step: int) -> None:
        """Start a round after local step ``step`` on ``tensors`` as they are now, exchanged by ``exchange`` (its
        payload of the snapshot) in the background that ``engine`` runs; applied ``delay`` steps later."""
        payload = exchange.snapshot_payload(tensors)

        def work(background: Communicator) -> None:
            exchange.exchange_payload(payload, background)

        self.start(tensors, step + self.delay, payload, engine.start(work), exchange.averaged)

    def wait(self) -> None:
        """Wait until the exchange in flight has finished (no change to the workers' tensors)."""
        if self._wait is not None:
            wait, self._wait = self._wait, None
            wait()

    @torch.no_grad()
    def complete(self, tensors: Sequence[Tensor]) -> None:
        """Apply the round in flight to ``tensors``: x <- avg(s) + (x - s)."""
        self.wait()
        averaged = self._finish(self.result) if self._finish is not None else self.result
        tensors = list(tensors)
        torch._foreach_sub_(tensors, self.snapshot)
        torch._foreach_add_(tensors, averaged)
        self.snapshot, self.result, self.due, self._finish = [], [], None, None

    def state_dict(self) -> dict[str, Any]:
        """The round in flight (waited for first): its snapshot, exchanged result and due step."""
        self.wait()
        return {
            "delay": self.delay,
            "due": self.due,
            "snapshot": [s.clone() for s in self.snapshot],
            "result": [r.clone() for r in self.result],
        }

    def load_state_dict(
        self, state: dict[str, Any], tensors: Sequence[Tensor], finish: Callable[[list[Tensor]], list[Tensor]]
    ) -> None:
        """Restore a round in flight over ``tensors`` (the engine's, to check shapes), to be finished by
        ``finish``."""
        self.snapshot, self.result, self.due, self._wait, self._finish = [], [], None, None, None
        if state.get("due") is None:
            return
        snapshot = state["snapshot"]
        if len(snapshot) != len(tensors) or any(s.shape != t.shape for s, t in zip(snapshot, tensors, strict=True)):
            raise CheckpointError("the state's round in flight does not match this model's tensors")
        device = tensors[0].device
        self.snapshot = [s.to(device, t.dtype).clone() for s, t in zip(snapshot, tensors, strict=True)]
        self.result = [r.to(device).clone() for r in state["result"]]
        self.due, self._finish = int(state["due"]), finish
