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
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._pytree import tree_leaves

from prsgd.algorithm.contract import Collective
from prsgd.algorithm.round import ROUND_OPTIONS
from prsgd.engines import distributed
from prsgd.engines.torchrun import rendezvous_store
from prsgd.errors import InvalidArgument
from prsgd.models import build_model
from prsgd.planning.cost_model import Layout, Profile
from prsgd.training.batches import worker_sampler
from prsgd.training.config import RunConfig
from prsgd.training.train import load_data, resolve_schedule
from prsgd.training.workers import DistributedWorker, Placement, SimulatedWorkers, check_memory

WARM_UP_S = 0.5
TIMED_S = 3.0
"""Each phase is timed over at least this many seconds (whole cycles of the schedule) after ``WARM_UP_S``."""
BLOCKS = 5
"""A phase's time per step is the median of this many equal blocks' means: robust to a moment of a busy machine."""
TIMEOUT = datetime.timedelta(seconds=60)


Key = tuple[str, int, str]
"""A collective as timed: (kind, bytes, scope)."""


@dataclass(frozen=True)
class Timing:
    compute_s: float
    overhead_s: float
    """Per step, what the run's rounds cost this machine over loopback, beyond compute."""
    bare_s: dict[Key, float] = field(default_factory=dict)
    """Each collective's bare time over loopback (moving its bytes on this machine)."""


def cycle_length(config: RunConfig) -> int:
    """Steps after which the run's schedule repeats: the period times the state period (a round that also averages
    the optimizer state every ``state_period``-th round); every other option's offsets divide the period."""
    a = config.algorithm
    if a.sync in ("gradients", "none"):
        return 1
    return int(a.period) * (a.state_period or 1)


@dataclass(frozen=True)
class Setting:
    """What every run predicted for one model, data and batch shares: the config with ``"theory"`` values resolved,
    the data, the workers' sampler, the run's steps and the notes the resolution made."""

    config: RunConfig
    data: Any
    sampler: Any
    steps: int
    notes: list[str]


def prepare(config: RunConfig) -> Setting:
    data = load_data(config)
    workers = config.training.workers
    config, steps, notes = resolve_schedule(config, len(data.train), workers)
    _, sampler = worker_sampler(config, data, workers)
    return Setting(config, data, sampler, steps, notes)


def keys(cycle: list[list[Collective]]) -> set[Key]:
    """The distinct collectives of a cycle, as :func:`time_steps` times them bare."""
    return {(c.kind, c.bytes, c.scope) for step in cycle for c in step}


def profile_of(
    setting: Setting, config: RunConfig, layout: Layout, timing: Timing, traced: tuple[list[list[Collective]], int]
) -> Profile:
    """The :class:`Profile` of ``config`` (``setting``'s run with its own rounds) from its ``traced`` schedule
    (:func:`trace`) and ``timing``. The rounds' own cost that a link does not hide is what loopback measured
    beyond the bare collectives that were waited for."""
    cycle, state_bytes = traced
    t = config.training
    periodic = config.algorithm.sync not in ("gradients", "none")
    waited = sum(timing.bare_s.get((c.kind, c.bytes, c.scope), 0.0) for s in cycle for c in s if not c.overlapped)
    return Profile(
        steps=setting.steps,
        compute_s=timing.compute_s,
        cycle=cycle,
        delay=int(config.algorithm.round_spec().overlap),
        period=int(config.algorithm.period) if periodic else 1,
        layout=layout,
        state_bytes=state_bytes,
        checkpoint_steps=t.checkpoint_every or max(1, math.ceil(setting.steps / max(1, t.evals))),
        overhead_s=max(0.0, timing.overhead_s - waited / len(cycle)),
        bare_s=dict(timing.bare_s),
    )


def _model(config: RunConfig, data) -> torch.nn.Module:
    torch.manual_seed(config.training.seed)
    return build_model(config.model.model, data.input_shape, data.num_classes, hidden=config.model.hidden)


def trace(setting: Setting, config: RunConfig) -> tuple[list[list[Collective]], int]:
    """For ``config`` (``setting``'s run with its own rounds): the collectives of one cycle of steps in the steady
    state (the second cycle: an overlapped round started in the first is waited for in it), and the bytes of one
    worker's whole state, from the simulator running the run's rounds over its workers."""
    data, sampler, workers, length = setting.data, setting.sampler, config.training.workers, cycle_length(config)
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


def without_rounds(config: RunConfig) -> RunConfig:
    """``config`` with ``sync="none"`` and every round option off: compute alone."""
    return config.with_overrides({"algorithm.sync": "none", **{f"algorithm.{o.name}": o.off for o in ROUND_OPTIONS}})


def loopback_config(config: RunConfig, processes: int) -> RunConfig:
    """The run as ``processes`` workers of this machine take it: hierarchical rounds over one node."""
    overrides: dict = {"training.workers": processes}
    if config.algorithm.inner_period:
        overrides["algorithm.nodes"] = 1
    return config.with_overrides(overrides)


def time_steps(
    configs: list[RunConfig], processes: int, collectives: list[set[Key]] | None = None, timed_s: float = TIMED_S
) -> list[Timing]:
    """A :class:`Timing` for each of ``configs`` (the same model and data, other rounds) from ``processes``
    processes on 127.0.0.1 (rank 0's figures), in one session; with ``collectives``, each config's bare
    collectives are timed too."""
    if dist.is_initialized():
        raise InvalidArgument("prsgd predict measures in process groups of its own; run it outside torchrun")
    store = rendezvous_store("127.0.0.1", 0, 0, TIMEOUT)
    context = mp.get_context("spawn")
    results = context.Queue()
    loopback = [loopback_config(config, processes) for config in configs]
    keys = [sorted(c) for c in collectives] if collectives is not None else [[] for _ in configs]
    args = (store.port, loopback, keys, timed_s, results)
    others = [context.Process(target=_time_rank, args=(rank, *args), daemon=True) for rank in range(1, processes)]
    for process in others:
        process.start()
    try:
        _time_rank(0, *args, store)
        found = results.get(timeout=5)
    finally:
        for process in others:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    if isinstance(found, BaseException):
        raise found
    return found


def _time_rank(
    rank: int, port: int, configs: list[RunConfig], keys: list[list[Key]], timed_s: float, results, store=None
) -> None:
    """One loopback process. For each config, blocks of steps without rounds and with the config's rounds, in
    turn (a moment of a busy machine slows a pair alike): compute is the median block without rounds, the rounds'
    cost the median difference of a pair. Then the config's bare collectives. Rank 0 puts the timings."""
    try:
        store = store or rendezvous_store("127.0.0.1", port, rank, TIMEOUT)
        first = configs[0]
        workers = first.training.workers
        distributed.init_process_group("gloo", store=store, rank=rank, world_size=workers, timeout=TIMEOUT)
        data = load_data(first)
        _, sampler = worker_sampler(first, data, workers)
        alone = _Steps(without_rounds(first), data, sampler, rank, 1, timed_s)
        timings = []
        for config, wanted in zip(configs, keys, strict=True):
            rounds = _Steps(config, data, sampler, rank, cycle_length(config), timed_s)
            pairs = [(alone.block(), rounds.block()) for _ in range(BLOCKS)]
            compute = statistics.median(a for a, _ in pairs)
            overhead = max(0.0, statistics.median(b - a for a, b in pairs))
            bare = {key: _bare_seconds(key, rank, workers) for key in wanted}
            timings.append(Timing(compute, overhead, bare))
        if rank == 0:
            results.put(timings)
    except BaseException as error:  # handed to the caller, which raises it
        if rank == 0:
            results.put(error)
        else:
            raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _Steps:
    """A worker of ``config`` taking steps in whole cycles of ``length``: warmed up at construction, then
    :meth:`block` times about ``timed_s / BLOCKS`` seconds of steps; every rank takes the same number of steps
    (rank 0's choice, broadcast)."""

    def __init__(self, config: RunConfig, data, sampler, rank: int, length: int, timed_s: float) -> None:
        placement = Placement(torch.device(config.device), config.training.workers, rank)
        self.worker = DistributedWorker(_model(config, data), config, data, placement)
        self.worker.set_lr(config.training.lr_at(0.0))
        self.config, self.sampler, self.length, self.step = config, sampler, length, 0
        one = self._cycles(1)  # start-up, and how long a cycle takes
        counts = torch.tensor(
            [max(1, math.ceil(WARM_UP_S / max(one, 1e-6))), max(1, math.ceil(timed_s / BLOCKS / max(one, 1e-6)))]
        )
        distributed.broadcast_from_first(counts)
        warm, self.per_block = (int(c) for c in counts)
        self._cycles(warm)

    def _cycles(self, count: int) -> float:
        began = time.perf_counter()
        for _ in range(count * self.length):
            self.worker.step(self.sampler, self.step)
            self.step += 1
        if self.config.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - began

    def block(self) -> float:
        """Seconds per step over one block."""
        return self._cycles(self.per_block) / (self.per_block * self.length)


BARE_REPEATS = 9


def _bare_seconds(key: Key, rank: int, workers: int) -> float:
    """The median time of one bare collective of ``key``'s kind and bytes among the loopback processes: what moving
    those bytes costs this machine, which a link at least as fast does not add to."""
    kind, nbytes, _ = key
    if kind == "all_reduce":
        tensor = torch.zeros(max(1, nbytes // 4))

        def run() -> None:
            dist.all_reduce(tensor)

    elif kind == "all_gather":
        row = torch.zeros(nbytes, dtype=torch.uint8)
        gathered = torch.empty(nbytes * workers, dtype=torch.uint8)

        def run() -> None:
            dist.all_gather_into_tensor(gathered, row)

    else:  # point to point: to the next worker, from the previous one
        sent = torch.zeros(max(1, nbytes // 4))
        received = torch.empty_like(sent)

        def run() -> None:
            ops = [
                dist.P2POp(dist.isend, sent, (rank + 1) % workers),
                dist.P2POp(dist.irecv, received, (rank - 1) % workers),
            ]
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    times = []
    for _ in range(BARE_REPEATS):
        dist.barrier()
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return statistics.median(times[2:])
