"""The real engine's communication: flat storage and one collective per round over ``torch.distributed``.

This is the only module of prsgd that imports ``torch.distributed``. Parameters, floating-point model buffers and
momentum buffers are re-pointed (``Tensor.set_``) into one contiguous flat tensor, in that order, so that a sync
round is a single ``all_reduce`` over a span of it, with no gather or scatter copy. When the process group is not
initialized (or has one member) averaging does nothing, so the same code runs in a single process.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from prsgd.errors import InvalidArgument, PrsgdError, WorkerFailure
from prsgd.topology import Topology


class FlatStorage:
    """One flat tensor holding ``tensors`` back to back; each tensor becomes a view into it, in place.

    The tensor objects stay the same Python objects (modules, optimizers and hooks keep working); only their
    storage moves. All tensors must share one dtype and device.
    """

    def __init__(self, tensors: Sequence[Tensor], extra_numels: Sequence[int] = ()) -> None:
        if not tensors:
            raise InvalidArgument("FlatStorage needs at least one tensor")
        dtypes = {t.dtype for t in tensors}
        devices = {t.device for t in tensors}
        if len(dtypes) > 1 or len(devices) > 1:
            raise InvalidArgument(
                "all parameters and floating-point buffers must share one dtype and device to live in one flat "
                f"buffer; got dtypes {sorted(map(str, dtypes))} on devices {sorted(map(str, devices))}"
            )
        self.dtype = tensors[0].dtype
        self.device = tensors[0].device
        total = sum(t.numel() for t in tensors) + sum(extra_numels)
        self.flat = torch.zeros(total, dtype=self.dtype, device=self.device)
        offset = 0
        with torch.no_grad():
            for t in tensors:
                n = t.numel()
                self.flat[offset : offset + n].view(t.shape).copy_(t)
                t.set_(self.flat.untyped_storage(), offset, t.shape)
                offset += n
        self._used = offset

    def allocate(self, shape: torch.Size) -> Tensor:
        """A zero tensor of ``shape`` carved from the reserved tail (``extra_numels``) of the flat storage."""
        n = shape.numel()
        if self._used + n > self.flat.numel():
            raise RuntimeError("FlatStorage: reserved space exhausted")
        view = self.flat[self._used : self._used + n].view(shape)
        self._used += n
        return view

    def span(self, tensors: Sequence[Tensor]) -> Tensor | None:
        """The 1-D view of the flat tensor covering exactly ``tensors`` if they lie back to back in it, else None."""
        span = contiguous_span(tensors)
        if span is None or span.untyped_storage().data_ptr() != self.flat.untyped_storage().data_ptr():
            return None
        return span


def contiguous_span(tensors: Sequence[Tensor]) -> Tensor | None:
    """A 1-D view over ``tensors`` when they lie back to back, in order, in one storage (e.g. views of a flat
    buffer), so that one collective can work on them in place; None otherwise."""
    if not tensors:
        return None
    first = tensors[0]
    storage = first.untyped_storage()
    start = expected = first.storage_offset()
    for t in tensors:
        same = t.untyped_storage().data_ptr() == storage.data_ptr() and t.dtype == first.dtype
        if not same or t.storage_offset() != expected or not t.is_contiguous():
            return None
        expected += t.numel()
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(storage, start, (expected - start,))


class AllReduceAverage:
    """``average(tensors)`` for :mod:`prsgd.algorithm`: one ``all_reduce`` (sum, then divide by the group size).

    Tensors lying back to back in one storage (the optimizer's flat storage, or its flat gradient buffer) are
    reduced in place as one span; any other list goes through :func:`all_reduce_mean` (packed into a temporary,
    reduced, copied back: still one collective). A single worker sends nothing and reports 0 bytes.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group
        self.world_size = group_size(process_group)

    def __call__(self, tensors: list[Tensor]) -> int:
        if self.world_size == 1:
            return 0
        span = contiguous_span(tensors)
        if span is None:
            return all_reduce_mean(tensors, self.process_group)
        dist.all_reduce(span, op=dist.ReduceOp.SUM, group=self.process_group)
        span.div_(self.world_size)
        return span.numel() * span.element_size()


def all_reduce_sum_(tensor: Tensor, process_group: dist.ProcessGroup | None = None) -> Tensor:
    """``tensor`` summed over the group, in place (unchanged without a group); returns it."""
    if group_size(process_group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group)
    return tensor


def all_reduce_mean(tensors: list[Tensor], process_group: dist.ProcessGroup | None = None) -> int:
    """Average ``tensors`` over the group in place with one all-reduce of a packed temporary copy.

    Returns the payload bytes reduced (0 for a single worker, which sends nothing)."""
    world_size = group_size(process_group)
    if not tensors or world_size == 1:
        return 0
    with torch.no_grad():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
        flat.div_(world_size)
        _unpack(flat, tensors)
    return flat.numel() * flat.element_size()


def _unpack(flat: Tensor, tensors: list[Tensor]) -> None:
    chunks = torch.split(flat, [t.numel() for t in tensors])
    torch._foreach_copy_(tensors, [c.view_as(t) for c, t in zip(chunks, tensors, strict=True)])


class NeighbourMix:
    """``mix(tensors, step)`` for :mod:`prsgd.algorithm`: x_i <- W_ii x_i + sum_j W_ij x_j (eq. 18) with
    point-to-point messages to and from this worker's neighbours only (``batch_isend_irecv``), never a collective
    over all workers. The tensors are sent as one flat span of the optimizer's storage (or one packed copy);
    receive buffers (in-degree x payload) are kept between steps. Returns out-degree x payload bytes."""

    def __init__(self, topology: Topology, process_group: dist.ProcessGroup | None = None):
        self.topology = topology
        self.process_group = process_group
        self.rank = group_rank(process_group)
        self._receive: list[Tensor] = []

    def _peer(self, worker: int) -> int:
        if self.process_group is None:
            return worker
        return dist.get_global_rank(self.process_group, worker)

    def __call__(self, tensors: list[Tensor], step: int) -> int:
        if not tensors:
            return 0
        span = contiguous_span(tensors)
        flat = span if span is not None else torch.cat([t.reshape(-1) for t in tensors])
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
            flat.mul_(nbrs.self_weight)
            for weight, buf in zip(nbrs.weights, received, strict=True):
                flat.add_(buf, alpha=weight)
            if span is None:
                _unpack(flat, tensors)
        return len(nbrs.targets) * flat.numel() * flat.element_size()


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


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if group_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def init_from_torchrun(device: str, timeout: float = 300.0) -> torch.device:
    """Join the process group torchrun described in the environment (gloo on CPU, NCCL on CUDA), with collectives
    that give up after ``timeout`` seconds, and start this rank's :class:`Heartbeat`.

    Returns this process's device (``cuda:LOCAL_RANK`` for CUDA)."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise InvalidArgument(
            f"engine='distributed' needs the environment torchrun sets up (missing {', '.join(missing)}); "
            "launch with: torchrun --nproc-per-node 4 -m prsgd.train --engine distributed ..."
        )
    if device.startswith("cuda"):
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        local = torch.device(device)
        backend = "gloo"
    if not is_initialized():
        wait = datetime.timedelta(seconds=timeout)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's store outlives a restart: give each attempt its own keys, so that a restarted rank never
            # reads the address a dead rank of the previous attempt published (gloo then waits on it until timeout)
            agent = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=wait
            )
            store = dist.PrefixStore(f"prsgd/attempt_{torchrun_attempt()}", agent)
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            init_process_group(backend, store=store, rank=rank, world_size=world, timeout=wait)
        else:
            init_process_group(backend, timeout=wait)
        start_heartbeat(timeout)
    return local


def init_process_group(*args: Any, **kwargs: Any) -> None:
    """``torch.distributed.init_process_group(*args, **kwargs)``, after importing ``torch._dynamo``.

    torch.optim imports ``torch._dynamo`` lazily, on the first optimizer built; when that happens after the group
    exists, it keeps references to the default group, so ``destroy_process_group`` cannot free it: gloo's worker
    threads then outlive the interpreter, and one that drops the last reference to a finished collective's tensors
    while Python finalizes aborts the process ("terminate called without an active exception", about 1 run in 50
    here). Use this instead of ``dist.init_process_group`` when you create the group yourself."""
    import torch._dynamo  # noqa: F401

    dist.init_process_group(*args, **kwargs)


class Heartbeat:
    """Each rank bumps a counter in the rendezvous store (a TCPStore at MASTER_ADDR:MASTER_PORT: torchrun's agent,
    or rank 0 without torchrun) every ``interval`` seconds from a daemon thread. When a collective fails,
    :meth:`unresponsive` reads the counters twice, ``2.5 interval`` apart: a rank whose counter did not move is
    dead or hung. A rank that stops because of an error of its own says so under its key first."""

    def __init__(self, timeout: float, rank: int, world_size: int) -> None:
        self.interval = min(5.0, max(0.1, timeout / 20))
        self.rank, self.world_size = rank, world_size
        self.prefix = f"prsgd/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{torchrun_attempt()}"
        self.address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        self._store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=max(5.0, 4 * self.interval)),
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beats = 0
        self._beat()
        self._thread = threading.Thread(target=self._run, name="prsgd-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self._beats += 1
        with self._lock:
            self._store.set(f"{self.prefix}/beat/{self.rank}", str(self._beats))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception:  # the store is gone: the failure is reported by the collective that notices it
                return

    def _read(self, kind: str) -> dict[int, str]:
        keys = [f"{self.prefix}/{kind}/{r}" for r in range(self.world_size)]
        with self._lock:
            return {r: self._store.get(k).decode() for r, k in enumerate(keys) if self._store.check([k])}

    def say_stopping(self, reason: str) -> None:
        with contextlib.suppress(Exception), self._lock:
            self._store.set(f"{self.prefix}/stopped/{self.rank}", reason[:500])

    def unresponsive(self) -> tuple[list[int], dict[int, str]]:
        """(ranks that stopped beating, {rank: the reason a rank gave for stopping}); raises if no store."""
        first = self._read("beat")
        time.sleep(2.5 * self.interval)
        second = self._read("beat")
        stopped = self._read("stopped")
        silent = [r for r in range(self.world_size) if r != self.rank and first.get(r) == second.get(r)]
        return [r for r in silent if r not in stopped], {r: why for r, why in stopped.items() if r != self.rank}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


_HEARTBEAT: Heartbeat | None = None


def torchrun_attempt() -> int:
    """How many times torchrun (``--max-restarts``) restarted this job after a failure (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def restarted_by_torchrun() -> bool:
    """Whether torchrun restarted this job after a failure: then it resumes by itself."""
    return torchrun_attempt() > 0


def start_heartbeat(timeout: float) -> None:
    global _HEARTBEAT
    if _HEARTBEAT is None and group_size() > 1:
        _HEARTBEAT = Heartbeat(timeout, group_rank(), group_size())


def explain_failure(error: BaseException, doing: str) -> PrsgdError:
    """The error to raise on this rank after ``error`` stopped a collective (or this rank's own work)."""
    if isinstance(error, PrsgdError):  # this rank's own, e.g. non-finite values: tell the others why it stops
        if _HEARTBEAT is not None:
            _HEARTBEAT.say_stopping(f"{type(error).__name__}: {error}")
        return error
    me = group_rank()
    cause = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    if _HEARTBEAT is None:
        return WorkerFailure(f"rank {me}: a collective failed while {doing}: {cause}")
    try:
        silent, stopped = _HEARTBEAT.unresponsive()
    except Exception:
        failure = WorkerFailure(
            f"rank {me}: lost the rendezvous store at {_HEARTBEAT.address} while {doing}; it runs in torchrun's "
            f"agent or, without torchrun, in rank 0, which is then unresponsive (cause: {cause})"
        )
    else:
        parts = []
        if silent:
            listed = ", ".join(map(str, silent))
            parts.append(f"rank {listed} {'is' if len(silent) == 1 else 'are'} unresponsive (died or hung)")
        parts += [f"rank {r} stopped ({why})" for r, why in sorted(stopped.items())]
        if not parts:
            parts.append("every other rank still responds")
        failure = WorkerFailure(f"rank {me}: a collective failed while {doing}: {'; '.join(parts)} (cause: {cause})")
    _HEARTBEAT.say_stopping(f"gave up after another rank's failure while {doing}")
    return failure


def shutdown() -> None:
    global _HEARTBEAT
    if _HEARTBEAT is not None:
        _HEARTBEAT.close()
        _HEARTBEAT = None
    if is_initialized():
        with contextlib.suppress(Exception):  # peers may be gone already; the process is ending anyway
            dist.destroy_process_group()


def averaged_copy(model: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """A copy of ``model`` holding the node averages of its parameters and float buffers (x_bar), for evaluation.

    One all-reduce of a temporary flat copy; it is evaluation-only traffic, not counted in ``comm``."""
    copy_ = copy.deepcopy(model)
    all_reduce_mean([t for t in (*copy_.parameters(), *copy_.buffers()) if t.is_floating_point()], process_group)
    return copy_
