"""Streaming rounds: a round's tensors cut into F fragments, each synced at its own step of the period.

Beyond the paper; streaming DiLoCo's fragments (Douillard et al., 2025), by element rather than by layer. With
``fragments=F`` (F divides the period I) fragment f is synced after every step t with t mod I = f I / F: fragment 0
at the period's end as an unfragmented round is, fragment 1 I/F steps later, and so on. Each step then sends at most
one fragment, about 1/F of a round: the peak bandwidth drops F-fold, and with overlap each fragment's exchange runs
while the next steps compute. Every element is still synced once per period, I steps after its last sync, so the
algorithm per element is Algorithm 1's (the analysis is elementwise; only the phase differs between fragments).

A fragment is aligned over the round's fields: the f-th of F contiguous, near-equal ranges of the parameters
(flattened and concatenated in the round's order), the same range of each optimizer state tensor the round sends
(AdamW's ``exp_avg`` and ``exp_avg_sq`` of those very parameter values), and the f-th range of the float buffers.
Each fragment thus carries its own parameters and state. The cut is made on the engines' rows (views into their
tensors), so both engines cut the same values in the same order, and every stage of a fragment (its compression
anchor and residuals, its outer step, its overlapped round; with the gossip rules, its mixing through W) works on
that fragment's views alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from prsgd.algorithm.contract import Communicator
    from prsgd.algorithm.rules import Field


def fragment_range(length: int, index: int, count: int) -> tuple[int, int]:
    """The ``index``-th of ``count`` contiguous near-equal ranges of ``range(length)``."""
    return length * index // count, length * (index + 1) // count


def cut(row: Sequence[Tensor], start: int, end: int) -> list[Tensor]:
    """Views ``(rows, k)`` covering ``[start, end)`` of the row that ``row``'s tensors form (leading dimension: the
    workers; each flattened per worker, then concatenated in order)."""
    views, offset = [], 0
    for t in row:
        flat = t.view(t.shape[0], -1)  # a view, so that what is written to a fragment lands in the engine's tensors
        a, b = max(start, offset), min(end, offset + flat.shape[1])
        if a < b:
            views.append(flat[:, a - offset : b - offset])
        offset += flat.shape[1]
    return views


def fragment(row: Sequence[Tensor], index: int, count: int, blocks: int = 1) -> list[Tensor]:
    """Fragment ``index`` of ``count`` of ``row``, which is ``blocks`` equal blocks laid end to end (the optimizer
    state: one block per state tensor name, each shaped as the parameters): the same range of each block."""
    size = sum(t[0].numel() for t in row) // blocks
    start, end = fragment_range(size, index, count)
    return [view for block in range(blocks) for view in cut(row, block * size + start, block * size + end)]


def fragment_tensors(engine: Communicator, fields: Sequence[Field], index: int, count: int) -> list[Tensor]:
    """Fragment ``index`` of ``count`` of the engine's ``fields``, as views for elementwise work (the engine's
    :meth:`~prsgd.algorithm.contract.Communicator.elementwise` tensors themselves when ``count`` is 1): each field's
    row cut alone, the optimizer state's as one block per state tensor name."""
    if count == 1:
        return engine.elementwise(fields)
    params = sum(t[0].numel() for t in engine.elementwise(("params",)))
    views = []
    for field in fields:
        row = engine.elementwise((field,))
        blocks = sum(t[0].numel() for t in row) // params if field == "state" else 1
        views += fragment(row, index, count, max(blocks, 1))
    return views
