"""The real engine's communication: flat storage and one collective per round over ``torch.distributed``.

This is the only module of prsgd that imports ``torch.distributed``. Parameters, floating-point model buffers and
momentum buffers are re-pointed (``Tensor.set_``) into one contiguous flat tensor, in that order, so that a sync
round is a single ``all_reduce`` over a span of it, with no gather or scatter copy. When the process group is not
initialized (or has one member) averaging does nothing, so the same code runs in a single process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


class FlatStorage:
    """One flat tensor holding ``tensors`` back to back; each tensor becomes a view into it, in place.

    The tensor objects stay the same Python objects (modules, optimizers and hooks keep working); only their
    storage moves. All tensors must share one dtype and device.
    """

    def __init__(self, tensors: Sequence[Tensor], extra_numels: Sequence[int] = ()) -> None:
        if not tensors:
            raise ValueError("FlatStorage needs at least one tensor")
        dtypes = {t.dtype for t in tensors}
        devices = {t.device for t in tensors}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
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
        if not tensors:
            return None
        storage = self.flat.untyped_storage().data_ptr()
        start = tensors[0].storage_offset()
        expected = start
        for t in tensors:
            if t.untyped_storage().data_ptr() != storage or t.storage_offset() != expected or not t.is_contiguous():
                return None
            expected += t.numel()
        return self.flat[start:expected]


class AllReduceAverage:
    """``average(tensors)`` for :mod:`prsgd.algorithm`: one ``all_reduce`` (sum, then divide by the group size).

    Tensors lying back to back in ``storage`` are reduced in place as one span; any other list is packed into
    one temporary flat tensor, reduced, and copied back (still one collective).
    """

    def __init__(self, storage: FlatStorage, process_group: dist.ProcessGroup | None = None) -> None:
        self.storage = storage
        self.process_group = process_group
        self.world_size = group_size(process_group)

    def __call__(self, tensors: list[Tensor]) -> int:
        if not tensors:
            return 0
        span = self.storage.span(tensors)
        buffer = span if span is not None else torch.cat([t.reshape(-1) for t in tensors])
        if self.world_size > 1:
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.process_group)
            buffer.div_(self.world_size)
        if span is None:
            chunks = torch.split(buffer, [t.numel() for t in tensors])
            torch._foreach_copy_(tensors, [c.view_as(t) for c, t in zip(chunks, tensors, strict=True)])
        return buffer.numel() * buffer.element_size()


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
