"""Train a model with Algorithm 1 or a baseline, on the simulator or under torchrun; one visible loop.

    python -m prsgd.train --workers 8 --sync params_and_momentum --period 8 --out runs/demo
    torchrun --nproc-per-node 4 -m prsgd.train --engine distributed --sync params_and_momentum --period 8

Both engines read the same per-worker batches (:class:`prsgd.data.WorkerSampler`) and log the same records: one
JSON line per evaluation with the joint epoch, step, training loss and test loss/accuracy of the node-average
model x_bar, wall-clock seconds spent training (evaluation excluded) and the communication so far.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from prsgd.algorithm import CommStats
from prsgd.config import TrainConfig, add_arguments, from_arguments
from prsgd.data import Dataset, WorkerSampler, load_dataset
from prsgd.engines import distributed
from prsgd.engines.simulator import Simulator
from prsgd.models import build_model
from prsgd.optim import LocalSGD

Record = dict[str, Any]


class SimulatedWorkers:
    """All N workers in this process (:class:`prsgd.Simulator`)."""

    def __init__(self, model: nn.Module, config: TrainConfig, data: Dataset, num_workers: int) -> None:
        self.sim = Simulator(model, num_workers=num_workers, device=config.device, **_algorithm_kwargs(config))
        self.data = data
        self.device = torch.device(config.device)
        self.num_workers = num_workers

    @property
    def comm(self) -> CommStats:
        return self.sim.comm

    def step(self, indices: Tensor) -> None:
        inputs = self.data.train_inputs[indices].to(self.device)
        targets = self.data.train_targets[indices].to(self.device)
        self.sim.step(inputs, targets, F.cross_entropy)

    def averaged_model(self) -> nn.Module:
        return self.sim.averaged_model()


class DistributedWorker:
    """This process is worker ``rank`` of a torch.distributed group (:class:`prsgd.LocalSGD`)."""

    def __init__(self, model: nn.Module, config: TrainConfig, data: Dataset, device: torch.device) -> None:
        self.model = model.to(device)
        self.opt = LocalSGD(self.model, **_algorithm_kwargs(config))
        self.data = data
        self.device = device
        self.rank = distributed.group_rank()
        self.num_workers = distributed.group_size()

    @property
    def comm(self) -> CommStats:
        return self.opt.comm

    def step(self, indices: Tensor) -> None:
        own = indices[self.rank]
        inputs = self.data.train_inputs[own].to(self.device)
        targets = self.data.train_targets[own].to(self.device)
        self.model.train()
        self.opt.zero_grad()
        F.cross_entropy(self.model(inputs), targets).backward()
        self.opt.step()

    def averaged_model(self) -> nn.Module:
        return distributed.averaged_copy(self.model).eval()


def _algorithm_kwargs(config: TrainConfig) -> dict[str, Any]:
    return {
        "lr": config.lr,
        "momentum": config.momentum,
        "nesterov": config.nesterov,
        "weight_decay": config.weight_decay,
        "period": config.period,
        "sync": config.sync,
        "topology": config.topology or None,
    }


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Tensor, targets: Tensor, device: torch.device, batch: int = 4096):
    """(mean cross-entropy, accuracy) of ``model`` on a dataset, in eval mode."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(targets), batch):
        x = inputs[start : start + batch].to(device)
        y = targets[start : start + batch].to(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(dim=1) == y).sum().item()
    return loss_sum / len(targets), correct / len(targets)


def run(config: TrainConfig, on_record: Callable[[Record], None] | None = None) -> list[Record]:
    """Train as ``config`` says; return (and, with ``config.out``, write) the evaluation records."""
    data = load_dataset(config.dataset, seed=config.seed)
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.input_shape, data.num_classes, hidden=config.hidden)

    if config.engine == "distributed":
        device = distributed.init_from_torchrun(config.device)
        world = distributed.group_size()
        if config.workers is not None and config.workers != world:
            raise ValueError(f"workers={config.workers} differs from the torchrun world size {world}; omit --workers")
        workers: SimulatedWorkers | DistributedWorker = DistributedWorker(model, config, data, device)
    else:
        device = torch.device(config.device)
        workers = SimulatedWorkers(model, config, data, config.workers or 8)
    num_workers = workers.num_workers
    is_main = distributed.group_rank() == 0

    sampler = WorkerSampler(len(data.train_targets), num_workers, config.batch_size, seed=config.seed)
    examples_per_step = num_workers * config.batch_size
    total_steps = max(1, math.ceil(config.epochs * len(data.train_targets) / examples_per_step))
    eval_steps = sorted({round(k * total_steps / config.evals) for k in range(config.evals + 1)})

    out = Path(config.out) if config.out and is_main else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(config) | {"workers": num_workers}, indent=2) + "\n")
        (out / "log.jsonl").write_text("")

    records: list[Record] = []
    wall = 0.0
    bar = tqdm(
        total=total_steps,
        desc=f"{config.sync} I={config.period}",
        disable=not (config.progress and is_main),
        leave=False,
        dynamic_ncols=True,
    )
    for step in range(total_steps + 1):
        if step in eval_steps:
            avg = workers.averaged_model()
            train_loss, train_acc = evaluate(avg, data.train_inputs, data.train_targets, device)
            test_loss, test_acc = evaluate(avg, data.test_inputs, data.test_targets, device)
            record = {
                "joint_epoch": step * examples_per_step / len(data.train_targets),
                "step": step,
                "train_loss": train_loss,
                "train_accuracy": train_acc,
                "test_loss": test_loss,
                "test_accuracy": test_acc,
                "wall_clock": wall,
                "comm_rounds": workers.comm.rounds,
                "comm_bytes": workers.comm.bytes,
            }
            records.append(record)
            bar.set_postfix(loss=f"{train_loss:.4f}", acc=f"{test_acc:.3f}")
            if out is not None:
                with (out / "log.jsonl").open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if on_record is not None:
                on_record(record)
        if step == total_steps:
            break
        started = time.perf_counter()
        workers.step(sampler.indices(step))
        wall += time.perf_counter() - started
        bar.update(1)
    bar.close()
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prsgd.train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    config = from_arguments(parser.parse_args(argv))
    try:
        records = run(config)
        if distributed.group_rank() == 0:
            print(json.dumps(records[-1]))
    finally:
        if config.engine == "distributed":
            distributed.shutdown()


if __name__ == "__main__":
    main()
