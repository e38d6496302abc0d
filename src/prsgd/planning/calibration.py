"""What a prediction measures on this machine before a run.

- **The schedule's collectives**: the simulator runs the run's own rounds over its N workers with a traced count
  (:attr:`prsgd.algorithm.contract.CommStats.trace`): every collective's kind, bytes, scope and overlap, step by step.
- **Compute, and what rounds cost this machine besides the link**: processes of ``prsgd.LocalSGD`` on this
  machine's loopback (as many as the run puts on one machine, sharing its cores; 2 by default) take real steps of
  the run's model, batch and local rule, first without rounds (compute per step), then with the run's round
  options (compute plus the rounds' own work: packing, compression's encoding and error feedback, gloo's protocol
  over loopback). The difference is the rounds' cost on this machine that no link
  removes; the link's time is the cost model's.
"""

from __future__ import annotations

import datetime
import gc
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._pytree import tree_leaves

from prsgd.algorithm.contract import Collective
from prsgd.algorithm.round import ROUND_OPTIONS
from prsgd.data import load_dataset
from prsgd.engines import distributed
from prsgd.engines.torchrun import rendezvous_store
from prsgd.errors import InvalidArgument
from prsgd.models import build_model
from prsgd.planning.cost_model import Layout, Profile
from prsgd.training.batches import worker_sampler
from prsgd.training.config import RunConfig
from prsgd.training.train import resolve_schedule
from prsgd.training.workers import DistributedWorker, Placement, SimulatedWorkers, check_memory

WARM_UP_S = 0.5
TIMED_S = 3.0
"""Each phase is timed over at least this many seconds (whole cycles of the schedule) after ``WARM_UP_S``."""
BLOCKS = 5
"""A phase's time per step is the median of this many equal blocks' means: robust to a moment of a busy machine."""
TIMEOUT = datetime.timedelta(seconds=60)


@dataclass(frozen=True)
class Timing:
    compute_s: float
    overhead_s: float
    """Per step, what the run's rounds cost this machine over loopback (their own work), beyond compute."""


def cycle_length(config: RunConfig) -> int:
    """Steps after which the run's schedule repeats: the period times the state period (a round that also averages
    the optimizer state every ``state_period``-th round); every other option's offsets divide the period."""
    a = config.algorithm
    if a.sync in ("gradients", "none"):
        return 1
    return int(a.period) * (a.state_period or 1)


def load(config: RunConfig):
    return load_dataset(
        config.data.dataset,
        config.data.path,
        seed=config.training.seed,
        train_subset=config.data.train_subset,
        image_size=config.data.image_size,
    )


def profile(
    config: RunConfig, layout: Layout, compute_s: float | None = None, processes: int = 2
) -> tuple[Profile, list[str]]:
    """The run's :class:`Profile`. Without ``compute_s`` (another device's compute per step), compute and the
    rounds' own cost are measured here by ``processes`` workers at once (:func:`time_steps`); with it, only the
    link is modelled. Returns the notes the schedule made (a period or learning rate from the theory)."""
    data = load(config)
    workers = config.training.workers
    config, total_steps, notes = resolve_schedule(config, len(data.train), workers)
    _, sampler = worker_sampler(config, data, workers)
    length = cycle_length(config)
    cycle, state_bytes = trace(config, data, sampler, workers, length)
    timing = Timing(compute_s, 0.0) if compute_s is not None else time_steps(config, length, processes)
    t = config.training
    checkpoint_steps = t.checkpoint_every or max(1, math.ceil(total_steps / max(1, t.evals)))
    spec = config.algorithm.round_spec()
    return Profile(
        steps=total_steps,
        compute_s=timing.compute_s,
        cycle=cycle,
        delay=int(spec.overlap),
        period=1 if config.algorithm.sync in ("gradients", "none") else int(config.algorithm.period),
        layout=layout,
        state_bytes=state_bytes,
        checkpoint_steps=checkpoint_steps,
        overhead_s=timing.overhead_s,
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


def loopback_config(config: RunConfig, processes: int) -> RunConfig:
    """The run as ``processes`` workers of this machine take it: hierarchical rounds over one node."""
    overrides: dict = {"training.workers": processes}
    if config.algorithm.inner_period:
        overrides["algorithm.nodes"] = 1
    return config.with_overrides(overrides)


def time_steps(config: RunConfig, length: int, processes: int) -> Timing:
    """:class:`Timing` from ``processes`` processes on 127.0.0.1 (rank 0's figures)."""
    if dist.is_initialized():
        raise InvalidArgument("prsgd predict measures in process groups of its own; run it outside torchrun")
    store = rendezvous_store("127.0.0.1", 0, 0, TIMEOUT)
    port = store.port
    context = mp.get_context("spawn")
    results = context.Queue()
    loopback = loopback_config(config, processes)
    others = [
        context.Process(target=_time_rank, args=(rank, port, loopback, length, results), daemon=True)
        for rank in range(1, processes)
    ]
    for process in others:
        process.start()
    try:
        _time_rank(0, port, loopback, length, results, store)
        found = results.get(timeout=5)
    finally:
        for process in others:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    if isinstance(found, BaseException):
        raise found
    return found


def _time_rank(rank: int, port: int, config: RunConfig, length: int, results, store=None) -> None:
    """One loopback process: without rounds, then with the run's rounds; rank 0 puts the :class:`Timing`."""
    try:
        store = store or rendezvous_store("127.0.0.1", port, rank, TIMEOUT)
        workers = config.training.workers
        distributed.init_process_group("gloo", store=store, rank=rank, world_size=workers, timeout=TIMEOUT)
        data = load(config)
        _, sampler = worker_sampler(config, data, workers)
        local = config.with_overrides(
            {"algorithm.sync": "none", **{f"algorithm.{o.name}": o.off for o in ROUND_OPTIONS}}
        )
        compute = _seconds_per_step(local, data, sampler, rank, 1)
        with_rounds = _seconds_per_step(config, data, sampler, rank, length)
        if rank == 0:
            results.put(Timing(compute, max(0.0, with_rounds - compute)))
    except BaseException as error:  # handed to the caller, which raises it
        if rank == 0:
            results.put(error)
        else:
            raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _seconds_per_step(config: RunConfig, data, sampler, rank: int, length: int) -> float:
    """Steps in whole cycles of ``length``: warm-up, then :data:`BLOCKS` blocks of at least :data:`TIMED_S` /
    BLOCKS seconds each; every rank takes the same number of steps (the first rank's choice, broadcast)."""
    placement = Placement(torch.device(config.device), config.training.workers, rank)
    worker = DistributedWorker(_model(config, data), config, data, placement)
    worker.set_lr(config.training.lr_at(0.0))
    step = 0

    def cycles(count: int) -> float:
        nonlocal step
        began = time.perf_counter()
        for _ in range(count * length):
            worker.step(sampler, step)
            step += 1
        if config.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - began

    one = cycles(1)  # the first cycle: start-up, and how long a cycle takes
    per_block = torch.tensor([max(1, math.ceil(TIMED_S / BLOCKS / max(one, 1e-6)))], dtype=torch.int64)
    warm = torch.tensor([max(1, math.ceil(WARM_UP_S / max(one, 1e-6)))], dtype=torch.int64)
    distributed.broadcast_from_first(per_block)
    distributed.broadcast_from_first(warm)
    cycles(int(warm))
    blocks = [cycles(int(per_block)) / (int(per_block) * length) for _ in range(BLOCKS)]
    return statistics.median(blocks)
