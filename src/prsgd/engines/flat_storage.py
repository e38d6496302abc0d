"""One flat tensor holding a worker's parameters, float buffers, gradient copies and optimizer state, field by field.

:class:`prsgd.LocalSGD` keeps everything a round communicates here, in the fixed order
``params | buffers | grads | state | local_state``, so that every round the algorithm asks for is one contiguous span:
``params + buffers (+ state)`` for parameter rounds, ``buffers + grads`` for ``sync="gradients"`` (which never
averages the optimizer state). The layout knows its spans; nothing is re-discovered from storage pointers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from prsgd.algorithm.local import LocalRule
from prsgd.algorithm.rules import Field
from prsgd.errors import InvalidArgument

ORDER: tuple[Field, ...] = ("params", "buffers", "grads", "state", "local_state")


class FlatStorage:
    """``adopt``: existing tensors re-pointed (``Tensor.set_``) into the flat tensor, keeping their values and their
    Python identity (modules, optimizers and hooks keep working); ``allocate``: new zero tensors of the given
    shapes, carved from it. All adopted tensors must share one dtype and device.
    """

    def __init__(
        self, adopt: Mapping[Field, Sequence[Tensor]], allocate: Mapping[Field, Sequence[torch.Size]] = {}
    ) -> None:
        tensors = [t for field in ORDER for t in adopt.get(field, ())]
        if not tensors:
            raise InvalidArgument("FlatStorage needs at least one tensor")
        dtypes = {t.dtype for t in tensors}
        devices = {t.device for t in tensors}
        if len(dtypes) > 1 or len(devices) > 1:
            raise InvalidArgument(
                "all parameters and floating-point buffers must share one dtype and device to live in one flat "
                f"buffer; got dtypes {sorted(map(str, dtypes))} on devices {sorted(map(str, devices))}"
            )
        if set(adopt) & set(allocate) or not set(adopt) | set(allocate) <= set(ORDER):
            raise InvalidArgument(f"FlatStorage fields must be distinct and among {ORDER}")
        self.dtype, self.device = tensors[0].dtype, tensors[0].device
        total = sum(t.numel() for t in tensors) + sum(s.numel() for shapes in allocate.values() for s in shapes)
        self.flat = torch.zeros(total, dtype=self.dtype, device=self.device)
        self._fields: dict[Field, list[Tensor]] = {}
        self._regions: dict[Field, tuple[int, int]] = {}
        offset = 0
        with torch.no_grad():
            for field in ORDER:
                start = offset
                views = []
                for t in adopt.get(field, ()):
                    self.flat[offset : offset + t.numel()].view(t.shape).copy_(t)
                    t.set_(self.flat.untyped_storage(), offset, t.shape)
                    views.append(t)
                    offset += t.numel()
                for shape in allocate.get(field, ()):
                    views.append(self.flat[offset : offset + shape.numel()].view(shape))
                    offset += shape.numel()
                self._fields[field] = views
                self._regions[field] = (start, offset)

    def tensors(self, field: Field) -> list[Tensor]:
        """The field's tensors, views into the flat tensor, in the order given."""
        return self._fields[field]

    def span(self, fields: Sequence[Field]) -> Tensor:
        """The 1-D view covering ``fields``, which must be neighbours in ``params | buffers | grads | state``
        (empty fields in between do not count)."""
        wanted = [f for f in ORDER if f in fields]
        if list(fields) != wanted:
            raise ValueError(f"fields {tuple(fields)} are not in the storage's order {ORDER}")
        start, end = self._regions[wanted[0]][0], self._regions[wanted[-1]][1]
        between = ORDER[ORDER.index(wanted[0]) : ORDER.index(wanted[-1]) + 1]
        gaps = [f for f in between if f not in wanted and self._regions[f][0] != self._regions[f][1]]
        if gaps:
            raise ValueError(f"fields {tuple(fields)} are not one span: {gaps} lie between them")
        return self.flat[start:end]


def place_state(
    storage: FlatStorage, state: dict, params: Sequence[Tensor], names: Sequence[str], rule: LocalRule
) -> list[Tensor]:
    """Put the local rule's state where ``torch.optim`` keeps it, ``state[p][name]``: the tensors of ``names`` are the
    storage's ``state`` then ``local_state`` views, each name's in parameter order (None for a name the rule keeps
    none of); its counters are new tensors outside the storage (never sent), returned name by name."""
    views = iter([*storage.tensors("state"), *storage.tensors("local_state")])
    for name in names:
        for p in params:
            state[p][name] = next(views)
    for name in rule.STATE:
        for p in params:
            state[p].setdefault(name, None)
    for name in rule.COUNTERS:
        for p in params:
            state[p][name] = rule.counter()
    return [state[p][name] for name in rule.COUNTERS for p in params]
