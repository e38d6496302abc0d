"""``prsgd.Simulator``: N workers in one process, as a leading tensor dimension, on one device.

Every parameter, model buffer and momentum buffer is stacked to shape ``(N, ...)``. Gradients of all workers come
from one ``torch.func.vmap(torch.func.grad_and_value(...))`` call over ``functional_call`` of a weightless copy
of the model; the update and the sync are the same :func:`prsgd.algorithm.run_step` the distributed optimizer
uses, with averaging as a mean over the worker dimension. No Python loop runs over workers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from prsgd.algorithm import (
    CommStats,
    Hyperparameters,
    SyncTensors,
    UpdateGroup,
    check_period,
    run_step,
    sync_rule,
)

LossFn = Callable[[Tensor, Tensor], Tensor]


def average_over_workers(tensors: list[Tensor]) -> int:
    """Replace each stacked ``(N, ...)`` tensor by its mean over workers; return one worker's payload bytes."""
    nbytes = 0
    for t in tensors:
        t.copy_(t.mean(dim=0, keepdim=True).expand_as(t))
        nbytes += t[0].numel() * t.element_size()
    return nbytes


class Simulator:
    """N simulated workers running Algorithm 1 (or a baseline) with per-worker batches.

    Args:
        model: the network every worker starts from (x^0); it is copied, not modified.
        num_workers: N >= 1.
        lr, momentum, nesterov, weight_decay, period, sync: as in :class:`prsgd.LocalSGD`.
        device: where the stacked workers live.

    BatchNorm running statistics (floating-point model buffers) are per worker and averaged at every sync, as in
    :class:`prsgd.LocalSGD`. ``comm`` counts what a real run would send per worker.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_workers: int,
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        period: int = 1,
        sync: str = "params_and_momentum",
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model={type(model).__name__} is not allowed; it must be a torch.nn.Module")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers={num_workers!r} is not allowed; it must be an integer >= 1")
        self.hyper = Hyperparameters(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        self.period = check_period(period)
        self.rule = sync_rule(sync)
        self.num_workers = num_workers
        self.device = torch.device(device)

        self._template = copy.deepcopy(model).to(self.device)
        self._base = copy.deepcopy(model).to("meta")
        self._base.train()

        def stack(t: Tensor) -> Tensor:
            return t.detach().to(self.device).unsqueeze(0).repeat(num_workers, *([1] * t.dim())).contiguous()

        self._params = {name: stack(p) for name, p in model.named_parameters()}
        self._buffers = {name: stack(b) for name, b in model.named_buffers()}
        self._momentum = {name: torch.zeros_like(p) for name, p in self._params.items()} if momentum > 0 else {}
        self.sync_tensors = SyncTensors(
            params=list(self._params.values()),
            model_buffers=[b for b in self._buffers.values() if b.is_floating_point()],
            momentum_buffers=list(self._momentum.values()),
        )
        self.steps_done = 0
        self.comm = CommStats()

    def _worker_loss(self, loss_fn: LossFn) -> Callable[..., Tensor]:
        def loss(params: dict[str, Tensor], buffers: dict[str, Tensor], inputs: Tensor, targets: Tensor):
            return loss_fn(functional_call(self._base, (params, buffers), (inputs,)), targets)

        return loss

    def step(self, inputs: Tensor, targets: Tensor, loss_fn: LossFn) -> Tensor:
        """One step of every worker on its own batch ``inputs[i], targets[i]``; returns the losses, shape (N,).

        ``loss_fn(outputs, targets)`` is the loss of one worker's batch (e.g. ``F.cross_entropy``).
        """
        for name, t in (("inputs", inputs), ("targets", targets)):
            if not isinstance(t, Tensor) or t.dim() < 1 or t.shape[0] != self.num_workers:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"{name} has shape {shape}; its leading dimension must be num_workers={self.num_workers} "
                    "(one batch per worker, shape (N, b, ...))"
                )
        inputs = inputs.to(self.device)
        targets = targets.to(self.device)
        per_worker = vmap(grad_and_value(self._worker_loss(loss_fn)), randomness="different")
        grads, losses = per_worker(self._params, self._buffers, inputs, targets)
        group = UpdateGroup(
            params=list(self._params.values()),
            grads=[grads[name] for name in self._params],
            momentum_buffers=list(self._momentum.values()),
            hyper=self.hyper,
        )
        self.steps_done, _ = run_step(
            self.rule,
            self.period,
            self.steps_done,
            [group],
            self.sync_tensors,
            average_over_workers,
            self.comm,
        )
        return losses.detach()

    def params(self) -> dict[str, Tensor]:
        """Every worker's parameters: name -> ``(N, ...)`` tensor (a copy)."""
        return {name: p.clone() for name, p in self._params.items()}

    def momentum(self) -> dict[str, Tensor]:
        """Every worker's momentum buffer: name -> ``(N, ...)`` (a copy); empty when momentum is 0."""
        return {name: m.clone() for name, m in self._momentum.items()}

    def buffers(self) -> dict[str, Tensor]:
        """Every worker's model buffers (e.g. BatchNorm running statistics): name -> ``(N, ...)`` (a copy)."""
        return {name: b.clone() for name, b in self._buffers.items()}

    def averaged_model(self) -> nn.Module:
        """A new module holding the node averages x_bar (and averaged float buffers), in eval mode."""
        model = copy.deepcopy(self._template)
        state = {name: p.mean(dim=0) for name, p in self._params.items()}
        for name, b in self._buffers.items():
            state[name] = b.mean(dim=0) if b.is_floating_point() else b[0]
        model.load_state_dict(state)
        return model.eval()
