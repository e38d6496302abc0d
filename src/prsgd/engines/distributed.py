"""The real engine's communication over ``torch.distributed``: LocalSGD's communicator and the collectives.

Together with :mod:`prsgd.engines.torchrun` (joining the group torchrun describes, heartbeats, failure diagnosis)
the only modules of prsgd that import ``torch.distributed``. When the process group is not initialized (or has
one member) every operation does nothing, so the same code runs in a single process.
"""

from __future__ import annotations

import copy
import datetime
import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from prsgd.algorithm.contract import CommStats, Reduce
from prsgd.algorithm.mixing import mix_row_
from prsgd.algorithm.rules import Field, Scope
from prsgd.algorithm.topology import Topology
from prsgd.engines.flat_storage import FlatStorage


class ProcessGroupCommunicator:
    """:class:`prsgd.LocalSGD`'s :class:`prsgd.algorithm.Communicator`: the fields live in one
    :class:`~prsgd.engines.flat_storage.FlatStorage`, so ``average`` is one ``all_reduce`` (sum, then divide by
    the group size) over one span of it, in place, and ``mix`` (eq. 18) sends that span to this worker's
    out-neighbours and receives its in-neighbours' point to point (``batch_isend_irecv``), never a collective over
    all workers; receive buffers (in-degree x payload) are kept between rounds. ``comm`` counts the span's bytes
    per all-reduce and out-degree x span bytes per mixing round; a single worker sends and counts nothing.

    ``node_group``: this rank's node, for hierarchical runs' inner rounds (``average(..., scope="node")``).
    ``background_group``: a second group of the same ranks, on which overlapped rounds' exchanges run in a
    background thread (:meth:`start`), so that they never interleave with collectives of the training thread.
    ``state``: where the optimizer state lives when not in the storage (a wrapped torch optimizer's, created lazily):
    a round that sends it packs it after the storage's span, still one collective."""

    holds_every_worker = False

    def __init__(
        self,
        storage: FlatStorage,
        process_group: dist.ProcessGroup | None = None,
        topology: Topology | None = None,
        *,
        counters: Sequence[Tensor] = (),
        state: Callable[[], list[Tensor]] | None = None,
        node_group: dist.ProcessGroup | None = None,
        background_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.storage = storage
        self.process_group = process_group
        self.num_workers = group_size(process_group)
        self.rank = group_rank(process_group)
        self.topology = topology
        self.node_group = node_group
        self.comm = CommStats()
        self.counters = list(counters)
        self.outside_state = state
        self._receive: list[Tensor] = []
        self._background = None
        if background_group is not None:
            self._background = ProcessGroupCommunicator(storage, background_group)

    @property
    def world_size(self) -> int:
        """How many workers a round averages over (the group's members)."""
        return group_size(self.process_group)

    def tensors(self, field: Field) -> list[Tensor]:
        if field == "state" and self.outside_state is not None:
            return self.outside_state()
        return self.storage.tensors(field)

    def _payload(self, fields: Sequence[Field]) -> tuple[Tensor, list[Tensor]]:
        """What a round of ``fields`` reduces: the storage's span, with the state kept outside the storage (if the
        round sends it) packed after it (:meth:`_pack`)."""
        if self.outside_state is None or "state" not in fields:
            return self._pack([self.storage.span(fields)])
        return self._pack([self.storage.span([f for f in fields if f != "state"]), *self.outside_state()])

    @staticmethod
    def _pack(tensors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """One flat payload of ``tensors`` and what :meth:`_unpack` copies it back into: a view of the tensor itself
        when it is one contiguous tensor (nothing to copy back), else a packed copy and the tensors."""
        if len(tensors) == 1 and tensors[0].is_contiguous():
            return tensors[0].view(-1), []
        return torch.cat([t.reshape(-1) for t in tensors]), tensors

    @staticmethod
    @torch.no_grad()
    def _unpack(payload: Tensor, parts: list[Tensor]) -> None:
        if parts:  # a packed copy
            pieces = payload.split([t.numel() for t in parts])
            torch._foreach_copy_(parts, [p.view_as(t) for p, t in zip(pieces, parts, strict=True)])

    def average(self, fields: Sequence[Field], scope: Scope = "all") -> None:
        payload, parts = self._payload(fields)
        if scope == "node":
            if self.node_group is None:
                raise RuntimeError("average(scope='node') needs a node_group")
            self._average(payload, self.node_group, scope)
        else:
            self._average(payload, self.process_group, scope)
        self._unpack(payload, parts)

    def average_tensors(self, tensors: list[Tensor]) -> None:
        """One all-reduce: of the tensor itself (an overlapped round's snapshot of a span), or of several packed
        into one (a fragment's pieces of the span), copied back."""
        payload, parts = self._pack(tensors)
        self._average(payload, self.process_group, "all")
        self._unpack(payload, parts)

    def _average(self, span: Tensor, group: dist.ProcessGroup | None, scope: Scope) -> None:
        size = self.world_size if group is self.process_group else group_size(group)
        if size <= 1 or span.numel() == 0:
            return
        if self._all_reduce_sum(span, group):
            span.div_(size)
            self.comm.record(span.numel() * span.element_size(), scope)

    def worker_mean(self, values: Tensor) -> Tensor | None:
        """One all-reduce of a few float64 numbers, uncounted (a measurement, not the algorithm's traffic)."""
        total = values.clone()
        if self.world_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.process_group)
        return total / self.world_size

    # the collectives, each True once done (a fault-tolerant subclass's may fail: the round is then run again)
    def _all_reduce_sum(self, tensor: Tensor, group: dist.ProcessGroup | None) -> bool:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return True

    def _all_to_all(self, received: Tensor, sent: Tensor) -> bool:
        dist.all_to_all_single(received, sent, group=self.process_group)
        return True

    def _all_gather(self, gathered: Tensor, row: Tensor) -> bool:
        dist.all_gather_single(gathered, row, group=self.process_group)
        return True

    def start(self, work: Callable[[ProcessGroupCommunicator], None]) -> Callable[[], None]:
        """Run ``work`` on a background thread with the background group's communicator (at once without one);
        returns how to wait for it (re-raising what it raised), which also counts what it sent."""
        background = self._background or copy.copy(self)
        background.comm = self.comm.background()
        if self._background is None:
            work(background)
            return functools.partial(self.comm.add, background.comm)
        failed: list[BaseException] = []

        def run() -> None:
            try:
                work(background)
            except BaseException as error:  # re-raised in the training thread by wait()
                failed.append(error)

        thread = threading.Thread(target=run, name="prsgd-overlapped-round", daemon=True)
        thread.start()

        def wait() -> None:
            thread.join()
            if failed:
                raise failed[0]
            self.comm.add(background.comm)

        return wait

    def elementwise(self, fields: Sequence[Field]) -> list[Tensor]:
        if self.outside_state is not None and "state" in fields:
            raise RuntimeError("elementwise() of optimizer state kept outside the storage")  # refused at construction
        return [self.storage.span(fields).unsqueeze(0)]  # contiguous: one row (this worker's) for the whole round

    def reduce_rows(self, payload: Tensor, reduce: Reduce, unit: int) -> None:
        """All-to-all of the payload (rank j receives every rank's j-th shard, whole units of ``unit`` elements,
        zero-padded), ``reduce`` of the shard this rank owns, all-gather of the reduced shards: the reduce-scatter
        and all-gather of a ring all-reduce, with the reduction the caller's."""
        size = self.world_size
        if size <= 1 or payload.numel() == 0:
            return
        total = payload.shape[1]
        units = -(-total // unit)
        shard = -(-units // size) * unit
        flat = payload.new_zeros(shard * size)
        flat[:total] = payload[0]
        received = torch.empty_like(flat)
        if self._all_to_all(received, flat) and self._all_gather(flat, reduce(received.view(size, shard))):
            payload[0].copy_(flat[:total])
            self.comm.record(total * flat.element_size())

    def gather_rows(self, payload: Tensor) -> Tensor:
        size = self.world_size
        if size <= 1:
            return payload
        row = payload[0].contiguous().view(torch.uint8)  # as bytes: gloo has no int16
        gathered = row.new_zeros(size * row.numel())  # zeros (index 0, value 0) if a failed round skips it
        if self._all_gather(gathered, row):
            self.comm.record(row.numel(), kind="all_gather")
        return gathered.view(payload.dtype).view(size, -1)

    def _peer(self, worker: int) -> int:
        if self.process_group is None:
            return worker
        return dist.get_global_rank(self.process_group, worker)

    def mix(self, fields: Sequence[Field], step: int) -> None:
        flat, parts = self._payload(fields)
        self._mix(flat, step)
        self._unpack(flat, parts)

    def mix_tensors(self, tensors: list[Tensor], step: int) -> None:
        """As :meth:`mix`, of tensors that are not whole fields (a fragment's views), packed into one payload."""
        flat, parts = self._pack(tensors)
        self._mix(flat, step)
        self._unpack(flat, parts)

    def _mix(self, flat: Tensor, step: int) -> None:
        """``flat`` replaced by this worker's row of W x, in place: sent to the out-neighbours, the in-neighbours'
        received, point to point; counted."""
        if self.topology is None:
            raise RuntimeError("mix() needs a topology")
        nbrs = self.topology.neighbours(self.rank, step)
        if len(self._receive) < len(nbrs.sources) or (self._receive and self._receive[0].numel() != flat.numel()):
            self._receive = [torch.empty_like(flat) for _ in nbrs.sources]
        received = self._receive[: len(nbrs.sources)]
        ops = [dist.P2POp(dist.isend, flat, self._peer(j), self.process_group) for j in nbrs.targets]
        ops += [
            dist.P2POp(dist.irecv, buf, self._peer(j), self.process_group)
            for j, buf in zip(nbrs.sources, received, strict=True)
        ]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        with torch.no_grad():
            mix_row_(flat, flat, nbrs, received)
        self.comm.record(len(nbrs.targets) * flat.numel() * flat.element_size(), kind="p2p")


def same_ranks_group(process_group: dist.ProcessGroup | None = None) -> dist.ProcessGroup | None:
    """A new process group of the same ranks as ``process_group`` (the world by default), or None without more
    than one. Every rank of the world must call it at the same point (``dist.new_group``)."""
    if group_size(process_group) == 1:
        return None
    return dist.new_group(_global_ranks(process_group))


def node_group(nodes: int, process_group: dist.ProcessGroup | None = None) -> dist.ProcessGroup | None:
    """This rank's node: the group's ranks split into ``nodes`` runs of consecutive ranks (as torchrun numbers them,
    node by node). Every rank of the world must call it at the same point: it creates every node's group."""
    if group_size(process_group) == 1:
        return None
    ranks = _global_ranks(process_group)
    per_node = len(ranks) // nodes
    mine = None
    for node in range(nodes):
        group = dist.new_group(ranks[node * per_node : (node + 1) * per_node])
        if node == group_rank(process_group) // per_node:
            mine = group
    return mine


def _global_ranks(process_group: dist.ProcessGroup | None) -> list[int]:
    if process_group is None:
        return list(range(group_size()))
    return [dist.get_global_rank(process_group, i) for i in range(group_size(process_group))]


def all_reduce_sum_(tensor: Tensor, process_group: dist.ProcessGroup | None = None) -> Tensor:
    """``tensor`` summed over the group, in place (unchanged without a group); returns it."""
    if group_size(process_group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group)
    return tensor


def all_reduce_mean(tensors: list[Tensor], process_group: dist.ProcessGroup | None = None) -> None:
    """Average ``tensors`` (any, not in flat storage) over the group in place: one all-reduce of a packed copy."""
    world_size = group_size(process_group)
    if not tensors or world_size == 1:
        return
    with torch.no_grad():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
        flat.div_(world_size)
        unpack_(flat, tensors)


def unpack_(flat: Tensor, tensors: list[Tensor]) -> None:
    """Copy consecutive pieces of ``flat`` (a packed copy of ``tensors``) back into ``tensors``."""
    chunks = torch.split(flat, [t.numel() for t in tensors])
    torch._foreach_copy_(tensors, [c.view_as(t) for c, t in zip(chunks, tensors, strict=True)])


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(process_group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(process_group) if is_initialized() else 1


def group_rank(process_group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(process_group) if is_initialized() else 0


def broadcast_from_first(tensor: Tensor, process_group: dist.ProcessGroup | None = None) -> None:
    """Copy the group's first member's ``tensor`` to every member (same starting point x^0 everywhere)."""
    if group_size(process_group) > 1:
        src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
        dist.broadcast(tensor, src=src, group=process_group)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if group_size() == 1:
        return [obj]
    out: list[Any] = [None] * group_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_first(tensor: Tensor) -> Tensor | None:
    """Every rank's ``tensor`` stacked on rank 0, on the CPU (None on the other ranks); one ``gather``."""
    world = group_size()
    if world == 1:
        return tensor.detach().cpu().unsqueeze(0).clone()
    rows = [torch.empty_like(tensor) for _ in range(world)] if group_rank() == 0 else None
    dist.gather(tensor, rows, dst=0)
    return torch.stack(rows).cpu() if rows is not None else None


def gather_objects_to_first(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (picklable) in rank order on rank 0 (None on the other ranks); ``[obj]`` without a
    process group."""
    if group_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * group_size() if group_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def gloo_side_group() -> dist.ProcessGroup | None:
    """A gloo group of every rank apart from the default one (for barriers that must never interleave with
    training's collectives, whatever its backend); None with one rank. Every rank must call it at the same point."""
    return dist.new_group(backend="gloo") if group_size() > 1 else None


def all_ranks_arrive(group: dist.ProcessGroup | None, seconds: float) -> None:
    """Return once every rank of ``group`` (a gloo group) has called this too; :class:`TimeoutError` naming the
    ranks that did not come within ``seconds``."""
    if group is None or group_size(group) == 1:
        return
    try:
        dist.monitored_barrier(group, timeout=datetime.timedelta(seconds=seconds), wait_all_ranks=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0][:200]
        raise TimeoutError(f"not every rank arrived within {seconds:g} s ({first})") from None


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if group_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def init_process_group(*args: Any, **kwargs: Any) -> None:
    """``torch.distributed.init_process_group(*args, **kwargs)``, after importing ``torch._dynamo``.

    torch.optim imports ``torch._dynamo`` lazily, on the first optimizer built; when that happens after the group
    exists, it keeps references to the default group, so ``destroy_process_group`` cannot free it: gloo's worker
    threads then outlive the interpreter, and one that drops the last reference to a finished collective's tensors
    while Python finalizes aborts the process ("terminate called without an active exception"; history in
    benchmarks/README.md). Use this instead of ``dist.init_process_group`` when you create the group yourself."""
    import torch._dynamo  # noqa: F401

    dist.init_process_group(*args, **kwargs)


def averaged_copy(model: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """A copy of ``model`` holding the node averages of its parameters and float buffers (x_bar), for evaluation.

    One all-reduce of a packed copy; it is evaluation-only traffic, not counted in ``comm``."""
    copy_ = copy.deepcopy(model)
    all_reduce_mean([t for t in (*copy_.parameters(), *copy_.buffers()) if t.is_floating_point()], process_group)
    return copy_
