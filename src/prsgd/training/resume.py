"""A training run's checkpoint policy: when to save, what a run's checkpoint holds, and resuming from it.

The files themselves (atomic, checksummed, one shard per process, a manifest per step) are
:mod:`prsgd.training.checkpoint`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from prsgd.algorithm import rescaled_steps
from prsgd.errors import CheckpointError
from prsgd.training import checkpoint
from prsgd.training.config import RunConfig
from prsgd.training.workers import Placement, Workers

Record = dict[str, Any]


class Checkpoints:
    """The run's checkpoints in ``OUT/checkpoints`` (:mod:`prsgd.training.checkpoint`): every rank's full state (its
    workers' parameters, buffers, momentum, step counter, learning rate and communication counters; the torch RNG
    states; the wall clock and the records so far). The data order and augmentation are functions of (seed, step,
    worker), so the step is their position."""

    # keys that may change between the run that wrote a checkpoint and the one resuming it
    MAY_CHANGE = frozenset(
        {"out", "progress", "resume", "overwrite", "worker_timeout", "seeds", "sweep", "device", "logger"}
        | {f"training.{k}" for k in ("epochs", "evals", "checkpoint_every", "keep_checkpoints", "workers")}
    )

    def __init__(self, config: RunConfig, resolved: dict[str, Any], workers: Workers, placement: Placement) -> None:
        self.root = Path(config.out) / "checkpoints"
        self.config, self.resolved, self.workers, self.placement = config, resolved, workers, placement
        self.is_main = placement.is_main
        self.last: Path | None = None

    def due(self, step: int, eval_steps: set[int], total_steps: int) -> bool:
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
        entries = self.placement.gather(entry)
        folder = checkpoint.step_dir(self.root, step)
        unseen = self.placement.broadcast(checkpoint.missing_shards(folder, entries) if self.is_main else None)
        if unseen:
            raise CheckpointError(
                f"{folder}: rank 0 cannot see the checkpoint shards of rank {', '.join(map(str, unseen))}, which "
                "wrote them to a folder of the same name on another host: every rank must write to one folder on a "
                "shared filesystem; put --out on one (NFS or a cluster filesystem) mounted at the same path on every "
                "host"
            )
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
        """Load the newest checkpoint that can be restored (a damaged or unloadable one is reported and the one
        before it tried); return (step to continue from, wall clock, records so far)."""
        candidates, damaged = self.placement.broadcast(
            checkpoint.scan(self.root, first_only=False) if self.is_main else None
        )
        if not candidates and damaged:
            raise CheckpointError(
                f"resume: {len(damaged)} completed checkpoint(s) in {self.root} but none can be restored (newest: "
                f"{damaged[0]}); not starting from step 0 over them: if the ranks write to different hosts' disks, "
                "put --out on a shared filesystem; to start afresh, use another --out"
            )
        if not candidates:
            if self.is_main:
                tqdm.write(f"resume: no complete checkpoint in {self.root}; starting from step 0")
            return 0, 0.0, []
        for found in candidates:
            self._check_compatible(found)
            problem, state = self._load(found)
            if problem is None:
                break
            if self.is_main:
                warnings.warn(
                    f"skipping a checkpoint that cannot be loaded: {problem}; trying the previous one", stacklevel=2
                )
        else:
            raise CheckpointError(
                f"resume: none of the {len(candidates)} intact checkpoint(s) in {self.root} can be loaded ({problem}); "
                "not starting from step 0 over them; to start afresh, use another --out"
            )
        n, saved_n = self.workers.num_workers, found.manifest["workers"]
        self.last = found.folder
        start = rescaled_steps(found.step, saved_n, n)
        if self.is_main:
            change = (
                ""
                if saved_n == n
                else f"; it was taken right after a sync with {saved_n} workers, so all {n} workers start from its "
                f"common state at joint epoch {start * examples_per_step / train_size:.3f} (step {start}); the "
                "data order differs from an uninterrupted run"
            )
            tqdm.write(f"resume: continuing from {found.folder} (step {found.step}){change}")
        return start, float(state["wall"]), list(state["records"])

    def _check_compatible(self, found: checkpoint.Checkpoint) -> None:
        """Refuse a checkpoint of another engine, config or (mid-period) number of workers: a user error, not a
        damaged file, so no older checkpoint is tried."""
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
        if saved_n != n and not manifest["consensus"]:
            raise CheckpointError(
                f"{found.folder} was taken with {saved_n} workers in the middle of a period (the workers "
                f"hold different states), so it can only be resumed with {saved_n} workers, not {n}; only a "
                "checkpoint taken right after a full sync can change the number of workers"
            )

    def _load(self, found: checkpoint.Checkpoint) -> tuple[str | None, dict[str, Any] | None]:
        """Load ``found`` into the workers and the RNG; (None, state) or (why it failed on some rank, None), agreed
        by every rank (or the others would wait in the next collective)."""
        other_workers = found.manifest["workers"] != self.workers.num_workers  # all start from rank 0's shard
        try:
            state = found.load(0 if other_workers else self.workers.shard_rank)
            self.workers.load(state["engine"], from_consensus=other_workers)
            torch.set_rng_state(state["rng"]["torch"])
            if "cuda" in state["rng"] and torch.device(self.config.device).type == "cuda":
                torch.cuda.set_rng_state(state["rng"]["cuda"])
            if not isinstance(state["wall"], float) or not isinstance(state["records"], list):
                raise TypeError("the shard's wall clock or records are of the wrong type")
            problem = None
        except Exception as error:  # a shard of the wrong shapes, keys or types: try the previous checkpoint
            state, problem = None, f"{found.folder}: {type(error).__name__}: {str(error)[:300]}"
        problems = [p for p in self.placement.gather(problem) if p is not None]
        return (problems[0], None) if problems else (None, state)


def _dotted_items(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= _dotted_items(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out
