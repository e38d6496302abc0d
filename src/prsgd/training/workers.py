"""A run's workers behind one protocol, whichever engine holds them: every engine branch of a run is here.

:func:`place` decides where the workers live (this process for the simulator; one rank per process under
torchrun, joined here) and :func:`make_workers` builds them: :class:`SimulatedWorkers` (all N in this process,
:class:`prsgd.Simulator`) or :class:`DistributedWorker` (this process is one of them, :class:`prsgd.LocalSGD`).
``prsgd.train`` runs one loop over the :class:`Workers` protocol and never asks which engine it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prsgd.algorithm import CommStats, FollowsAlgorithm, PeriodicSync
from prsgd.algorithm.drift import DriftMeter
from prsgd.data import Dataset, WorkerSampler
from prsgd.engines import distributed
from prsgd.engines.fault_tolerance import FaultTolerance
from prsgd.engines.local_sgd import LocalSGD
from prsgd.engines.simulator import Simulator
from prsgd.engines.torchrun import Torchrun
from prsgd.errors import InvalidArgument, NonFiniteError, check_device
from prsgd.training import batches
from prsgd.training.config import ConfigError, RunConfig
from prsgd.training.evaluation import loss_and_correct


class Workers(Protocol):
    """What a training run needs of its workers."""

    num_workers: int
    shard_rank: int  # this process's checkpoint shard
    comm: CommStats
    in_consensus: bool
    drift: DriftMeter

    def set_lr(self, lr: float) -> None: ...

    def step(self, sampler: WorkerSampler, step: int) -> None: ...

    def fault_record(self) -> dict[str, Any]:
        """What a log record says of the replica groups' quorums (fault tolerance); empty otherwise."""
        ...

    def evaluate(self, split, indices: Tensor) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) of the node-average model x_bar on ``split[indices]``."""
        ...

    def state(self) -> dict[str, Any]: ...

    def load(self, state: dict[str, Any], from_consensus: bool = False) -> None:
        """Restore :meth:`state`; ``from_consensus``: a consensus state saved by another number of workers."""
        ...


@dataclass
class Placement:
    """Where a run's workers live: this process's device, how many workers there are, this process's rank, and
    the torchrun membership (None for the simulator)."""

    device: torch.device
    num_workers: int
    rank: int = 0
    torchrun: Torchrun | None = None
    group: int | None = None
    """With fault tolerance: this job's replica group (the worker it is, and its data shard); ``rank`` is then its
    rank within the group's own job."""

    @property
    def worker(self) -> int:
        """Which of the ``num_workers`` workers this process is (its data shard)."""
        return self.rank if self.group is None else self.group

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files and reports."""
        return self.rank == 0

    @property
    def restarted(self) -> bool:
        """Whether torchrun restarted this job after a failure (the run then resumes by itself), as all ranks
        agreed when they joined (:attr:`prsgd.engines.torchrun.Torchrun.restarted`)."""
        return self.torchrun is not None and self.torchrun.restarted

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` in rank order (``[obj]`` for the simulator)."""
        return distributed.all_gather_objects(obj) if self.torchrun is not None else [obj]

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` everywhere."""
        return distributed.broadcast_object(obj) if self.torchrun is not None else obj

    def explain_failure(self, error: BaseException, doing: str) -> BaseException:
        """Under torchrun, the error naming the rank that died, hung or stopped; else ``error`` itself."""
        return self.torchrun.explain_failure(error, doing) if self.torchrun is not None else error


def place(config: RunConfig, torchrun: Torchrun | None = None) -> Placement:
    """The run's :class:`Placement`; joins the process group torchrun describes (unless ``torchrun`` is given)
    for ``engine="distributed"`` and checks the world size against ``training.workers``."""
    device = check_device("device", config.device, ConfigError)
    if config.engine != "distributed":
        return Placement(device, config.training.workers)
    joined = torchrun is None
    group = None
    if config.fault_tolerant:  # checked before joining: the Lighthouse's address and this group's number
        try:
            group = FaultTolerance(groups=config.training.workers).resolved().replica_group
        except InvalidArgument as error:
            raise ConfigError(str(error)) from None
    torchrun = torchrun or Torchrun.join(config.device, config.worker_timeout)
    num_workers = distributed.group_size()
    if group is not None:
        if num_workers != 1:
            if joined:
                torchrun.close()
            raise ConfigError(
                f"fault_tolerant=True runs one process per replica group; torchrun started {num_workers} "
                "(use --nproc-per-node 1, one torchrun job per group)"
            )
        return Placement(torchrun.device, config.training.workers, distributed.group_rank(), torchrun, group)
    if config.training.workers != num_workers:
        if joined:
            torchrun.close()
        raise ConfigError(
            f"training.workers={config.training.workers} but torchrun started {num_workers} processes; "
            f"set training.workers={num_workers} or start {config.training.workers} processes"
        )
    return Placement(torchrun.device, num_workers, distributed.group_rank(), torchrun)


def make_workers(placement: Placement, model: nn.Module, config: RunConfig, data: Dataset) -> Workers:
    """The run's workers, starting from ``model`` (x^0)."""
    if placement.torchrun is None:
        return SimulatedWorkers(model, config, data, placement.num_workers)
    return DistributedWorker(model, config, data, placement)


def algorithm_kwargs(config: RunConfig) -> dict[str, Any]:
    """The engines' algorithm arguments from a config whose ``"theory"`` values are resolved."""
    a = config.algorithm
    return {
        "lr": config.training.lr_at(0.0),
        "optimizer": a.optimizer,
        **a.local_settings(),
        "round": a.round_spec(),
    }


class _EngineWorkers(FollowsAlgorithm):
    """What both kinds of workers read from their engine (a Simulator or a LocalSGD, as ``self.engine``): its
    algorithm's counters and consensus."""

    engine: Simulator | LocalSGD

    def fault_record(self) -> dict[str, Any]:
        return {}

    @property
    def algorithm(self) -> PeriodicSync:  # type: ignore[override]
        return self.engine.algorithm


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (MemAvailable for the CPU), or None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(model: nn.Module, num_workers: int, device: torch.device) -> None:
    """Refuse, before allocating, a simulator whose stacked state cannot fit: N workers x (parameters, optimizer
    state, gradients, buffers) is a lower bound of what it holds. ``model`` may live on the meta device."""
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    state = 3 * state + sum(b.numel() * b.element_size() for b in model.buffers())
    need, free = num_workers * state, available_bytes(device)
    if free is not None and need > free:
        raise ConfigError(
            f"training.workers={num_workers} simulated workers of a {state / 2**20:.1f} MB model state need at least "
            f"{need / 2**30:.1f} GB on {device}, which has {free / 2**30:.1f} GB available: fewer workers, a smaller "
            "model, or engine='distributed'"
        )


class SimulatedWorkers(_EngineWorkers):
    """All N workers in this process (:class:`prsgd.Simulator`)."""

    shard_rank = 0  # all workers live in this process: one checkpoint shard

    def __init__(self, model: nn.Module, config: RunConfig, data: Dataset, num_workers: int) -> None:
        self.sim = self.engine = Simulator(
            model,
            num_workers=num_workers,
            device=config.device,
            check_finite=config.training.check_finite,
            compile=config.training.compile,
            compute=config.training.compute,
            **algorithm_kwargs(config),
        )
        self.data, self.config = data, config
        self.device = torch.device(config.device)
        self.num_workers = num_workers

    def state(self) -> dict[str, Any]:
        return self.sim.state_dict()

    def load(self, state: dict[str, Any], from_consensus: bool = False) -> None:
        self.sim.load_state_dict(state, from_consensus=from_consensus)

    def set_lr(self, lr: float) -> None:
        self.sim.set_lr(lr)

    def step(self, sampler: WorkerSampler, step: int) -> None:
        x, y = batches.worker_batches(self.data, sampler.indices(step), range(self.num_workers), step, self.config)
        self.sim.step(x.to(self.device), y.to(self.device), F.cross_entropy)

    def evaluate(self, split, indices: Tensor) -> tuple[float, float]:
        loss_sum, correct, count = loss_and_correct(self.sim.averaged_model(), split, indices, self.device)
        return loss_sum / count, round(correct) / count


class DistributedWorker(_EngineWorkers):
    """This process is worker ``rank`` of a torch.distributed group (:class:`prsgd.LocalSGD`)."""

    def __init__(self, model: nn.Module, config: RunConfig, data: Dataset, placement: Placement) -> None:
        self.model = model.to(placement.device)
        kwargs = algorithm_kwargs(config)
        if placement.group is not None:
            kwargs["fault_tolerant"] = FaultTolerance(
                replica_group=placement.group, groups=placement.num_workers, timeout=config.worker_timeout
            )
        self.opt = self.engine = LocalSGD(self.model, check_finite=config.training.check_finite, **kwargs)
        self.data, self.config = data, config
        self.device = placement.device
        self.rank = placement.worker
        self.shard_rank = placement.rank
        self.num_workers = placement.num_workers

    def fault_record(self) -> dict[str, Any]:
        """With fault tolerance, what the log records of the quorums (participants, groups lost and joined, ...)."""
        tolerance = self.opt.fault_tolerance
        return tolerance.membership.record() if tolerance is not None else {}

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}

    def load(self, state: dict[str, Any], from_consensus: bool = False) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"], from_consensus=from_consensus)

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def step(self, sampler: WorkerSampler, step: int) -> None:
        own = sampler.worker_indices(step, self.rank).unsqueeze(0)  # only this worker's batch is drawn
        x, y = batches.worker_batches(self.data, own, range(self.rank, self.rank + 1), step, self.config)
        self.model.train()
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(x[0].to(self.device)), y[0].to(self.device))
        if self.config.training.check_finite and not bool(torch.isfinite(loss)):
            raise NonFiniteError(f"non-finite loss ({loss.item()}) at step {step} on rank {self.rank}")
        loss.backward()
        self.opt.step()

    def evaluate(self, split, indices: Tensor) -> tuple[float, float]:
        """Every rank holds the same averaged model: each evaluates every world-size-th example and one
        all-reduce adds up the sums, so evaluation takes 1/N of the time it would on one rank. A fault-tolerant
        replica group evaluates its own model (the groups' average right after a round)."""
        average = distributed.averaged_copy(self.model)
        ranks, rank = distributed.group_size(), distributed.group_rank()
        mine = loss_and_correct(average, split, indices[rank::ranks], self.device)
        sums = torch.tensor(mine, dtype=torch.float64, device=self.device)  # NCCL reduces CUDA only
        loss_sum, correct, count = distributed.all_reduce_sum_(sums).tolist()
        return loss_sum / count, round(correct) / count
