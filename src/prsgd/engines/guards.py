"""Loud errors instead of silent wrong training when :class:`prsgd.LocalSGD` meets the user's own stack.

LocalSGD does all of a worker's communication itself, on parameters that live as views of one flat tensor. Each
check here turns a way of breaking that, which would otherwise train on without a sign, into an
:class:`prsgd.InvalidArgument` raised before a step trains on it:

- a torchrun-style environment (``WORLD_SIZE > 1``) with no process group: every rank would train alone;
- a model wrapped in ``DistributedDataParallel`` or FSDP, before or after LocalSGD was built, before or after
  training started: DDP would average gradients every step on top of LocalSGD's rounds (or silently stop), and
  broadcast rank 0's buffers;
- parameters or buffers moved out of the flat storage after construction (``model.to(device)``, ``.half()``, a
  wrapper that re-allocates them): rounds would average stale copies.

Parameters passed without their model, when that model has float buffers (BatchNorm statistics) the optimizer
cannot see, give one warning at the first forward.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from prsgd.engines.distributed import FlatStorage, is_initialized
from prsgd.errors import InvalidArgument


def _wrapper_types() -> tuple[type, ...]:
    types: list[type] = [DistributedDataParallel]
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        types += [FullyShardedDataParallel, FSDPModule]
    except ImportError:  # pragma: no cover - builds without FSDP
        pass
    return tuple(types)


WRAPPERS = _wrapper_types()

_HOW_TO_WRAP = (
    "LocalSGD averages by itself: give it the plain module and do not wrap that module in DDP/FSDP (with "
    "Lightning use prsgd.lightning.LocalSGDStrategy; with accelerate prepare the optimizer and dataloaders, "
    "not the model)"
)


def check_process_group(process_group: object) -> None:
    """Refuse to run as a lone worker when the environment says this process is one of several."""
    world = os.environ.get("WORLD_SIZE", "1")
    if process_group is None and not is_initialized() and world.isdigit() and int(world) > 1:
        raise InvalidArgument(
            f"WORLD_SIZE={world} in the environment (torchrun?) but torch.distributed has no initialized process "
            "group, so each rank would train alone while thinking it averages; call "
            "prsgd.engines.distributed.init_process_group('gloo' or 'nccl') before building LocalSGD"
        )


def check_not_wrapped(model: nn.Module, when: str) -> None:
    """Refuse a model that is (or contains) a DDP/FSDP wrapper."""
    for name, module in model.named_modules():
        if isinstance(module, WRAPPERS):
            where = f"the model's submodule {name!r}" if name else "the model"
            raise InvalidArgument(f"{where} is a {type(module).__name__} ({when}); {_HOW_TO_WRAP}")


class StoragePlacement:
    """Checks that parameters and float buffers still are the views of the flat storage LocalSGD made of them."""

    def __init__(self, storage: FlatStorage, tensors: Sequence[Tensor]) -> None:
        self.tensors = list(tensors)
        self.expected = [t.data_ptr() for t in self.tensors]
        self.storage = storage

    def check(self) -> None:
        if [t.data_ptr() for t in self.tensors] == self.expected:
            return
        moved = next(i for i, t in enumerate(self.tensors) if t.data_ptr() != self.expected[i])
        t = self.tensors[moved]
        raise InvalidArgument(
            f"tensor {moved} of LocalSGD's parameters and buffers (shape {tuple(t.shape)}, {t.dtype} on {t.device}) "
            f"no longer lives in its flat storage ({self.storage.dtype} on {self.storage.device}): something "
            "replaced its data after LocalSGD was built (model.to(...), .half(), DDP/FSDP, accelerate's "
            "prepare(model), load_state_dict(assign=True), ...), so rounds would average stale copies; move, cast "
            f"and wrap the model first, then build LocalSGD. {_HOW_TO_WRAP}"
        )


class ForwardCheck:
    """A global forward pre-hook for LocalSGD's lifetime, on the modules that run on its parameters.

    Until the first ``step()`` it looks at each such module once: a DDP/FSDP wrapper among them is refused, and float
    buffers LocalSGD cannot see (the parameters were passed without ``model=``) are warned about once. Afterwards
    (:meth:`settle`) it only asks whether a module is a wrapper (one ``isinstance`` per module call), so a model wrapped
    in DDP after training started is refused at its first forward through the wrapper, before DDP's backward would
    all-reduce gradients on top of LocalSGD's rounds. :meth:`before_next_forward` runs a function at the next
    forward over LocalSGD's parameters (a resumed run's round stages take their x^0 there, whatever order the model
    and the optimizer were loaded in)."""

    def __init__(self, params: Sequence[Tensor], buffers: Sequence[Tensor], warn_buffers: bool) -> None:
        self.param_ids = {id(p) for p in params}
        self.buffer_ids = {id(b) for b in buffers}
        self.warn_buffers = warn_buffers
        self.seen: set[int] = set()
        self.settled = False
        self.pending: list[Callable[[], None]] = []
        self.handle = nn.modules.module.register_module_forward_pre_hook(self)

    def _ours(self, module: nn.Module) -> bool:
        return any(id(p) in self.param_ids for p in module.parameters())

    def __call__(self, module: nn.Module, args: object) -> None:
        if self.pending and self._ours(module):
            self.run_pending()
        if self.settled:
            if isinstance(module, WRAPPERS) and self._ours(module):
                self._refuse(module)
            return
        if id(module) in self.seen:
            return
        self.seen.add(id(module))
        if not self._ours(module):
            return
        if isinstance(module, WRAPPERS):
            self._refuse(module)
        if self.warn_buffers:
            unseen = [
                name for name, b in module.named_buffers() if b.is_floating_point() and id(b) not in self.buffer_ids
            ]
            if unseen:
                self.warn_buffers = False
                warnings.warn(
                    f"LocalSGD got parameters of a {type(module).__name__} whose float buffers ({', '.join(unseen[:4])}"
                    f"{', ...' if len(unseen) > 4 else ''}) it cannot see: they are never averaged across workers. "
                    "Pass the model itself, or LocalSGD(param_groups, lr, model=model)",
                    stacklevel=3,
                )

    def _refuse(self, module: nn.Module) -> None:
        raise InvalidArgument(f"the model was wrapped in {type(module).__name__} and runs through it; {_HOW_TO_WRAP}")

    def settle(self) -> None:
        """From now on only wrappers are looked for (after the first step)."""
        self.settled = True
        self.seen.clear()

    def before_next_forward(self, work: Callable[[], None]) -> None:
        self.pending.append(work)

    def run_pending(self) -> None:
        pending, self.pending = self.pending, []
        for work in pending:
            work()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
            self.seen.clear()
