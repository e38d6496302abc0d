"""``prsgd.LocalSGD``: Algorithm 1 and its baselines as a ``torch.optim.Optimizer`` under ``torch.distributed``.

A thin shell, like ``torch.optim.SGD``: it gathers the tensors of each param group and calls
:func:`prsgd.algorithm.run_step`, which does the local update of :mod:`prsgd.functional` and, every ``period``-th
step, the sync round; averaging is one ``all_reduce`` over flat storage (:mod:`prsgd.engines.distributed`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from prsgd.algorithm import (
    CommStats,
    Hyperparameters,
    SyncTensors,
    UpdateGroup,
    check_period,
    check_topology,
    in_consensus,
    run_step,
    sync_rule,
)
from prsgd.engines.distributed import (
    AllReduceAverage,
    FlatStorage,
    NeighbourMix,
    broadcast_from_first,
    group_rank,
    group_size,
)
from prsgd.errors import InvalidArgument, NonFiniteError, check_bool
from prsgd.functional import all_finite
from prsgd.topology import make_topology


class LocalSGD(torch.optim.Optimizer):
    """Momentum SGD on each worker with periodic averaging (PR-SGD-Momentum, Yu, Jin & Yang 2019).

    Args:
        params: the model (an ``nn.Module``, so that its BatchNorm running statistics are averaged at each sync
            too) or, as for any torch optimizer, an iterable of parameters or param-group dicts (then only
            parameters and momentum are averaged). Every tensor must share one dtype and device.
        lr: learning rate gamma (> 0).
        momentum: beta in [0, 1); 0 gives local SGD.
        nesterov: option II (eq. 5) instead of Polyak's option I (eq. 4), in ``torch.optim.SGD``'s form.
        weight_decay: L2 penalty added to the gradient, as ``torch.optim.SGD`` does.
        period: I >= 1, local steps between sync rounds (eq. 6). 1 gives parallel mini-batch momentum SGD.
        sync: ``"params_and_momentum"`` (Algorithm 1), ``"params_clear_momentum"``, ``"params_only"``,
            ``"gradients"`` (all-reduce gradients every step; ignores ``period``), ``"gossip"`` (Algorithm 2:
            mix parameters and momentum with neighbours through W), ``"gossip_params_only"`` or ``"none"``.
        process_group: the workers that average together; default: the whole world. Without an initialized
            process group the optimizer runs as a single worker (averaging is a no-op).
        topology: for the gossip rules only: a name (``"ring"``, ``"torus"``, ``"exponential"``, ...), a
            :class:`prsgd.topology.Topology`, an N x N mixing matrix or an adjacency list (see
            :func:`prsgd.topology.make_topology`); worker i of the topology is rank i of the group. Each
            worker then exchanges only with its neighbours, point to point.
        check_finite: check this worker's gradients before the step (unless a GradScaler handles them) and its
            parameters, buffers and momentum after it; a NaN or infinity raises :class:`prsgd.NonFiniteError`
            naming the step and this worker's rank. Two fused passes per step (gradients, then the flat storage), no
            communication.

    Parameters, floating-point model buffers and momentum buffers live as views in one flat tensor, so each
    round is a single ``all_reduce``; momentum buffers exist (as zeros) from construction on. At construction the
    first member's parameters and buffers are broadcast to all, so every worker starts at the same x^0.
    ``comm`` counts rounds and payload bytes sent per worker (the size of what was reduced). Parameters that got
    no gradient skip the local update, as in ``torch.optim.SGD``, but are still averaged; with
    ``sync="gradients"`` a missing gradient counts as zero so that all workers stay identical. Works with AMP's
    ``GradScaler``: a step it skips for inf/NaN gradients still counts towards the period on every worker.
    """

    _step_supports_amp_scaling = True  # GradScaler then always calls step() and passes grad_scale/found_inf

    def __init__(
        self,
        params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        period: int = 1,
        sync: str = "params_and_momentum",
        process_group: Any = None,
        topology: object = None,
        check_finite: bool = False,
    ) -> None:
        self.check_finite = check_bool("check_finite", check_finite)
        Hyperparameters(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        self.period = check_period(period)
        self.rule = sync_rule(sync)
        check_topology(self.rule, topology)
        self.num_workers = group_size(process_group)
        self.topology = make_topology(topology, self.num_workers) if topology is not None else None
        model_buffers: list[Tensor] = []
        if isinstance(params, nn.Module):
            model_buffers = [b for b in params.buffers() if b.is_floating_point()]
            params = params.parameters()
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay}
        self._built = False
        super().__init__(params, defaults)
        for group in self.param_groups:
            _group_hyperparameters(group)

        all_params = [p for group in self.param_groups for p in group["params"]]
        self.model_buffers = model_buffers
        self.has_momentum = any(group["momentum"] > 0 for group in self.param_groups)
        momentum_numels = [p.numel() for p in all_params] if self.has_momentum else []
        self.storage = FlatStorage([*all_params, *model_buffers], extra_numels=momentum_numels)
        for p in all_params:
            self.state[p]["momentum_buffer"] = self.storage.allocate(p.shape) if self.has_momentum else None
        self._param_numel = sum(p.numel() for p in all_params)
        self._grads_flat = (
            torch.zeros(self._param_numel, dtype=self.storage.dtype, device=self.storage.device)
            if self.rule.averages_gradients
            else None
        )
        self.process_group = process_group
        self.average = AllReduceAverage(process_group)
        self.mix = NeighbourMix(self.topology, process_group) if self.topology is not None else None
        broadcast_from_first(
            self.storage.flat[: self._param_numel + sum(b.numel() for b in model_buffers)], process_group
        )
        self.sync_tensors = SyncTensors(
            params=all_params,
            model_buffers=model_buffers,
            momentum_buffers=[self.state[p]["momentum_buffer"] for p in all_params] if self.has_momentum else [],
        )
        self.steps_done = 0
        self.comm = CommStats()
        self._built = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_built", False):
            raise InvalidArgument(
                "LocalSGD keeps all parameters in one flat buffer fixed at construction; "
                "add_param_group after construction is not allowed: pass every group to the constructor"
            )
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One local step on this worker and, every ``period``-th call, the sync round."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf_tensor = getattr(self, "found_inf", None)
        found_inf = bool(found_inf_tensor.item()) if found_inf_tensor is not None else None

        groups = []
        grad_offset = 0
        for group in self.param_groups:
            hyper = _group_hyperparameters(group)
            if hyper.momentum > 0 and not self.has_momentum:
                raise InvalidArgument(
                    f"momentum={hyper.momentum!r} was set after LocalSGD was built with momentum 0 everywhere; "
                    "momentum buffers are allocated at construction: construct it with momentum > 0"
                )
            params, grads = [], []
            for p in group["params"]:
                if self._grads_flat is not None:
                    grad = self._grads_flat[grad_offset : grad_offset + p.numel()].view(p.shape)
                    grad_offset += p.numel()
                    grad.copy_(p.grad) if p.grad is not None else grad.zero_()
                elif p.grad is None:
                    continue
                else:
                    grad = p.grad
                if grad.is_sparse:
                    raise InvalidArgument("LocalSGD does not support sparse gradients")
                params.append(p)
                grads.append(grad)
            if grad_scale is not None and grads:
                torch._foreach_mul_(grads, float(grad_scale.double().reciprocal()))
            buffers = [self.state[p]["momentum_buffer"] for p in params] if hyper.momentum > 0 else []
            groups.append(UpdateGroup(params, grads, buffers, hyper))
        if self.check_finite and found_inf is None:
            gradients = [self._grads_flat] if self._grads_flat is not None else [g for u in groups for g in u.grads]
            self._raise_if_nonfinite("gradient", gradients, self.steps_done)

        self.steps_done, _ = run_step(
            self.rule,
            self.period,
            self.steps_done,
            groups,
            self.sync_tensors,
            self.average,
            self.comm,
            mix=self.mix,
            found_inf=found_inf,
        )
        if self.check_finite:
            self._raise_if_nonfinite("parameter, buffer or momentum", [self.storage.flat], self.steps_done - 1)
        return loss

    def _raise_if_nonfinite(self, what: str, tensors: list[Tensor], step: int) -> None:
        if not all_finite(tensors):
            raise NonFiniteError(
                f"non-finite {what} (NaN or inf) at step {step} on rank {group_rank(self.process_group)} "
                f"of {self.num_workers}"
            )

    @property
    def in_consensus(self) -> bool:
        """Whether all workers hold the same state now (see :func:`prsgd.algorithm.in_consensus`)."""
        return in_consensus(self.rule, self.steps_done, self.period, self.has_momentum)

    def state_dict(self) -> dict[str, Any]:
        """Like ``Optimizer.state_dict`` plus prsgd's counters; momentum buffers are copied out of flat storage."""
        base = super().state_dict()
        base["state"] = {
            k: {name: v.clone() if isinstance(v, Tensor) else v for name, v in s.items()}
            for k, s in base["state"].items()
        }
        base["prsgd"] = {
            "steps_done": self.steps_done,
            "rounds": self.comm.rounds,
            "bytes": self.comm.bytes,
            "period": self.period,
            "sync": self.rule.name,
        }
        return base

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        counters = state_dict.pop("prsgd", None)
        views = {p: self.state[p]["momentum_buffer"] for group in self.param_groups for p in group["params"]}
        super().load_state_dict(state_dict)
        for p, view in views.items():
            loaded = self.state[p].get("momentum_buffer")
            if view is not None and loaded is not None:
                view.copy_(loaded)
            self.state[p]["momentum_buffer"] = view
        if counters is not None:
            self.steps_done = counters["steps_done"]
            self.comm = CommStats(counters["rounds"], counters["bytes"])


def _group_hyperparameters(group: dict[str, Any]) -> Hyperparameters:
    return Hyperparameters(
        lr=group["lr"],
        momentum=group["momentum"],
        nesterov=group["nesterov"],
        weight_decay=group["weight_decay"],
    )
