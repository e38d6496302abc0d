"""The simulator's communication: N workers' tensors stacked along a leading dimension, averaged or mixed over it.

:class:`StackedCommunicator` is the simulator's side of the engine contract (:class:`prsgd.algorithm.Communicator`):
averaging is a mean over dimension 0, gossip is x <- W x over it (:class:`StackedMixer`), and ``comm`` counts what
one worker of a real run would send.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from prsgd.algorithm.contract import CommStats, Reduce
from prsgd.algorithm.mixing import Neighbours, mix_row_
from prsgd.algorithm.rules import Field, Scope
from prsgd.algorithm.topology import Topology
from prsgd.errors import InvalidArgument


def mean_over_workers_(tensors: Sequence[Tensor]) -> None:
    """Replace each stacked ``(N, ...)`` tensor by its mean over workers, in place."""
    for t in tensors:
        t.copy_(t.mean(dim=0, keepdim=True).expand_as(t))


def mean_within_nodes_(tensors: Sequence[Tensor], nodes: int) -> None:
    """Replace each stacked ``(N, ...)`` tensor's rows by their mean over each node's consecutive N/nodes
    workers, in place."""
    for t in tensors:
        grouped = t.reshape(nodes, t.shape[0] // nodes, *t.shape[1:])
        t.copy_(grouped.mean(dim=1, keepdim=True).expand_as(grouped).reshape(t.shape))


def worker_bytes(tensors: Sequence[Tensor]) -> int:
    """The bytes one worker holds of stacked ``(N, ...)`` tensors."""
    return sum(t[0].numel() * t.element_size() for t in tensors)


class StackedMixer:
    """x <- W x over dim 0 of stacked ``(N, ...)`` tensors (eq. 18), in place.

    ``mode="sparse"`` uses the graph's sparsity: each worker's new row is :func:`prsgd.algorithm.mixing.mix_row_` of
    its own
    and its in-neighbours' rows (O(k N D) memory traffic, k = max in-degree + 1), written straight into the output;
    ``"dense"`` is one N x N matrix product (a blocked BLAS call that reads x once). ``"auto"`` takes sparse for a
    tensor of at least ``SPARSE_MIN_NUMEL`` elements per worker on a graph with 4 k^2 <= N, dense otherwise (the
    crossover ``benchmarks/mixing.py`` measures). The mixed result replaces each tensor's storage (``Tensor.set_``;
    the tensors must not be views of others) and the old storage becomes the next step's output buffer.
    """

    SPARSE_MIN_NUMEL = 16_384

    def __init__(self, topology: Topology, device: torch.device, mode: str = "auto") -> None:
        if mode not in ("auto", "sparse", "dense"):
            raise InvalidArgument(f"mode={mode!r} is not known; allowed: auto, sparse, dense")
        self.topology = topology
        self.device = device
        self.mode = mode
        self._sparse_graph = 4 * (topology.max_degree + 1) ** 2 <= topology.num_workers
        self._plans: dict[int, tuple[float, Tensor, list[Neighbours]]] = {}
        self._spares: dict[int, Tensor] = {}

    def _plan(self, step: int) -> tuple[float, Tensor, list[Neighbours]]:
        """(mean out-degree, dense W, every worker's :class:`Neighbours`) for ``step``, cached for static graphs."""
        key = step if self.topology.time_varying else 0
        if key not in self._plans:
            if len(self._plans) > 64:
                self._plans.clear()
            rows = [self.topology.neighbours(i, step) for i in range(self.topology.num_workers)]
            out_degree = sum(len(r.targets) for r in rows) / len(rows)
            w = torch.as_tensor(self.topology.mixing_matrix(step), dtype=torch.float64, device=self.device)
            self._plans[key] = (out_degree, w, rows)
        return self._plans[key]

    def out_degree(self, step: int) -> float:
        """How many workers each worker sends to at ``step``, on average."""
        return self._plan(step)[0]

    def _sparse(self, per_worker_numel: int) -> bool:
        if self.mode == "auto":
            return self._sparse_graph and per_worker_numel >= self.SPARSE_MIN_NUMEL
        return self.mode == "sparse"

    def __call__(self, tensors: Sequence[Tensor], step: int, adopt: bool = True) -> None:
        """Mix each tensor; ``adopt=False`` copies the result into it instead (views of other tensors: a
        fragment's)."""
        _, dense, rows = self._plan(step)
        for t in tensors:
            flat = t.reshape(t.shape[0], -1)
            mixed = self._spares.pop(id(t), None) if adopt else None
            if mixed is None or mixed.shape != flat.shape or mixed.dtype != flat.dtype:
                mixed = torch.empty_like(flat)
            if self._sparse(flat.shape[1]):
                for i, nbrs in enumerate(rows):
                    mix_row_(mixed[i], flat[i], nbrs, [flat[j] for j in nbrs.sources])
            else:
                torch.mm(dense.to(dtype=t.dtype), flat, out=mixed)
            if not adopt:
                t.copy_(mixed.view(t.shape))
                continue
            t.set_(mixed.view(t.shape))  # the simulator owns these tensors: adopt the result, no copy back
            self._spares[id(t)] = flat  # the old storage becomes the next step's output buffer


class StackedCommunicator:
    """The simulator's :class:`prsgd.algorithm.Communicator`: each field is a list of stacked ``(N, ...)``
    tensors; ``grads`` is set by the simulator before each step (the gradients it just computed). ``nodes``
    groups consecutive workers for hierarchical runs' inner rounds. An overlapped round's exchange runs at once
    (:meth:`start`): the simulator has no network to wait for, the delay is the algorithm's."""

    holds_every_worker = True

    def __init__(
        self,
        num_workers: int,
        params: list[Tensor],
        buffers: list[Tensor],
        state: list[Tensor],
        topology: Topology | None = None,
        device: torch.device | None = None,
        nodes: int = 1,
        counters: Sequence[Tensor] = (),
        local_state: Sequence[Tensor] = (),
    ) -> None:
        self.num_workers = num_workers
        self.nodes = nodes
        self.fields: dict[Field, list[Tensor]] = {
            "params": params,
            "buffers": buffers,
            "grads": [],
            "state": state,
            "local_state": list(local_state),
        }
        self.counters = list(counters)
        self.mixer = StackedMixer(topology, device or params[0].device) if topology is not None else None
        self.comm = CommStats()

    def tensors(self, field: Field) -> list[Tensor]:
        return self.fields[field]

    def set_grads(self, grads: list[Tensor]) -> list[Tensor]:
        """This step's stacked gradients (what ``sync="gradients"`` averages); returns them."""
        self.fields["grads"] = grads
        return grads

    def _gather(self, fields: Sequence[Field]) -> list[Tensor]:
        return [t for field in fields for t in self.fields[field]]

    def average(self, fields: Sequence[Field], scope: Scope = "all") -> None:
        tensors = self._gather(fields)
        if scope == "node":
            if self.nodes < self.num_workers:  # one worker per node: nothing to average
                mean_within_nodes_(tensors, self.nodes)
                self.comm.record(worker_bytes(tensors), scope)
        else:
            self.average_tensors(tensors)

    def average_tensors(self, tensors: list[Tensor]) -> None:
        if self.num_workers == 1:
            return
        mean_over_workers_(tensors)
        self.comm.record(worker_bytes(tensors))

    def worker_mean(self, values: Tensor) -> Tensor:
        return values.mean(0)

    def start(self, work: Callable[[StackedCommunicator], None]) -> Callable[[], None]:
        background = copy.copy(self)  # the same tensors, its own count until waited for
        background.comm = self.comm.background()
        work(background)
        return functools.partial(self.comm.add, background.comm)

    def elementwise(self, fields: Sequence[Field]) -> list[Tensor]:
        return self._gather(fields)

    def reduce_rows(self, payload: Tensor, reduce: Reduce, unit: int) -> None:
        if self.num_workers == 1:
            return
        payload.copy_(reduce(payload).unsqueeze(0).expand_as(payload))  # one shard: the whole row
        self.comm.record(payload[0].numel() * payload.element_size())

    def gather_rows(self, payload: Tensor) -> Tensor:
        if self.num_workers > 1:
            self.comm.record(payload[0].numel() * payload.element_size(), kind="all_gather")
        return payload  # every worker's row already

    def mix(self, fields: Sequence[Field], step: int) -> None:
        self.mix_tensors(self._gather(fields), step, adopt=True)

    def mix_tensors(self, tensors: list[Tensor], step: int, adopt: bool = False) -> None:
        if self.mixer is None:
            raise RuntimeError("mix() needs a topology")
        self.mixer(tensors, step, adopt)
        self.comm.record(round(self.mixer.out_degree(step) * worker_bytes(tensors)), kind="p2p")
