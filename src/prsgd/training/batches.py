"""The batches a run's workers read: the same inputs on every engine, as functions of (seed, step, worker)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from prsgd.data import Dataset
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
