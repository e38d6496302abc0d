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
skipped one still counts towards the period), so accelerate's ``step_was_skipped`` stays False.
"""

from __future__ import annotations

from typing import Any

from accelerate.optimizer import AcceleratedOptimizer
from torch import nn

from prsgd.algorithm import FollowsAlgorithm, PeriodicSync
from prsgd.engines.guards import check_not_wrapped
from prsgd.engines.local_sgd import LocalSGD
from prsgd.errors import InvalidArgument


class AcceleratedLocalSGD(FollowsAlgorithm, AcceleratedOptimizer):
    """accelerate's optimizer wrapper around a :class:`prsgd.LocalSGD`, with its algorithm state reachable
    (``comm``, ``steps_done``, ``in_consensus``, ``rule``, ``period``, ``synchronized_at``)."""

    @property
    def algorithm(self) -> PeriodicSync:  # type: ignore[override]
        return self.optimizer.algorithm

    def synchronize(self) -> None:
        self.optimizer.synchronize()

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
    opt = prepared[0] if dataloaders else prepared
    opt.__class__ = AcceleratedLocalSGD  # the same object, with LocalSGD's attributes reachable
    return (opt, *prepared[1:]) if dataloaders else opt
