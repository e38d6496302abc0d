"""One worker's part of a mixing step (eq. 18): whom it receives from with which weights, whom it sends to, and the
weighted sum itself, which both engines' sparse mixing call. The graphs and their W: :mod:`prsgd.algorithm.topology`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Neighbours:
    """One worker's part of a mixing step: receive from ``sources`` with ``weights``; send to ``targets``."""

    self_weight: float
    sources: tuple[int, ...]
    weights: tuple[float, ...]
    targets: tuple[int, ...]


def neighbours(w: np.ndarray, worker: int) -> Neighbours:
    """Worker ``worker``'s in-neighbours (row of W) and out-neighbours (column of W), self excluded."""
    row, column = w[worker], w[:, worker]
    sources = tuple(int(j) for j in np.flatnonzero(row) if j != worker)
    targets = tuple(int(j) for j in np.flatnonzero(column) if j != worker)
    return Neighbours(float(row[worker]), sources, tuple(float(row[j]) for j in sources), targets)


def mix_row_(out: Tensor, own: Tensor, nbrs: Neighbours, received: Sequence[Tensor]) -> Tensor:
    """Eq. (18) for one worker i: ``out = W_ii x_i + sum_j W_ij x_j`` over its in-neighbours j, in that order
    (``received[k]`` is x of ``nbrs.sources[k]``). ``out`` may be ``own``. Both engines' sparse mixing call it."""
    torch.mul(own, nbrs.self_weight, out=out)
    for weight, x in zip(nbrs.weights, received, strict=True):
        out.add_(x, alpha=weight)
    return out
