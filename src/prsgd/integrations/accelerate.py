"""prsgd with Hugging Face accelerate (``pip install prsgd[accelerate]``): prepare the optimizer and the
dataloaders, never the model.

``accelerator.prepare(model)`` wraps the model in ``DistributedDataParallel``, which averages gradients every step
on top of LocalSGD's rounds (LocalSGD refuses it). The recipe::

    accelerator = Accelerator()
    model = make_model().to(accelerator.device)          # on its device BEFORE LocalSGD is built
    opt = prsgd.LocalSGD(model, 0.1, momentum=0.9, period=8)
    opt, loader = prsgd.accelerate.prepare(accelerator, model, opt, loader)
    for inputs, targets in loader:
        with accelerator.autocast():                      # the model is not prepared: autocast here
            loss = loss_fn(model(inputs), targets)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)   # optional
        opt.step()
        opt.zero_grad()
    opt.synchronize()                                     # the average, for evaluation or export
    print(opt.comm)

:func:`prepare` checks the model, calls ``accelerator.prepare`` on the optimizer and dataloaders, and returns the
optimizer as an :class:`AcceleratedLocalSGD`: accelerate's wrapper with LocalSGD's ``comm``, ``steps_done``,
``in_consensus`` and ``synchronize()`` reachable. With fp16 and a GradScaler, LocalSGD always runs its step (a
skipped one still counts towards the period); ``step_was_skipped`` says whether the update was skipped, as for
accelerate's own optimizer, so its scheduler wrapper does not step on skipped steps.

Checkpoints: ``accelerator.save_state(dir)`` / ``load_state(dir)`` work as usual (register the model with
``accelerator.register_for_checkpointing(model)``). accelerate writes the main process's model and optimizer only;
between rounds every rank holds its own parameters, buffers, momentum and round state, so :func:`prepare` hooks
into both: at ``save_state`` every rank writes its own ``prsgd_worker<k>_rank<r>.pt`` (k: the LocalSGD, in the order
prepared) into the folder, with no collective; at ``load_state`` every rank reads its own and applies it at the next
forward pass, after accelerate has restored the registered objects. A run resumed mid-period continues
bit-identically. Resuming with another number of processes is refused.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn

from prsgd.algorithm import FollowsAlgorithm, PeriodicSync
from prsgd.engines.distributed import group_rank, group_size
from prsgd.engines.guards import check_not_wrapped
from prsgd.engines.local_sgd import LocalSGD
from prsgd.errors import CheckpointError, InvalidArgument


class AcceleratedLocalSGD(FollowsAlgorithm, AcceleratedOptimizer):
    """accelerate's optimizer wrapper around a :class:`prsgd.LocalSGD`, with its algorithm state reachable
    (``comm``, ``steps_done``, ``in_consensus``, ``rule``, ``period``, ``synchronized_at``, ``drift``)."""

    @property
    def algorithm(self) -> PeriodicSync:  # type: ignore[override]
        return self.optimizer.algorithm

    def synchronize(self) -> None:
        self.optimizer.synchronize()

    def step(self, closure: Any = None) -> None:
        super().step(closure)
        if self.scaler is not None and self.gradient_state.sync_gradients:
            # GradScaler always calls LocalSGD's step (it counts a skipped one towards the period), so accelerate's
            # own test ("was step called?") would never see a skip: ask LocalSGD whether it applied the update
            self._is_overflow = not self.optimizer.last_step_applied

    def __repr__(self) -> str:
        return f"AcceleratedLocalSGD({self.optimizer!r})"


def prepare(accelerator: Any, model: nn.Module, optimizer: LocalSGD, *dataloaders: Any) -> Any:
    """``accelerator.prepare(optimizer, *dataloaders)`` for LocalSGD training of ``model`` (left unprepared).

    Returns the prepared optimizer (an :class:`AcceleratedLocalSGD`), followed by the prepared dataloaders as
    ``accelerator.prepare`` returns them."""
    if not isinstance(optimizer, LocalSGD):
        raise InvalidArgument(f"optimizer={type(optimizer).__name__}: prsgd.accelerate.prepare takes a prsgd.LocalSGD")
    check_not_wrapped(model, "given to prsgd.accelerate.prepare")
    device = optimizer.device
    if device != accelerator.device and not (device.type == accelerator.device.type == "cpu"):
        raise InvalidArgument(
            f"the model is on {device} but accelerate trains on {accelerator.device}: move the model with "
            "model.to(accelerator.device) before building LocalSGD"
        )
    prepared = accelerator.prepare(optimizer, *dataloaders)
    index = getattr(accelerator, "_prsgd_local_sgd_count", 0)
    accelerator._prsgd_local_sgd_count = index + 1
    accelerator.register_save_state_pre_hook(functools.partial(_save_worker, optimizer, index))
    accelerator.register_load_state_pre_hook(functools.partial(_load_worker, optimizer, index))
    opt = prepared[0] if dataloaders else prepared
    opt.__class__ = AcceleratedLocalSGD  # the same object, with LocalSGD's attributes reachable
    return (opt, *prepared[1:]) if dataloaders else opt


def _worker_file(folder: str, index: int) -> Path:
    return Path(folder) / f"prsgd_worker{index}_rank{group_rank()}.pt"


def _save_worker(optimizer: LocalSGD, index: int, models: Any, weights: Any, output_dir: str) -> None:
    """accelerate's save-state pre-hook, on every process: this rank's worker and round state, written atomically."""
    state = {
        "workers": group_size(),
        "flat": optimizer.worker_state().detach().cpu().clone(),
        "rounds": optimizer.round_state(),
    }
    path = _worker_file(output_dir, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def _load_worker(optimizer: LocalSGD, index: int, models: Any, input_dir: str) -> None:
    """accelerate's load-state pre-hook, on every process: this rank's state, applied at the next forward pass."""
    path = _worker_file(input_dir, index)
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: the state in {input_dir} was not saved by a LocalSGD prepared with "
            "prsgd.accelerate.prepare on this rank (every rank writes its own file at save_state)"
        )
    state = torch.load(path, map_location=optimizer.device, weights_only=False)
    if state["workers"] != group_size():
        raise CheckpointError(
            f"{input_dir} was saved by {state['workers']} processes; this run has {group_size()}: resume with as many"
        )
    optimizer.load_worker_state(state["flat"], state["rounds"], defer=True)
