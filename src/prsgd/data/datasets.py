"""Loading a dataset by name. Nothing is downloaded: file-based datasets are read from a path the user gives
(:mod:`prsgd.data.idx`, :mod:`prsgd.data.cifar`, :mod:`prsgd.data.imagefolder`), and a missing or corrupt file is
reported with the path and what was expected; digits and synthetic clusters need no file.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from prsgd.data.cifar import load_cifar10
from prsgd.data.idx import load_fashion_mnist, load_mnist
from prsgd.data.imagefolder import load_imagefolder
from prsgd.data.text import load_stdlib_text
from prsgd.data.types import ArraySplit, DataError, Dataset


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


LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "synthetic": load_synthetic,
    "fashion_mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "imagefolder": load_imagefolder,
    "stdlib_text": load_stdlib_text,
}
DATASET_NAMES = tuple(LOADERS)


@functools.lru_cache(maxsize=2)
def load_dataset(name: str, path: str = "", seed: int = 0, train_subset: int = 0, image_size: int = 224) -> Dataset:
    """Load dataset ``name`` (from ``path`` for file-based ones); optionally keep a seeded subset of training.

    The last two datasets loaded are cached (runs of a sweep share them); do not modify their tensors."""
    if name not in LOADERS:
        raise DataError(f"dataset={name!r} is not known; allowed: {', '.join(DATASET_NAMES)}")
    kwargs = {"image_size": image_size} if name == "imagefolder" else {}
    data = LOADERS[name](path=path, seed=seed, **kwargs)
    if train_subset > len(data.train):
        raise DataError(
            f"data.train_subset={train_subset} is more than the {len(data.train)} training examples of {name}; "
            "set it to at most that, or 0 for all"
        )
    if train_subset and train_subset < len(data.train):
        keep = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:train_subset]
        data = Dataset(data.name, data.train.subset(keep.sort().values), data.test, data.num_classes, data.input_shape)
    return data
