"""Every simulated worker's gradient at once: one callable over stacked tensors, whichever way it is computed.

``"vmap"``: one ``torch.func.vmap(grad_and_value(...))`` call over ``functional_call`` of a weightless (meta) copy
of the model, optionally ``torch.compile``-d. ``"loop"``: plain autograd per worker on views of the stacked
tensors, optionally with several workers at once in threads. :func:`choose_compute` and :func:`choose_threads`
hold the defaults' speed heuristics (measured in ``benchmarks/simulator_throughput.py``; see benchmarks/README).
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from prsgd.errors import InvalidArgument, check_bool, check_int

LossFn = Callable[[Tensor, Tensor], Tensor]
Stacked = dict[str, Tensor]
Inputs = Tensor | tuple | list | dict
"""A model's inputs: one tensor (``model(x)``), a tuple or list (``model(*inputs)``) or a dict (``model(**inputs)``)
of tensors, each with the leading worker dimension; other values in a tuple or dict go to every worker as they are."""


def map_inputs(inputs: Inputs, fn: Callable[[Any], Any]) -> Any:
    """``fn`` of each value of ``inputs`` (the tensor itself, or each item of a tuple, list or dict), in the same
    kind of container (a tuple for a list)."""
    if isinstance(inputs, dict):
        return {key: fn(value) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(fn(value) for value in inputs)
    return fn(inputs)


def worker_dims(inputs: Inputs) -> Any:
    """``in_dims`` for :func:`torch.func.vmap` over ``inputs``: 0 for each tensor, None for anything else."""
    return map_inputs(inputs, lambda value: 0 if isinstance(value, Tensor) else None)


def worker_inputs(inputs: Inputs, i: int) -> Inputs:
    """Worker ``i``'s part of the stacked ``inputs``."""
    return map_inputs(inputs, lambda value: value[i] if isinstance(value, Tensor) else value)


def call_model(model: nn.Module, params: Stacked, buffers: Stacked, inputs: Inputs) -> Any:
    """``model`` run on one worker's ``inputs`` with the given parameters and buffers (ties kept)."""
    if isinstance(inputs, dict):
        return functional_call(model, (params, buffers), (), inputs)
    if isinstance(inputs, (tuple, list)):
        return functional_call(model, (params, buffers), tuple(inputs))
    return functional_call(model, (params, buffers), (inputs,))


def weightless(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (no memory), in train mode, with the
    original's sharing kept: a parameter two modules share (tied embedding and output weights) is one meta tensor
    in the copy too, so that ``functional_call`` gives both places the one stacked tensor and autograd adds up
    both uses' gradients. (``module.to("meta")`` would untie them.)"""
    base = copy.deepcopy(model)
    metas: dict[int, Tensor] = {}
    for module in base.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None:
                    continue
                if id(t) not in metas:
                    meta = t.detach().to("meta")
                    metas[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
                store[name] = metas[id(t)]
    return base.train()


def _has(model: nn.Module, kind: type | tuple[type, ...]) -> bool:
    return any(isinstance(m, kind) for m in model.modules())


def choose_compute(compute: str, model: nn.Module, device: torch.device, compile: bool) -> str:
    """``compute`` checked, with ``"auto"`` resolved by known rules (not by timing, so that a run's arithmetic, and
    hence its result, does not depend on the machine's load): per-worker loops on CPU for conv nets (convolutions
    run faster per worker than as the grouped convolution vmap makes of them) and for recurrent nets (vmap has no
    batching rule for the CPU LSTM/GRU kernel and falls back to a slower per-sample loop); vmap otherwise and when
    compiling."""
    if compute not in ("auto", "vmap", "loop"):
        raise InvalidArgument(f"compute={compute!r} is not known; allowed: auto, vmap, loop")
    check_bool("compile", compile)
    slow_under_vmap = (nn.modules.conv._ConvNd, nn.RNNBase)
    loop_wins = _has(model, slow_under_vmap) and device.type == "cpu" and not compile
    chosen = compute if compute != "auto" else ("loop" if loop_wins else "vmap")
    if compile and chosen != "vmap":
        raise InvalidArgument(f"compile=True compiles the vmapped step; it needs compute='vmap' (got {compute!r})")
    return chosen


def choose_threads(threads: int | None, compute: str, model: nn.Module, device: torch.device, workers: int) -> int:
    """``threads`` checked, with None resolved: one thread per worker up to torch's intra-op threads for conv nets
    looped on CPU (small per-worker batches use one core each better than they share two); 1 otherwise, and for
    models with dropout (random draws in threads come in a varying order)."""
    if threads is None:
        stochastic = _has(model, nn.modules.dropout._DropoutNd)
        serial = compute != "loop" or device.type != "cpu" or stochastic or not _has(model, nn.modules.conv._ConvNd)
        threads = 1 if serial else min(workers, torch.get_num_threads())
    check_int("threads", threads, 1)
    if threads > 1 and compute != "loop":
        raise InvalidArgument(f"threads={threads} needs compute='loop' (compute={compute!r} is one call)")
    return threads


@functools.cache
def _thread_pool(threads: int) -> ThreadPoolExecutor:
    """One pool per size, shared by all simulators in the process (threads keep their per-thread library state)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="prsgd-worker")


class WorkerGradients:
    """``gradients(params, buffers, inputs, targets, loss_fn) -> (grads, losses)``: every worker's gradient of
    ``loss_fn(model(inputs[i]), targets[i])`` at its own stacked parameters ``params[name][i]``, and the losses
    (shape (N,)). ``inputs`` may be a tuple or dict of stacked tensors (:data:`Inputs`). BatchNorm statistics update
    the stacked ``buffers`` in place."""

    def __init__(self, model: nn.Module, num_workers: int, compute: str, threads: int, compile: bool) -> None:
        self.num_workers, self.compute, self.compile = num_workers, compute, compile
        base = weightless(model)
        # functional_call swaps tensors into the module: one module per thread
        self._bases = [base] + [copy.deepcopy(base) for _ in range(threads - 1)]
        self._vmapped: dict[tuple[LossFn, str], Callable] = {}  # compiled steps only
        self._grad_buffers: Stacked = {}

    def __call__(
        self, params: Stacked, buffers: Stacked, inputs: Inputs, targets: Tensor, loss_fn: LossFn
    ) -> tuple[Stacked, Tensor]:
        if self.compute == "loop":
            return self._loop(params, buffers, inputs, targets, loss_fn)
        dims = worker_dims(inputs)
        per_worker = self._vmapped.get((loss_fn, repr(dims)))
        if per_worker is None:
            base = self._bases[0]

            def loss(p: Stacked, b: Stacked, x: Inputs, y: Tensor) -> Tensor:
                return loss_fn(call_model(base, p, b, x), y)

            per_worker = vmap(grad_and_value(loss), in_dims=(0, 0, dims, 0), randomness="different")
            if self.compile:  # one compilation per input shape and per loss function object: kept
                per_worker = self._vmapped[(loss_fn, repr(dims))] = torch.compile(per_worker, dynamic=False)
        with warnings.catch_warnings():  # torch's per-op notice that vmap runs an op sample by sample
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
            return per_worker(params, buffers, inputs, targets)

    def _loop(
        self, params: Stacked, buffers: Stacked, inputs: Inputs, targets: Tensor, loss_fn: LossFn
    ) -> tuple[Stacked, Tensor]:
        """Plain autograd per worker, written into stacked gradient buffers. With T > 1 threads, thread k computes
        workers k, k + T, ... with 1/T of the intra-op threads (workers touch disjoint memory)."""
        if not self._grad_buffers:
            self._grad_buffers = {name: torch.empty_like(p) for name, p in params.items()}
        losses: list[Tensor] = [torch.empty(())] * self.num_workers  # each worker writes its own entry
        names = list(params)

        def workers(part: int, intra_op_threads: int | None) -> None:
            if intra_op_threads is not None:
                torch.set_num_threads(intra_op_threads)
            base = self._bases[part]
            for i in range(part, self.num_workers, len(self._bases)):
                mine = {name: p[i].detach().requires_grad_() for name, p in params.items()}
                own_buffers = {name: b[i] for name, b in buffers.items()}
                with torch.enable_grad():
                    loss = loss_fn(call_model(base, mine, own_buffers, worker_inputs(inputs, i)), targets[i])
                    grads = torch.autograd.grad(loss, [mine[n] for n in names], allow_unused=True)
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
