"""Train a model with Algorithm 1, Algorithm 2 or a baseline, on the simulator or under torchrun; one visible loop.

    python -m prsgd.train --workers 8 --sync params_and_momentum --period 8 --out runs/demo
    torchrun --nproc-per-node 4 -m prsgd.train --engine distributed --sync params_and_momentum --period 8

Every config key is a flag (``--dataset fashion_mnist --model cnn --split dirichlet --alpha 0.3 ...``; see
``--help``). Both engines read the same per-worker batches (:class:`prsgd.data.WorkerSampler`, same augmentation
draws) and log the same records: one JSON line per evaluation with the joint epoch, step, learning rate, training
loss/accuracy (on a fixed subset of the training set) and test loss/accuracy of the node-average model x_bar,
wall-clock seconds spent training (evaluation excluded) and the communication so far.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from prsgd import checkpoint
from prsgd.algorithm import CommStats
from prsgd.config import ConfigError, RunConfig, add_flat_arguments, from_flat_arguments
from prsgd.data import Dataset, WorkerSampler, label_distribution, load_dataset, partition
from prsgd.data.augment import random_crop_flip
from prsgd.engines import distributed
from prsgd.engines.simulator import Simulator
from prsgd.errors import CheckpointError, NonFiniteError, PrsgdError
from prsgd.models import build_model
from prsgd.optim import LocalSGD
from prsgd.theory import recommended_lr, recommended_period

Record = dict[str, Any]


def worker_batches(
    data: Dataset, indices: Tensor, workers: range, step: int, config: RunConfig
) -> tuple[Tensor, Tensor]:
    """The batches of ``workers`` (rows of ``indices``) at ``step``, augmented with per-(seed, step, worker)
    random draws so that every engine sees exactly the same inputs."""
    x, y = data.train.batch(indices)
    if config.data.augment and data.is_image:
        x = torch.stack(
            [
                random_crop_flip(x[k], torch.Generator().manual_seed(_seed(config.training.seed, step, w)))
                for k, w in enumerate(workers)
            ]
        )
    return x, y


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class SimulatedWorkers:
    """All N workers in this process (:class:`prsgd.Simulator`)."""

    def __init__(self, model: nn.Module, config: RunConfig, data: Dataset, num_workers: int) -> None:
        self.sim = Simulator(
            model,
            num_workers=num_workers,
            device=config.device,
            check_finite=config.training.check_finite,
            compile=config.training.compile,
            **algorithm_kwargs(config),
        )
        self.data, self.config = data, config
        self.device = torch.device(config.device)
        self.num_workers = num_workers
        self.shard_rank = 0  # all workers live in this process: one checkpoint shard

    @property
    def in_consensus(self) -> bool:
        return self.sim.in_consensus

    def state(self) -> dict[str, Any]:
        return self.sim.state_dict()

    def load(self, state: dict[str, Any], steps_done: int | None = None) -> None:
        """Restore ``state``; with ``steps_done``, ``state`` is a consensus state of another number of workers:
        every worker starts from its worker 0 and the step counter becomes ``steps_done``."""
        if steps_done is not None:
            state = dict(state, num_workers=self.num_workers, steps_done=steps_done)
            for kind in ("params", "buffers", "momentum"):
                state[kind] = {n: t[:1].expand(self.num_workers, *t.shape[1:]) for n, t in state[kind].items()}
        self.sim.load_state_dict(state)

    @property
    def comm(self) -> CommStats:
        return self.sim.comm

    def set_lr(self, lr: float) -> None:
        self.sim.set_lr(lr)

    def step(self, sampler: WorkerSampler, step: int) -> None:
        x, y = worker_batches(self.data, sampler.indices(step), range(self.num_workers), step, self.config)
        self.sim.step(x.to(self.device), y.to(self.device), F.cross_entropy)

    def averaged_model(self) -> nn.Module:
        return self.sim.averaged_model()


class DistributedWorker:
    """This process is worker ``rank`` of a torch.distributed group (:class:`prsgd.LocalSGD`)."""

    def __init__(self, model: nn.Module, config: RunConfig, data: Dataset, device: torch.device) -> None:
        self.model = model.to(device)
        self.opt = LocalSGD(self.model, check_finite=config.training.check_finite, **algorithm_kwargs(config))
        self.data, self.config = data, config
        self.device = device
        self.rank = distributed.group_rank()
        self.num_workers = distributed.group_size()
        self.shard_rank = self.rank

    @property
    def in_consensus(self) -> bool:
        return self.opt.in_consensus

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}

    def load(self, state: dict[str, Any], steps_done: int | None = None) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if steps_done is not None:
            self.opt.steps_done = steps_done

    @property
    def comm(self) -> CommStats:
        return self.opt.comm

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def step(self, sampler: WorkerSampler, step: int) -> None:
        own = sampler.worker_indices(step, self.rank).unsqueeze(0)  # only this worker's batch is drawn
        x, y = worker_batches(self.data, own, range(self.rank, self.rank + 1), step, self.config)
        self.model.train()
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(x[0].to(self.device)), y[0].to(self.device))
        if self.config.training.check_finite and not bool(torch.isfinite(loss)):
            raise NonFiniteError(f"non-finite loss ({loss.item()}) at step {step} on rank {self.rank}")
        loss.backward()
        self.opt.step()

    def averaged_model(self) -> nn.Module:
        return distributed.averaged_copy(self.model).eval()


def algorithm_kwargs(config: RunConfig) -> dict[str, Any]:
    a = config.algorithm
    return {
        "lr": config.training.lr_at(0.0),
        "momentum": a.momentum,
        "nesterov": a.nesterov,
        "weight_decay": a.weight_decay,
        "period": a.period,
        "sync": a.sync,
        "topology": a.topology or None,
    }


@torch.no_grad()
def evaluate(model: nn.Module, split, indices: Tensor, device: torch.device, batch: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``split[indices]``, in eval mode.

    Under torchrun every rank holds the same (averaged) model: each evaluates every world-size-th example and one
    all-reduce adds up the sums, so evaluation takes 1/N of the time it would on one rank."""
    model.eval()
    rank, world = distributed.group_rank(), distributed.group_size()
    loss_sum, correct = 0.0, 0
    for chunk in indices[rank::world].split(batch):
        x, y = split.batch(chunk)
        logits = model(x.to(device))
        y = y.to(device)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(dim=1) == y).sum().item()
    sums = torch.tensor([loss_sum, float(correct)], dtype=torch.float64, device=device)  # NCCL reduces CUDA only
    loss_sum, correct = distributed.all_reduce_sum_(sums).tolist()
    return loss_sum / len(indices), round(correct) / len(indices)


def run(config: RunConfig, on_record: Callable[[Record], None] | None = None) -> list[Record]:
    """Train as ``config`` says; return (and, with ``config.out``, write) the evaluation records.

    Everything that can be wrong with the config or the data is checked before the first step."""
    t = config.training
    if config.engine == "distributed" and t.compile:
        raise ConfigError("training.compile=True compiles the simulator's vmapped step; engine='distributed' has none")
    data = load_dataset(
        config.data.dataset,
        config.data.path,
        seed=t.seed,
        train_subset=config.data.train_subset,
        image_size=config.data.image_size,
    )
    if config.engine == "distributed":
        device = distributed.init_from_torchrun(config.device, config.worker_timeout)
        num_workers = distributed.group_size()
        if t.workers != num_workers:
            raise ConfigError(
                f"training.workers={t.workers} but torchrun started {num_workers} processes; "
                f"set training.workers={num_workers} or start {t.workers} processes"
            )
    else:
        device, num_workers = torch.device(config.device), t.workers
    is_main = distributed.group_rank() == 0
    shards = partition(
        data.train.targets,
        num_workers,
        config.data.split,
        seed=t.seed,
        alpha=config.data.alpha,
        classes_per_worker=config.data.classes_per_worker,
        min_size=t.batch_size,
    )
    examples_per_step = num_workers * t.batch_size
    total_steps = max(1, math.ceil(t.epochs * len(data.train) / examples_per_step))
    if config.algorithm.period == "theory":
        period = recommended_period(num_workers, total_steps, identical=config.data.split == "identical")
        config = config.with_overrides({"algorithm.period": period})
        if is_main:
            tqdm.write(f"algorithm.period = 'theory': I = {period} for N = {num_workers}, T = {total_steps}")
    if config.training.lr == "theory":
        lr = recommended_lr(num_workers, total_steps, lr_scale=t.lr_scale)
        config = config.with_overrides({"training.lr": lr})
        t = config.training
        if is_main:
            tqdm.write(
                f"training.lr = 'theory': gamma = {t.lr_scale:g} sqrt(N / T) = {lr:.6g} for N = {num_workers}, "
                f"T = {total_steps}"
            )
    if config.algorithm.period > total_steps and config.algorithm.sync not in ("gradients", "none"):
        raise ConfigError(
            f"algorithm.period={config.algorithm.period} is larger than the run's {total_steps} steps: "
            "no communication would ever happen; lower the period or train longer"
        )
    sampler = WorkerSampler(len(data.train), num_workers, t.batch_size, seed=t.seed, shards=shards)
    heterogeneity = label_distribution(data.train.targets, shards, num_workers, data.num_classes)

    torch.manual_seed(t.seed)
    model = build_model(config.model.model, data.input_shape, data.num_classes, hidden=config.model.hidden)
    if config.engine == "distributed":
        workers: SimulatedWorkers | DistributedWorker = DistributedWorker(model, config, data, device)
    else:
        workers = SimulatedWorkers(model, config, data, num_workers)

    eval_steps = sorted({round(k * total_steps / t.evals) for k in range(t.evals + 1)})
    g = torch.Generator().manual_seed(t.seed)
    train_eval = torch.randperm(len(data.train), generator=g)[: t.eval_train_examples].sort().values
    test_eval = torch.arange(len(data.test))

    out = Path(config.out) if config.out and is_main else None
    resolved = config.to_dict()
    resolved["training"]["workers"] = num_workers
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
        (out / "split.json").write_text(json.dumps({"split": config.data.split, **heterogeneity}) + "\n")
    if is_main and config.data.split != "identical":
        tqdm.write(
            f"split={config.data.split}: mean total-variation distance of worker label distributions "
            f"from the whole set = {heterogeneity['mean_total_variation']:.3f}"
        )

    saver = Checkpoints(config, resolved, workers, is_main) if config.out else None
    start, wall, records = 0, 0.0, []
    if saver is not None and (config.resume or distributed.restarted_by_torchrun()):
        start, wall, records = saver.resume(examples_per_step, len(data.train))
    if out is not None:
        checkpoint.atomic_write(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())

    lr = None
    desc = f"{config.algorithm.sync} I={config.algorithm.period}"
    bar = tqdm(
        total=total_steps,
        initial=start,
        desc=desc,
        disable=not (config.progress and is_main),
        leave=False,
        dynamic_ncols=True,
    )
    step = start
    began, evaluating, checkpointing = time.perf_counter(), 0.0, 0.0
    try:
        for step in range(start, total_steps + 1):
            joint_epoch = step * examples_per_step / len(data.train)
            resumed_here = step == start and start > 0
            if step in eval_steps and not resumed_here:
                evaluation_started = time.perf_counter()
                avg = workers.averaged_model()
                train_loss, train_acc = evaluate(avg, data.train, train_eval, device)
                test_loss, test_acc = evaluate(avg, data.test, test_eval, device)
                record = {
                    "joint_epoch": joint_epoch,
                    "step": step,
                    "lr": t.lr_at(joint_epoch),
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
                evaluating += time.perf_counter() - evaluation_started
            if saver is not None and not resumed_here and saver.due(step, eval_steps, total_steps):
                checkpoint_started = time.perf_counter()
                saver.save(step, wall, records)
                checkpointing += time.perf_counter() - checkpoint_started
            if step == total_steps:
                break
            started = time.perf_counter()
            if t.lr_at(joint_epoch) != lr:
                lr = t.lr_at(joint_epoch)
                workers.set_lr(lr)
            workers.step(sampler, step)
            wall += time.perf_counter() - started
            bar.update(1)
    except (PrsgdError, RuntimeError) as error:
        failure: BaseException = error
        if isinstance(error, NonFiniteError):
            kept = saver.last if saver is not None and saver.last else "none was written"
            failure = NonFiniteError(f"{error}; training stopped, the last good checkpoint is kept: {kept}")
        if config.engine == "distributed":
            failure = distributed.explain_failure(failure, f"training step {step}")
        if failure is error:
            raise
        raise failure from error
    finally:
        bar.close()
    if out is not None and records:
        times = {
            "train": wall,
            "evaluation": evaluating,
            "checkpoints": checkpointing,
            "total_this_process": time.perf_counter() - began,
        }
        summary = {"config": resolved, "final": records[-1], "time_s": times}
        checkpoint.atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return records


class Checkpoints:
    """The run's checkpoints in ``OUT/checkpoints`` (:mod:`prsgd.checkpoint`): every rank's full state (its
    workers' parameters, buffers, momentum, step counter, learning rate and communication counters; the torch RNG
    states; the wall clock and the records so far). The data order and augmentation are functions of (seed, step,
    worker), so the step is their position."""

    # keys that may change between the run that wrote a checkpoint and the one resuming it
    MAY_CHANGE = frozenset(
        {"out", "progress", "resume", "worker_timeout", "seeds", "sweep", "device"}
        | {f"training.{k}" for k in ("epochs", "evals", "checkpoint_every", "keep_checkpoints", "workers")}
    )

    def __init__(self, config: RunConfig, resolved: dict[str, Any], workers, is_main: bool) -> None:
        self.root = Path(config.out) / "checkpoints"
        self.config, self.resolved, self.workers, self.is_main = config, resolved, workers, is_main
        self.last: Path | None = None

    def due(self, step: int, eval_steps: list[int], total_steps: int) -> bool:
        every = self.config.training.checkpoint_every
        if step == 0:
            return False
        return step == total_steps or (step % every == 0 if every else step in eval_steps)

    def _rng(self) -> dict[str, Tensor]:
        rng = {"torch": torch.get_rng_state()}
        if torch.device(self.config.device).type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        return rng

    def save(self, step: int, wall: float, records: list[Record]) -> None:
        shard = {"engine": self.workers.state(), "rng": self._rng(), "step": step, "wall": wall, "records": records}
        entry = checkpoint.save_shard(self.root, step, self.workers.shard_rank, shard)
        entries = distributed.all_gather_objects(entry) if self.config.engine == "distributed" else [entry]
        meta = {
            "engine": self.config.engine,
            "workers": self.workers.num_workers,
            "consensus": self.workers.in_consensus,
            "config": self.resolved,
        }
        if self.is_main:
            self.last = checkpoint.write_manifest(self.root, step, entries, meta, self.config.training.keep_checkpoints)

    def _mismatch(self, saved: dict[str, Any]) -> list[str]:
        """``key: saved -> ours`` for every dotted config key that differs and may not change."""
        a, b = _dotted_items(saved), _dotted_items(self.resolved)
        keys = sorted((set(a) | set(b)) - self.MAY_CHANGE)
        return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]

    def resume(self, examples_per_step: int, train_size: int) -> tuple[int, float, list[Record]]:
        """Load the newest intact checkpoint; return (step to continue from, wall clock, records so far)."""
        found = distributed.broadcast_object(checkpoint.latest(self.root) if self.is_main else None)
        if found is None:
            if self.is_main:
                tqdm.write(f"resume: no complete checkpoint in {self.root}; starting from step 0")
            return 0, 0.0, []
        manifest = found.manifest
        if manifest["engine"] != self.config.engine:
            raise CheckpointError(
                f"{found.folder} was written by engine={manifest['engine']!r}; this run uses "
                f"engine={self.config.engine!r}: resume with the same engine"
            )
        diffs = self._mismatch(manifest["config"])
        if diffs:
            raise CheckpointError(
                f"{found.folder} belongs to a run with another config ({'; '.join(diffs)}); "
                "resume with the config it was written with, or use another out folder"
            )
        n, saved_n = self.workers.num_workers, manifest["workers"]
        steps_done = None
        if saved_n != n:
            if not manifest["consensus"]:
                raise CheckpointError(
                    f"{found.folder} was taken with {saved_n} workers in the middle of a period (the workers "
                    f"hold different states), so it can only be resumed with {saved_n} workers, not {n}; only a "
                    "checkpoint taken right after a full sync can change the number of workers"
                )
            steps_done = round(found.step * saved_n / n)
        state = found.load(self.workers.shard_rank if steps_done is None else 0)
        self.workers.load(state["engine"], steps_done)
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.device(self.config.device).type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        self.last = found.folder
        start = found.step if steps_done is None else steps_done
        if self.is_main:
            change = (
                ""
                if steps_done is None
                else f"; it was taken right after a sync with {saved_n} workers, so all {n} workers start from its "
                f"common state at joint epoch {start * examples_per_step / train_size:.3f} (step {start}); the "
                "data order differs from an uninterrupted run"
            )
            tqdm.write(f"resume: continuing from {found.folder} (step {found.step}){change}")
        return start, float(state["wall"]), list(state["records"])


def _dotted_items(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= _dotted_items(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prsgd.train", description=__doc__.split("\n")[0])
    add_flat_arguments(parser)
    args = parser.parse_args(argv)
    if args.engine == "distributed" and args.workers is None and "WORLD_SIZE" in os.environ:
        args.workers = os.environ["WORLD_SIZE"]
    try:
        config = from_flat_arguments(args)
        records = run(config)
        if distributed.group_rank() == 0:
            print(json.dumps(records[-1]))
    except PrsgdError as error:
        sys.exit(f"prsgd train: error: {error}")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
