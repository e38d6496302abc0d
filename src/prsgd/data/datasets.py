"""In-memory datasets as tensors: what the runner trains on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Dataset:
    """Train and test tensors of a classification task. Inputs are float32, targets int64 class indices."""

    name: str
    train_inputs: Tensor
    train_targets: Tensor
    test_inputs: Tensor
    test_targets: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_inputs.shape[1:])


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, offline), pixels scaled to [0, 1], a seeded split."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    inputs = torch.from_numpy(bunch.data.astype(np.float32) / 16.0)
    targets = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(targets))
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", inputs[train], targets[train], inputs[test], targets[test], num_classes=10)


DATASETS = {"digits": load_digits}


def load_dataset(name: str, seed: int = 0) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not known; allowed: {', '.join(DATASETS)}")
    return DATASETS[name](seed=seed)
