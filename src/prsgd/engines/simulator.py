"""``prsgd.Simulator``: N workers in one process, as a leading tensor dimension, on one device.

Every parameter, model buffer and momentum buffer is stacked to shape ``(N, ...)``. Gradients of all workers come
from one ``torch.func.vmap(torch.func.grad_and_value(...))`` call over ``functional_call`` of a weightless copy
of the model; the update and the sync are the same :func:`prsgd.algorithm.run_step` the distributed optimizer
uses, with averaging as a mean over the worker dimension. No Python loop runs over workers.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

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
    synchronize,
)
from prsgd.errors import CheckpointError, InvalidArgument, NonFiniteError, check_bool, check_int
from prsgd.functional import all_finite
from prsgd.topology import Topology, make_topology

LossFn = Callable[[Tensor, Tensor], Tensor]


def average_over_workers(tensors: list[Tensor]) -> int:
    """Replace each stacked ``(N, ...)`` tensor by its mean over workers; return one worker's payload bytes (0 for
    a single worker, which sends nothing)."""
    if not tensors or tensors[0].shape[0] == 1:
        return 0
    nbytes = 0
    for t in tensors:
        t.copy_(t.mean(dim=0, keepdim=True).expand_as(t))
        nbytes += t[0].numel() * t.element_size()
    return nbytes


class StackedMixer:
    """``mix(tensors, step)`` for :mod:`prsgd.algorithm` on stacked ``(N, ...)`` tensors: x <- W x over dim 0.

    ``mode="sparse"`` uses the graph's sparsity: each worker's new row is the weighted sum of its own and its
    neighbours' rows, one fused vector op per edge (O(k N D) memory traffic, k = max in-degree + 1), written
    straight into the output; ``"dense"`` is one N x N matrix product (O(N^2 D) work, but a blocked BLAS call
    that reads x from memory only once). ``"auto"`` takes sparse for a tensor of at least ``SPARSE_MIN_NUMEL``
    elements per worker when 4 k^2 <= N, dense otherwise: the crossover measured on CPU by
    ``benchmarks/mixing.py`` (sparse wins for a ring at N = 64 and a torus at N = 256, loses for the
    exponential graph at both). Plans are cached per step for static graphs.
    The mixed result replaces each tensor's storage (``Tensor.set_``; the tensors must not be views of others)
    and the old storage is kept as the next step's output buffer, so a step allocates nothing.
    """

    SPARSE_MIN_NUMEL = 16_384

    def __init__(self, topology: Topology, device: torch.device, mode: str = "auto") -> None:
        if mode not in ("auto", "sparse", "dense"):
            raise InvalidArgument(f"mode={mode!r} is not known; allowed: auto, sparse, dense")
        self.topology = topology
        self.device = device
        self.mode = mode
        self._sparse_graph = 4 * (topology.max_degree + 1) ** 2 <= topology.num_workers
        self._plans: dict[int, tuple[float, Tensor, list[list[tuple[int, float]]]]] = {}
        self._spares: dict[int, Tensor] = {}

    def _plan(self, step: int) -> tuple[float, Tensor, list[list[tuple[int, float]]]]:
        """(mean out-degree, dense W, each worker's [(source, weight), ...] with itself first) for ``step``."""
        key = step if self.topology.time_varying else 0
        if key not in self._plans:
            if len(self._plans) > 64:
                self._plans.clear()
            w = self.topology.mixing_matrix(step)
            rows = [
                [(i, float(w[i, i]))] + [(int(j), float(w[i, j])) for j in np.flatnonzero(w[i]) if j != i]
                for i in range(w.shape[0])
            ]
            out_degree = float(((w > 0).sum(axis=0) - (np.diagonal(w) > 0)).mean())
            self._plans[key] = (out_degree, torch.as_tensor(w, dtype=torch.float64, device=self.device), rows)
        return self._plans[key]

    def _sparse(self, per_worker_numel: int) -> bool:
        if self.mode == "auto":
            return self._sparse_graph and per_worker_numel >= self.SPARSE_MIN_NUMEL
        return self.mode == "sparse"

    def __call__(self, tensors: list[Tensor], step: int) -> int:
        out_degree, dense, rows = self._plan(step)
        nbytes = 0
        for t in tensors:
            flat = t.reshape(t.shape[0], -1)
            mixed = self._spares.pop(id(t), None)
            if mixed is None or mixed.shape != flat.shape or mixed.dtype != flat.dtype:
                mixed = torch.empty_like(flat)
            if self._sparse(flat.shape[1]):
                for i, row in enumerate(rows):
                    (j, w_ij), *rest = row
                    torch.mul(flat[j], w_ij, out=mixed[i])
                    for j, w_ij in rest:
                        mixed[i].add_(flat[j], alpha=w_ij)
            else:
                torch.mm(dense.to(dtype=t.dtype), flat, out=mixed)
            t.set_(mixed.view(t.shape))  # the simulator owns these tensors: adopt the result, no copy back
            self._spares[id(t)] = flat  # the old storage becomes the next step's output buffer
            nbytes += flat.shape[1] * t.element_size()
        return round(out_degree * nbytes)


@functools.cache
def _thread_pool(threads: int) -> ThreadPoolExecutor:
    """One pool per size, shared by all simulators in the process (threads keep their per-thread library state)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="prsgd-worker")


class Simulator:
    """N simulated workers running Algorithm 1 (or a baseline) with per-worker batches.

    Args:
        model: the network every worker starts from (x^0); it is copied, not modified.
        num_workers: N >= 1.
        lr, momentum, nesterov, weight_decay, period, sync, topology: as in :class:`prsgd.LocalSGD`.
        device: where the stacked workers live.
        compute: how the N gradients are computed: ``"vmap"`` (one vectorized call), ``"loop"`` (plain autograd
            per worker on views of the stacked tensors: on CPU, convolutions run faster per worker than as the
            grouped convolution vmap makes of them; see ``benchmarks/simulator_throughput.py``) or ``"auto"``
            (loop for models with convolutions on CPU, vmap otherwise). Update and sync are vectorized either way.
        threads: with ``compute="loop"``, how many workers compute their gradients at once, each in its own thread
            with 1/threads of torch's intra-op threads. Default: for conv nets on CPU, ``min(num_workers,
            torch.get_num_threads())`` (small per-worker batches use one core each better than they share two); 1
            for models with dropout modules and elsewhere (an MLP's tiny ops run slower in threads). With
            threads > 1, random ops inside the model draw from torch's global generator in an order that varies
            between runs: use 1 for bit-reproducible runs then.
        compile: ``torch.compile`` the vmapped gradient step: one compilation (seconds to a minute) per input shape
            and per loss function object, so pass the same one every step; then 3-4x faster than eager vmap for a
            small MLP on CPU, faster than one model on the N-times batch. Needs ``compute="vmap"`` (``"auto"``
            then picks it) and a C++ compiler on CPU.
        check_finite: after computing the gradients and after the update, check every worker's loss, gradients,
            parameters, buffers and momentum and raise :class:`prsgd.NonFiniteError` naming the step and the
            first worker with a NaN or infinity (the gradients are checked before they are averaged or applied,
            so the worker named is the one where it arose). Costs two fused passes (one sync each) per step.

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
        topology: object = None,
        compute: str = "auto",
        threads: int | None = None,
        compile: bool = False,
        check_finite: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InvalidArgument(f"model={type(model).__name__} is not allowed; it must be a torch.nn.Module")
        check_int("num_workers", num_workers, 1)
        self.hyper = Hyperparameters(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        self.period = check_period(period)
        self.rule = sync_rule(sync)
        check_topology(self.rule, topology)
        self.num_workers = num_workers
        self.check_finite = check_bool("check_finite", check_finite)
        self.device = torch.device(device)
        if compute not in ("auto", "vmap", "loop"):
            raise InvalidArgument(f"compute={compute!r} is not known; allowed: auto, vmap, loop")
        has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
        self.compile = check_bool("compile", compile)
        loop_wins = has_conv and self.device.type == "cpu" and not self.compile
        self.compute = compute if compute != "auto" else ("loop" if loop_wins else "vmap")
        if self.compile and self.compute != "vmap":
            raise InvalidArgument(f"compile=True compiles the vmapped step; it needs compute='vmap' (got {compute!r})")
        self._compiled: dict[LossFn, Callable] = {}
        self._grad_buffers: dict[str, Tensor] = {}
        self.topology = make_topology(topology, num_workers) if topology is not None else None
        self.mix = StackedMixer(self.topology, self.device) if self.topology is not None else None

        self._template = copy.deepcopy(model).to(self.device)
        self._base = copy.deepcopy(model).to("meta")
        self._base.train()
        if threads is None:
            stochastic = any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())
            serial = self.compute != "loop" or self.device.type != "cpu" or stochastic or not has_conv
            threads = 1 if serial else min(num_workers, torch.get_num_threads())
        check_int("threads", threads, 1)
        if threads > 1 and self.compute != "loop":
            raise InvalidArgument(f"threads={threads} needs compute='loop' (compute={self.compute!r} is one call)")
        self.threads = threads
        self._bases = [self._base] + [copy.deepcopy(self._base) for _ in range(threads - 1)]

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
        self.synchronized_at: int | None = None
        self.comm = CommStats()

    def _worker_loss(self, loss_fn: LossFn) -> Callable[..., Tensor]:
        def loss(params: dict[str, Tensor], buffers: dict[str, Tensor], inputs: Tensor, targets: Tensor):
            return loss_fn(functional_call(self._base, (params, buffers), (inputs,)), targets)

        return loss

    def _loop_gradients(self, loss_fn: LossFn, inputs: Tensor, targets: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Every worker's gradient by plain autograd on views of the stacked tensors (BatchNorm statistics update
        the stacked buffers in place), written into stacked gradient buffers. With ``threads`` T > 1, thread k
        computes workers k, k + T, ... with 1/T of the intra-op threads (workers touch disjoint memory)."""
        if not self._grad_buffers:
            self._grad_buffers = {name: torch.empty_like(p) for name, p in self._params.items()}
        losses: list[Tensor] = [inputs.new_empty(())] * self.num_workers
        names = list(self._params)

        def workers(part: int, intra_op_threads: int | None) -> None:
            if intra_op_threads is not None:
                torch.set_num_threads(intra_op_threads)
            base = self._bases[part]  # functional_call swaps tensors into the module: one module per thread
            for i in range(part, self.num_workers, len(self._bases)):
                params = {name: p[i].detach().requires_grad_() for name, p in self._params.items()}
                buffers = {name: b[i] for name, b in self._buffers.items()}
                with torch.enable_grad():
                    loss = loss_fn(functional_call(base, (params, buffers), (inputs[i],)), targets[i])
                    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
                for name, g in zip(names, grads, strict=True):
                    self._grad_buffers[name][i].copy_(g) if g is not None else self._grad_buffers[name][i].zero_()
                losses[i] = loss.detach()

        if len(self._bases) == 1:
            workers(0, None)
        else:
            total, parts = torch.get_num_threads(), len(self._bases)
            try:
                futures = [_thread_pool(parts).submit(workers, k, max(1, total // parts)) for k in range(parts)]
                errors = [future.exception() for future in futures]  # all finished before anything is raised
                if any(errors):
                    raise next(e for e in errors if e is not None)
            finally:
                torch.set_num_threads(total)  # what the pool threads set is also the default for new threads
        return self._grad_buffers, torch.stack(losses)

    def step(self, inputs: Tensor, targets: Tensor, loss_fn: LossFn) -> Tensor:
        """One step of every worker on its own batch ``inputs[i], targets[i]``; returns the losses, shape (N,).

        ``loss_fn(outputs, targets)`` is the loss of one worker's batch (e.g. ``F.cross_entropy``).
        """
        for name, t in (("inputs", inputs), ("targets", targets)):
            if not isinstance(t, Tensor) or t.dim() < 1 or t.shape[0] != self.num_workers:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise InvalidArgument(
                    f"{name} has shape {shape}; its leading dimension must be num_workers={self.num_workers} "
                    "(one batch per worker, shape (N, b, ...))"
                )
        inputs = inputs.to(self.device)
        targets = targets.to(self.device)
        if self.compute == "vmap":
            per_worker = self._compiled.get(loss_fn)
            if per_worker is None:
                per_worker = vmap(grad_and_value(self._worker_loss(loss_fn)), randomness="different")
                if self.compile:
                    per_worker = self._compiled[loss_fn] = torch.compile(per_worker, dynamic=False)
            grads, losses = per_worker(self._params, self._buffers, inputs, targets)
        else:
            grads, losses = self._loop_gradients(loss_fn, inputs, targets)
        if self.check_finite:  # before the update and the averaging, so the worker named is where it arose
            self._raise_if_nonfinite([("loss", [losses.detach()]), ("gradient", list(grads.values()))], self.steps_done)
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
            mix=self.mix,
        )
        if self.check_finite:
            t = self.sync_tensors
            kinds = [("parameter", t.params), ("buffer", t.model_buffers), ("momentum buffer", t.momentum_buffers)]
            self._raise_if_nonfinite(kinds, self.steps_done - 1)
        return losses.detach()

    def _raise_if_nonfinite(self, kinds: list[tuple[str, list[Tensor]]], step: int) -> None:
        """One fused check (one device sync) of all ``kinds`` (what, stacked tensors); only after a failure are the
        tensors looked at per worker, to name the first bad kind and worker."""
        if all_finite([t for _, ts in kinds for t in ts]):
            return
        n = self.num_workers
        finite = [
            (what, torch.stack([torch.isfinite(t.reshape(n, -1)).all(1) for t in ts]).all(0))
            for what, ts in kinds
            if ts
        ]
        what, ok = next((what, ok) for what, ok in finite if not bool(ok.all()))
        bad = torch.nonzero(~ok).flatten().tolist()
        raise NonFiniteError(
            f"non-finite {what} (NaN or inf) at step {step} on worker {bad[0]} of {n}"
            + (f" (also workers {', '.join(map(str, bad[1:]))})" if len(bad) > 1 else "")
        )

    def synchronize(self) -> None:
        """One round now, outside the schedule, as :meth:`prsgd.LocalSGD.synchronize` (see
        :func:`prsgd.algorithm.synchronize`); counted in ``comm``. The schedule of later rounds is unchanged."""
        synchronize(self.rule, self.sync_tensors, average_over_workers, self.comm)
        self.synchronized_at = self.steps_done

    @property
    def in_consensus(self) -> bool:
        """Whether all workers hold the same parameters, float buffers and momentum now (see
        :func:`prsgd.algorithm.in_consensus`)."""
        return in_consensus(self.rule, self.steps_done, self.period, bool(self._momentum), self.synchronized_at)

    def state_dict(self) -> dict[str, object]:
        """Everything needed to continue bit-identically: every worker's parameters, model buffers and momentum
        buffers, the step counter (hence the position within the period), the learning rate and ``comm``."""
        return {
            "num_workers": self.num_workers,
            "params": self.params(),
            "buffers": self.buffers(),
            "momentum": self.momentum(),
            "steps_done": self.steps_done,
            "lr": self.hyper.lr,
            "comm": [self.comm.rounds, self.comm.bytes],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output of a simulator of the same model and number of workers."""
        if state.get("num_workers") != self.num_workers:
            raise CheckpointError(
                f"the state holds {state.get('num_workers')} workers; this simulator has {self.num_workers}"
            )
        for kind, ours in (("params", self._params), ("buffers", self._buffers), ("momentum", self._momentum)):
            theirs = state[kind]
            if set(theirs) != set(ours) or any(theirs[n].shape != t.shape for n, t in ours.items()):
                raise CheckpointError(f"the state's {kind} do not match this model's (names or shapes differ)")
            for name, t in ours.items():
                t.copy_(theirs[name])
        self.steps_done = int(state["steps_done"])
        self.synchronized_at = None
        self.set_lr(float(state["lr"]))
        self.comm = CommStats(*state["comm"])

    def set_lr(self, lr: float) -> None:
        """Change the learning rate gamma for the following steps (e.g. from a schedule)."""
        self.hyper = dataclasses.replace(self.hyper, lr=lr)

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
