"""How a scheduled round's tensors travel: the exchange stage of a round.

:class:`ExactExchange` averages exactly (eq. 6), :class:`MixingExchange` mixes through W (eq. 18), and
:class:`prsgd.algorithm.compression.CompressedRounds` sends the change since the last round in low precision with
error feedback. All three answer the same calls, so :class:`prsgd.algorithm.periodic.PeriodicSync` and the overlap
stage only ask whether it is anchored:

- ``exchange_round(engine, fields, step)``: a scheduled round of ``fields``, in place;
- ``round_of(tensors, engine, step)``: a scheduled round of some tensors, in place (a fragment's views);
- ``snapshot_payload(tensors)``, ``exchange_payload(payload, engine)``, ``averaged(payload)``: the same round cut in
  three for an overlapped round (what is exchanged, exchanging it in the background, and avg(s) from the result);
- ``anchored``: whether it keeps the values after the last round; an anchored exchange also answers
  ``restart(tensors)`` (after an exact round everything is sent), ``rebase(tensors)`` (an outer step changed the
  values every worker holds) and, under its ``key``, ``state_dict`` and ``load_state_dict`` for checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from prsgd.algorithm.compression import CompressedRounds
from prsgd.algorithm.contract import Communicator
from prsgd.algorithm.rules import Field

if TYPE_CHECKING:
    from prsgd.algorithm.round import RoundSpec


class ExactExchange:
    """The paper's round: the exact mean over all workers (eq. 6). Keeps no state."""

    key: str | None = None
    anchored = False
    needs_start = False  # nothing to set up at x^0

    def exchange_round(self, engine: Communicator, fields: Sequence[Field], step: int) -> None:
        engine.average(fields)

    def round_of(self, tensors: Sequence[Tensor], engine: Communicator, step: int) -> None:
        engine.average_tensors(list(tensors))

    def snapshot_payload(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        return [t.detach().clone() for t in tensors]

    def exchange_payload(self, payload: list[Tensor], engine: Communicator) -> None:
        engine.average_tensors(payload)

    def averaged(self, payload: list[Tensor]) -> list[Tensor]:
        return payload


class MixingExchange(ExactExchange):
    """Algorithm 2's round: each worker's tensors replaced by sum_j W_ij x_j with step ``step``'s W (eq. 18)."""

    def exchange_round(self, engine: Communicator, fields: Sequence[Field], step: int) -> None:
        engine.mix(fields, step)

    def round_of(self, tensors: Sequence[Tensor], engine: Communicator, step: int) -> None:
        engine.mix_tensors(list(tensors), step)


Exchange = ExactExchange | CompressedRounds


def make_exchange(spec: RoundSpec) -> Exchange:
    """The exchange ``spec`` describes."""
    if spec.compression is not None:
        return CompressedRounds(spec.compression)
    return MixingExchange() if spec.rule.mixes else ExactExchange()
