"""What a prediction measures on this machine before a run: one worker's compute per step (real steps of the run's
model, batch and local rule, timed) and the collectives each step of the run's schedule issues (the simulator runs
the run's own rounds over its N workers with a traced count)."""

from __future__ import annotations

import gc
import math
import time

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_leaves

from prsgd.algorithm.contract import Collective
from prsgd.algorithm.round import ROUND_OPTIONS
from prsgd.data import load_dataset
from prsgd.engines import distributed
from prsgd.errors import InvalidArgument
from prsgd.models import build_model
from prsgd.planning.cost_model import Layout, Profile
from prsgd.training.config import RunConfig
from prsgd.training.train import resolve_schedule, worker_sampler
from prsgd.training.workers import DistributedWorker, Placement, SimulatedWorkers, check_memory

WARM_UP_STEPS = 3
TIMED_S = 1.0
"""Compute is timed over at least this many seconds (and at least :data:`MIN_TIMED_STEPS` steps) after warm-up."""
MIN_TIMED_STEPS = 20


def cycle_length(config: RunConfig) -> int:
    """Steps after which the run's schedule repeats: the period times the state period (a round that also averages
    the optimizer state every ``state_period``-th round); every other option's offsets divide the period."""
    a = config.algorithm
    if a.sync in ("gradients", "none"):
        return 1
    return int(a.period) * (a.state_period or 1)


def profile(config: RunConfig, layout: Layout, compute_s: float | None = None) -> tuple[Profile, list[str]]:
    """The run's :class:`Profile`; times compute unless ``compute_s`` is given. Returns the notes the schedule made
    (a period or learning rate from the theory)."""
    data = load_dataset(
        config.data.dataset,
        config.data.path,
        seed=config.training.seed,
        train_subset=config.data.train_subset,
        image_size=config.data.image_size,
    )
    workers = config.training.workers
    config, total_steps, notes = resolve_schedule(config, len(data.train), workers)
    _, sampler = worker_sampler(config, data, workers)
    cycle, state_bytes = trace(config, data, sampler, workers, cycle_length(config))
    if compute_s is None:
        compute_s = time_compute(config, data, sampler)
    t = config.training
    checkpoint_steps = t.checkpoint_every or max(1, math.ceil(total_steps / max(1, t.evals)))
    spec = config.algorithm.round_spec()
    return Profile(
        steps=total_steps,
        compute_s=compute_s,
        cycle=cycle,
        delay=int(spec.overlap),
        period=1 if config.algorithm.sync in ("gradients", "none") else int(config.algorithm.period),
        layout=layout,
        state_bytes=state_bytes,
        checkpoint_steps=checkpoint_steps,
    ), notes


def _model(config: RunConfig, data) -> torch.nn.Module:
    torch.manual_seed(config.training.seed)
    return build_model(config.model.model, data.input_shape, data.num_classes, hidden=config.model.hidden)


def trace(config: RunConfig, data, sampler, workers: int, length: int) -> tuple[list[list[Collective]], int]:
    """(the collectives of ``length`` consecutive steps in the steady state (the second cycle: an overlapped round
    started in the first is waited for in it), the bytes of one worker's whole state), from the simulator running
    the run's rounds over ``workers``."""
    with torch.device("meta"):
        shape_only = build_model(config.model.model, data.input_shape, data.num_classes, hidden=config.model.hidden)
    check_memory(shape_only, workers, torch.device(config.device))
    simulated = SimulatedWorkers(_model(config, data), config, data, workers)
    simulated.comm.trace = [[]]
    for step in range(2 * length):
        simulated.step(sampler, step)
    steps = simulated.comm.trace[length : 2 * length]
    state = [t for t in tree_leaves(simulated.state()) if isinstance(t, torch.Tensor)]
    state_bytes = sum(t.numel() * t.element_size() for t in state) // workers
    del simulated
    gc.collect()
    return steps, state_bytes


def time_compute(config: RunConfig, data, sampler) -> float:
    """Seconds per step of one worker: ``prsgd.LocalSGD`` without rounds in a one-process group, as each process of
    a distributed run steps (its batch, forward, backward, local update)."""
    if dist.is_initialized():
        raise InvalidArgument("prsgd predict times compute in a process group of its own; run it outside torchrun")
    local = config.with_overrides({"algorithm.sync": "none", **{f"algorithm.{o.name}": o.off for o in ROUND_OPTIONS}})
    store = dist.HashStore()
    distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        placement = Placement(torch.device(config.device), config.training.workers)
        worker = DistributedWorker(_model(config, data), local, data, placement)
        worker.set_lr(local.training.lr_at(0.0))
        for step in range(WARM_UP_STEPS):
            worker.step(sampler, step)
        if config.device.startswith("cuda"):
            torch.cuda.synchronize()
        steps, began = 0, time.perf_counter()
        while steps < MIN_TIMED_STEPS or time.perf_counter() - began < TIMED_S:
            worker.step(sampler, WARM_UP_STEPS + steps)
            steps += 1
        if config.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - began) / steps
    finally:
        dist.destroy_process_group()
