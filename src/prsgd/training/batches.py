"""The batches a run's workers read: the same inputs on every engine, as functions of (seed, step, worker), and
the sampler that chooses them from each worker's shard."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from prsgd.data import Dataset, WorkerSampler, partition
from prsgd.data.augment import random_crop_flip
from prsgd.training.config import RunConfig


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


def worker_sampler(config: RunConfig, data, num_workers: int) -> tuple[list[Tensor] | None, WorkerSampler]:
    """The workers' shards of the training set (the config's split) and the sampler that reads their batches."""
    t = config.training
    shards = partition(
        data.train.labels,
        num_workers,
        config.data.split,
        seed=t.seed,
        alpha=config.data.alpha,
        classes_per_worker=config.data.classes_per_worker,
        min_size=t.batch_size,
    )
    return shards, WorkerSampler(len(data.train), num_workers, t.batch_size, seed=t.seed, shards=shards)
