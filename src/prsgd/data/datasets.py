"""Datasets as train/test splits that hand out batches by index. Nothing is downloaded: file-based datasets are
read from a path the user gives, and a missing or corrupt file is reported with the path and what was expected.

Images are kept as uint8 and normalised per batch (``(x / 255 - mean) / std`` per channel), so a dataset costs
its raw size in memory; ImageFolder trees are decoded lazily, batch by batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from prsgd.errors import InvalidArgument


class DataError(InvalidArgument):
    """A dataset that cannot be read; the message names the path and what was expected there."""


class ArraySplit:
    """Examples held in memory: ``inputs`` (uint8 images or float features) and int64 ``targets``."""

    def __init__(self, inputs: Tensor, targets: Tensor, mean: Tensor | None = None, std: Tensor | None = None):
        if len(inputs) != len(targets):
            raise DataError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs = inputs
        self.targets = targets
        self.mean = mean
        self.std = std

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Float inputs (normalised if images) and targets of ``indices`` (any shape; the batch keeps it)."""
        flat = indices.reshape(-1)
        x = self.inputs[flat]
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
            if self.mean is not None:
                shape = (1, -1) + (1,) * (x.dim() - 2)
                x = (x - self.mean.view(shape)) / self.std.view(shape)
        return x.view(*indices.shape, *x.shape[1:]), self.targets[flat].view(indices.shape)

    def subset(self, indices: Tensor) -> ArraySplit:
        return ArraySplit(self.inputs[indices], self.targets[indices], self.mean, self.std)


@dataclass(frozen=True)
class Dataset:
    """A classification task: ``train`` and ``test`` splits, ``num_classes``, one example's ``input_shape``."""

    name: str
    train: ArraySplit
    test: ArraySplit
    num_classes: int
    input_shape: tuple[int, ...]

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3


def load_digits(path: str = "", seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, offline), pixels scaled to [0, 1], a seeded split."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    inputs = torch.from_numpy(bunch.data.astype(np.float32) / 16.0)
    targets = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(targets))
    test, train = order[:n_test], order[n_test:]
    return Dataset(
        "digits", ArraySplit(inputs[train], targets[train]), ArraySplit(inputs[test], targets[test]), 10, (64,)
    )


def load_synthetic(
    path: str = "", seed: int = 0, num_examples: int = 4000, num_features: int = 32, num_classes: int = 4
) -> Dataset:
    """Gaussian clusters: class c's inputs are N(mu_c, I) with seeded random centres (a quick, offline task)."""
    g = torch.Generator().manual_seed(seed)
    centres = 1.5 * torch.randn(num_classes, num_features, generator=g)
    targets = torch.randint(0, num_classes, (num_examples,), generator=g)
    inputs = centres[targets] + torch.randn(num_examples, num_features, generator=g)
    n_test = num_examples // 5
    return Dataset(
        "synthetic",
        ArraySplit(inputs[n_test:], targets[n_test:]),
        ArraySplit(inputs[:n_test], targets[:n_test]),
        num_classes,
        (num_features,),
    )


def _loaders() -> dict[str, Callable[..., Dataset]]:
    from prsgd.data.cifar import load_cifar10
    from prsgd.data.idx import load_fashion_mnist, load_mnist
    from prsgd.data.imagefolder import load_imagefolder

    return {
        "digits": load_digits,
        "synthetic": load_synthetic,
        "fashion_mnist": load_fashion_mnist,
        "mnist": load_mnist,
        "cifar10": load_cifar10,
        "imagefolder": load_imagefolder,
    }


DATASET_NAMES = ("digits", "synthetic", "fashion_mnist", "mnist", "cifar10", "imagefolder")


@functools.lru_cache(maxsize=2)
def load_dataset(name: str, path: str = "", seed: int = 0, train_subset: int = 0, image_size: int = 224) -> Dataset:
    """Load dataset ``name`` (from ``path`` for file-based ones); optionally keep a seeded subset of training.

    The last two datasets loaded are cached (runs of a sweep share them); do not modify their tensors."""
    loaders = _loaders()
    if name not in loaders:
        raise DataError(f"dataset={name!r} is not known; allowed: {', '.join(DATASET_NAMES)}")
    kwargs = {"image_size": image_size} if name == "imagefolder" else {}
    data = loaders[name](path=path, seed=seed, **kwargs)
    if train_subset and train_subset < len(data.train):
        keep = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:train_subset]
        data = Dataset(data.name, data.train.subset(keep.sort().values), data.test, data.num_classes, data.input_shape)
    return data


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what}: expected the file {str(path)!r}, which does not exist")
    return path
