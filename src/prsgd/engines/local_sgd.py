"""``prsgd.LocalSGD``: Algorithm 1 and its baselines as a ``torch.optim.Optimizer`` under ``torch.distributed``.

A thin shell, like ``torch.optim.SGD``: it gathers the tensors of each param group and calls
:meth:`prsgd.algorithm.PeriodicSync.step`, which does the local update of :mod:`prsgd.algorithm.functional` and, every
``period``-th step, the round; the tensors live in one :class:`~prsgd.engines.flat_storage.FlatStorage` and a round
is one collective over a span of it (:class:`~prsgd.engines.distributed.ProcessGroupCommunicator`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from prsgd.algorithm import FollowsAlgorithm, PeriodicSync, RoundSpec, UpdateGroup
from prsgd.algorithm.functional import all_finite
from prsgd.algorithm.local import local_rule
from prsgd.algorithm.topology import make_topology
from prsgd.algorithm.wrapped import wrap
from prsgd.engines import fault_tolerance
from prsgd.engines.distributed import (
    ProcessGroupCommunicator,
    broadcast_from_first,
    group_rank,
    group_size,
    node_group,
    same_ranks_group,
)
from prsgd.engines.fault_tolerance import FaultTolerance
from prsgd.engines.flat_storage import FlatStorage, place_state
from prsgd.engines.guards import ForwardCheck, StoragePlacement, check_not_wrapped, check_process_group
from prsgd.engines.replica_groups import FaultTolerantCommunicator, ReplicaGroups
from prsgd.engines.torchrun import torchrun_nodes
from prsgd.engines.worker_state import WorkerState
from prsgd.errors import InvalidArgument, NonFiniteError, check_bool


class LocalSGD(WorkerState, FollowsAlgorithm, torch.optim.Optimizer):
    """Momentum SGD (or AdamW) on each worker with periodic averaging (PR-SGD-Momentum, Yu, Jin & Yang 2019).

    Args:
        params: the model (an ``nn.Module``, so that its BatchNorm running statistics are averaged at each sync
            too) or, as for any torch optimizer, an iterable of parameters or param-group dicts; then pass
            ``model=`` as well to have the model's float buffers averaged (a warning says so at the first forward
            when a model with float buffers is trained without it). Every tensor must share one dtype and device.
        lr: learning rate gamma (> 0), positional or keyword as in ``torch.optim.SGD``.
        optimizer: the local rule: ``"sgd"`` (momentum SGD, the paper's; the default) or ``"adamw"``
            (``torch.optim.AdamW``'s step; its state ``exp_avg``, ``exp_avg_sq`` and ``step`` under torch's names in
            ``opt.state[p]``), or any ``torch.optim.Optimizer`` instance built on the model's parameters
            (:mod:`prsgd.algorithm.wrapped`: its own step and settings; the state it keeps per parameter is averaged
            with the parameters). A rule's settings given to another are refused.
        momentum: sgd: beta in [0, 1); 0 (the default) gives local SGD.
        nesterov: sgd: option II (eq. 5) instead of Polyak's option I (eq. 4), in ``torch.optim.SGD``'s form.
        weight_decay: sgd: L2 penalty added to the gradient (default 0), as ``torch.optim.SGD`` does; adamw:
            decoupled weight decay (default 0.01), as ``torch.optim.AdamW`` does.
        betas, eps: adamw: as ``torch.optim.AdamW`` (defaults (0.9, 0.999) and 1e-8).
        process_group: the workers that average together; default: the whole world. Without an initialized
            process group it runs as a single worker (averaging does nothing, ``comm`` counts nothing); with
            ``WORLD_SIZE > 1`` in the environment (torchrun) that is refused.
        check_finite: check this worker's gradients before the step (unless a GradScaler does) and all its tensors
            after it: a NaN or infinity raises :class:`prsgd.NonFiniteError` naming the step and rank.
        model: with ``params`` given as parameters or param groups, the model they belong to: its float buffers
            are averaged with the parameters, and its other tensors (frozen parameters, integer buffers) are
            broadcast from the first worker at construction.
        round: the round's description, a :class:`prsgd.RoundSpec` (rule, period and every option, checked
            together); or, as a convenience, its fields as keywords (``sync=``, ``period=``, ``compression=``, ...):
        sync: ``"params_and_momentum"`` (Algorithm 1, the default), ``"params_clear_momentum"``, ``"params_only"``,
            ``"gradients"`` (all-reduce gradients and float buffers every step), ``"gossip"`` (Algorithm 2: mix
            parameters and state with neighbours through W), ``"gossip_params_only"`` or ``"none"``.
        period: I >= 1, local steps between sync rounds (eq. 6). 1 gives parallel mini-batch momentum SGD.
        topology, compression, overlap, inner_period, nodes, outer_lr, outer_momentum, state_period, sync_state: as
            :class:`prsgd.RoundSpec` describes them (worker i of a topology is rank i of the group; ``nodes``
            defaults to ``WORLD_SIZE / LOCAL_WORLD_SIZE`` from torchrun's environment).
        fault_tolerant: ``True`` (settings from torchft's environment, ``TORCHFT_LIGHTHOUSE`` and
            ``REPLICA_GROUP_ID``) or a :class:`prsgd.FaultTolerance`: this process is one replica group of a
            fault-tolerant run (:mod:`prsgd.engines.replica_groups`). Each round averages over the groups alive;
            a group that dies is left out, and one that starts (again) recovers the whole state from a live peer at
            construction, which waits for the others' next round. Read :attr:`steps_done` after construction: a
            group that recovered continues at its peer's step. Not with gossip, overlapped or hierarchical rounds,
            ``sync="none"``, a wrapped torch optimizer, ``process_group`` or more than one rank per group.

    With ``overlap`` or ``inner_period``, construction creates process groups (``torch.distributed.new_group``):
    every rank of the world constructs its LocalSGD at the same point.

    Parameters, floating-point model buffers and optimizer state live as views in one flat tensor, so each round
    is a single ``all_reduce``; the state exists (as zeros) from construction on. At construction the first
    member's model is broadcast so every worker starts at the same x^0. ``comm`` counts rounds and payload bytes
    sent per worker. Parameters that got no gradient skip the local update, as in ``torch.optim``, but are still
    averaged; with ``sync="gradients"`` a missing gradient counts as zero so that all workers stay identical.

    LocalSGD does all the communication itself: a model wrapped in ``DistributedDataParallel`` or FSDP (before or
    after construction), or parameters moved out of its flat storage (``model.to(...)``, ``.half()``, a wrapper
    that re-allocates them after construction), are refused with :class:`prsgd.InvalidArgument` before a step
    trains on them. AMP: ``GradScaler`` works with or without ``scaler.unscale_(opt)`` and gradient clipping before
    ``scaler.step(opt)``; a step it skips for inf/NaN gradients still counts towards the period on every worker, so
    all workers keep syncing at the same steps (PyTorch issue 76282).
    """

    _step_supports_amp_scaling = True  # GradScaler then always calls step() and passes grad_scale/found_inf

    def __init__(
        self,
        params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | None = None,
        *,
        optimizer: str | torch.optim.Optimizer = "sgd",
        momentum: float | None = None,
        nesterov: bool | None = None,
        weight_decay: float | None = None,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        process_group: Any = None,
        check_finite: bool = False,
        model: nn.Module | None = None,
        round: RoundSpec | None = None,
        fault_tolerant: bool | FaultTolerance = False,
        **round_options: Any,
    ) -> None:
        self.check_finite = check_bool("check_finite", check_finite)
        settings = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, betas=betas, eps=eps)
        self._wrapped = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
        if self._wrapped is not None:
            rule, hyper = wrap(self._wrapped, params, settings)
        else:
            rule, hyper = local_rule(optimizer, **settings)
        spec = RoundSpec.of(round, **round_options)
        check_process_group(process_group)
        tolerance = fault_tolerance.settings_for(fault_tolerant, spec, process_group, self._wrapped)
        if spec.inner_period is not None and spec.nodes is None:
            spec = spec.replace(nodes=torchrun_nodes())
        spec.check_workers(group_size(process_group))
        has_state = hyper is None or rule.keeps_state([hyper.as_kwargs()])
        self.algorithm = PeriodicSync(spec, has_state=has_state, local_rule=rule)
        self.nodes = spec.nodes
        if isinstance(params, nn.Module):
            if model is not None:
                raise InvalidArgument(
                    "LocalSGD got a model as params and model= as well: pass the model once (as params), or pass "
                    "parameters / param groups as params and the model as model="
                )
            params, model = params.parameters(), params
        if model is not None and not isinstance(model, nn.Module):
            raise InvalidArgument(f"model={type(model).__name__} is not allowed; it must be a torch.nn.Module")
        if model is not None:
            check_not_wrapped(model, "at construction")
        self.num_workers = group_size(process_group)
        self.topology = make_topology(spec.topology, self.num_workers) if spec.topology is not None else None
        self._built = False
        if self._wrapped is not None:  # its param groups and state, the very objects: schedulers on either work
            super().__init__(self._wrapped.param_groups, self._wrapped.defaults)
            self.state = self._wrapped.state
        else:
            super().__init__(params, hyper.as_kwargs())
        for index, group in enumerate(self.param_groups):
            self._group_hyperparameters(index, group)

        all_params = [p for group in self.param_groups for p in group["params"]]
        model_buffers: list[Tensor] = []
        if model is not None:
            model_buffers = [b for b in model.buffers() if b.is_floating_point()]
            owned = {id(p) for p in model.parameters()}
            strangers = [i for i, p in enumerate(all_params) if id(p) not in owned]
            if strangers:
                raise InvalidArgument(
                    f"{len(strangers)} of the {len(all_params)} parameters given to LocalSGD are not parameters of "
                    f"model= ({type(model).__name__}); pass the model they belong to"
                )
        self.model_buffers = model_buffers
        self.has_momentum = self.algorithm.has_state = rule.keeps_state(self.param_groups)
        synced, kept = self.algorithm.state_layout(rule.state_names(self.has_momentum))
        self._state_names = (*synced, *kept, *rule.COUNTERS)  # what each step's update reads, by name
        shapes = [p.shape for p in all_params]
        # layout params | buffers | grads (sync="gradients" only) | state | local_state (by name): a round is one span
        self.storage = FlatStorage(
            {"params": all_params, "buffers": model_buffers},
            {
                "grads": shapes if self.rule.averages_gradients else [],
                "state": shapes * len(synced),
                "local_state": shapes * len(kept),
            },
        )
        self._counters = place_state(self.storage, self.state, all_params, (*synced, *kept), rule)
        self.process_group = process_group
        self.fault_tolerance: ReplicaGroups | None = None
        if tolerance is not None:  # this process is one replica group of a fault-tolerant run
            identity = fault_tolerance.identity(spec, rule.name, self.param_groups, all_params, model_buffers)
            self.fault_tolerance = ReplicaGroups(tolerance, self, identity, self.storage.device)
            self.engine: ProcessGroupCommunicator = FaultTolerantCommunicator(
                self.storage, self.fault_tolerance, counters=self._counters
            )
        else:
            self.engine = ProcessGroupCommunicator(
                self.storage,
                process_group,
                self.topology,
                counters=self._counters,
                state=rule.state_tensors if self._wrapped is not None else None,
                node_group=node_group(self.nodes, process_group) if self.nodes is not None else None,
                background_group=same_ranks_group(process_group) if self.algorithm.overlap is not None else None,
            )
        broadcast_from_first(self.storage.span(("params", "buffers")), process_group)
        if model is not None:  # frozen parameters and integer buffers: the same everywhere too
            flat_ids = {id(t) for t in (*all_params, *model_buffers)}
            for t in (*model.parameters(), *model.buffers()):
                if id(t) not in flat_ids:
                    broadcast_from_first(t.data, process_group)
        self.algorithm.attach(self.engine)  # x^0, the same on every rank
        self._placement = StoragePlacement(self.storage, [*all_params, *model_buffers])
        self._forward_check = ForwardCheck(all_params, model_buffers, warn_buffers=model is None)
        weakref.finalize(self, self._forward_check.close)  # the hook goes with the optimizer
        self._last_step_applied = True
        self._built = True
        if self.fault_tolerance is not None:  # the first quorum: x^0 (or a live peer's state) from another group
            try:
                self.fault_tolerance.join()
            except BaseException:  # no quorum, another config: its servers do not outlive the error
                self.fault_tolerance.close()
                raise

    def __repr__(self) -> str:
        topology = self.topology.name if self.topology is not None else None
        rank = group_rank(self.process_group)
        head = (
            f"LocalSGD(sync={self.rule.name!r}, period={self.period}, topology={topology!r}, "
            f"workers={self.num_workers}, rank={rank}, steps_done={self.steps_done}, "
            f"comm=(rounds={self.comm.rounds}, bytes={self.comm.bytes}))"
        )
        keys = self.algorithm.local_rule.keys
        groups = "".join(
            f"\n  group {i}: {len(g['params'])} tensors, " + ", ".join(f"{k}={g[k]}" for k in keys)
            for i, g in enumerate(self.param_groups)
        )
        return head + groups

    @property
    def device(self) -> torch.device:
        """Where this worker's tensors live (every one of them: they share one flat storage)."""
        return self.storage.device

    @property
    def last_step_applied(self) -> bool:
        """Whether the last :meth:`step` applied its update (False when a GradScaler found inf/NaN gradients: the step
        still counted towards the period)."""
        return self._last_step_applied

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
        self._forward_check.settle()
        self._forward_check.run_pending()  # no forward since a load: the tensors hold what was loaded
        if self.steps_done == 0 or self.algorithm.communicates_next_step:
            self._placement.check()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf_tensor = getattr(self, "found_inf", None)
        found_inf = bool(found_inf_tensor.item()) if found_inf_tensor is not None else None

        averaged_grads = self.storage.tensors("grads")  # sync="gradients": every gradient, a missing one as zero
        groups = []
        k = -1
        for index, group in enumerate(self.param_groups):
            hyper = self._group_hyperparameters(index, group)
            params, grads = [], []
            for p in group["params"]:
                k += 1
                if averaged_grads:
                    grad = averaged_grads[k]
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
            state = {name: [self.state[p][name] for p in params] for name in self._state_names}
            groups.append(UpdateGroup(params, grads, state, hyper))
        if self.check_finite and found_inf is None:
            gradients = [self.storage.span(("grads",))] if averaged_grads else [g for u in groups for g in u.grads]
            self._raise_if_nonfinite("gradient", gradients, self.steps_done)
        if self.fault_tolerance is not None and self.algorithm.communicates_next_step:
            self._last_step_applied = self.fault_tolerance.step(
                lambda: self.algorithm.step(groups, found_inf=found_inf)
            )
        else:
            self._last_step_applied = self.algorithm.step(groups, found_inf=found_inf)
        if self.check_finite:
            self._raise_if_nonfinite("parameter, buffer or momentum", [self.storage.flat], self.steps_done - 1)
        return loss

    @torch.no_grad()
    def synchronize(self) -> None:
        """One round now, outside the schedule: before evaluation, export or the end of training, so that every
        worker holds the average. Parameters and float buffers are averaged over all workers (gossip rules too:
        an exact average, not a mixing step); momentum is averaged (``params_and_momentum``, ``gossip``), cleared
        (``params_clear_momentum``) or kept per worker (``params_only``, ``gossip_params_only``, ``none``), as the
        rule's own rounds do. Counted in ``comm``; the schedule of later rounds is unchanged. Every worker must
        call it at the same point (it is a collective)."""
        self._placement.check()
        self._forward_check.run_pending()
        if self.fault_tolerance is not None:
            self.fault_tolerance.step(lambda: self.algorithm.synchronize() or True)
        else:
            self.algorithm.synchronize()

    def _raise_if_nonfinite(self, what: str, tensors: list[Tensor], step: int) -> None:
        if not all_finite(tensors):
            raise NonFiniteError(
                f"non-finite {what} (NaN or inf) at step {step} on rank {group_rank(self.process_group)} "
                f"of {self.num_workers}"
            )

    def state_dict(self) -> dict[str, Any]:
        """Like ``Optimizer.state_dict`` plus prsgd's counters; momentum buffers are copied out of flat storage."""
        self._forward_check.run_pending()  # a state loaded and saved again with no step between
        base = super().state_dict()
        base["state"] = {
            k: {name: v.clone() if isinstance(v, Tensor) else v for name, v in s.items()}
            for k, s in base["state"].items()
        }
        base["prsgd"] = self.algorithm.state_dict()
        return base

    def load_state_dict(self, state_dict: dict[str, Any], *, from_consensus: bool = False) -> None:
        """Like ``Optimizer.load_state_dict``; momentum is copied into flat storage, prsgd's counters restored.

        ``from_consensus=True`` accepts a state saved by another number of workers while they were in consensus
        (:attr:`in_consensus`): the step counter is rescaled to keep the joint epoch (see
        :meth:`prsgd.algorithm.PeriodicSync.load_state_dict`). With ``compression``, compressed rounds then start
        afresh from the loaded values at the next forward pass, so the model's state may be loaded before or after."""
        state_dict = dict(state_dict)
        counters = state_dict.pop("prsgd", None)
        if self._wrapped is not None:
            self._load_wrapped(state_dict)  # its state lives in the instance, not in views of the storage
        else:
            names = (*self.algorithm.local_rule.STATE, *self.algorithm.local_rule.COUNTERS)
            views = {p: {n: self.state[p][n] for n in names} for group in self.param_groups for p in group["params"]}
            kept = {n for by_name in views.values() for n, v in by_name.items() if v is not None}
            self.algorithm.local_rule.check_saved(state_dict, kept, "this LocalSGD")
            super().load_state_dict(state_dict)
            for p, by_name in views.items():
                for name, view in by_name.items():
                    loaded = self.state[p].get(name)
                    if view is not None and loaded is not None:
                        view.copy_(loaded)
                    self.state[p][name] = view
        if counters is not None:
            self.algorithm.load_state_dict(counters, from_consensus=from_consensus)
            # stages that restart take x^0 at the next forward (or step), after the model's state is loaded too
            self._forward_check.before_next_forward(self.algorithm.take_x0)
