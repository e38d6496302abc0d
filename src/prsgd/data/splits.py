"""How training examples are divided among N workers: the paper's identical and non-identical cases.

- ``identical``: every worker samples from the whole training set (f_i = f, zeta = 0);
- ``disjoint``: a seeded random partition into N equal iid shards;
- ``dirichlet``: label-skewed shards, each class's examples divided among workers in proportions drawn from
  Dirichlet(alpha, ..., alpha) (Hsu et al. 2019); small alpha is strongly non-identical;
- ``classes``: each worker is dealt k classes (classes dealt round by round in random order, so every class goes
  to some worker when N k >= number of classes) and each class's examples are divided equally among the workers
  holding it: every worker sees at most k classes (the pathological non-iid split of McMahan et al. 2017).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from prsgd.data.types import DataError
from prsgd.errors import check_choice, check_int, check_number


def partition(
    targets: Tensor,
    num_workers: int,
    kind: str = "identical",
    *,
    seed: int = 0,
    alpha: float = 0.5,
    classes_per_worker: int = 2,
    min_size: int = 1,
) -> list[Tensor] | None:
    """Each worker's training-example indices (sorted), or None for ``identical`` (everyone uses everything).

    Every shard holds at least ``min_size`` examples (the per-worker batch size): a Dirichlet draw that leaves a
    worker with fewer is redrawn (up to 100 times) before giving up with an error."""
    check_int("num_workers", num_workers, 1)
    check_choice("split", kind, ("identical", "disjoint", "dirichlet", "classes"))
    check_int("seed", seed, 0)
    check_number("alpha", alpha, positive=True)
    check_int("classes_per_worker", classes_per_worker, 1)
    check_int("min_size", min_size, 1)
    rng = np.random.default_rng(seed)
    labels = targets.numpy()
    n = len(labels)
    if kind == "identical":
        return None
    if kind == "disjoint":
        shards = np.array_split(rng.permutation(n), num_workers)
    elif kind == "dirichlet":
        shards = _dirichlet(labels, num_workers, alpha, rng, min_size)
    elif kind == "classes":
        shards = _k_classes(labels, num_workers, classes_per_worker, rng)
    else:
        raise DataError(f"split={kind!r} is not known; allowed: identical, disjoint, dirichlet, classes")
    sizes = [len(s) for s in shards]
    if min(sizes) < min_size:
        raise DataError(
            f"split={kind!r} gives worker {int(np.argmin(sizes))} only {min(sizes)} training examples, fewer than the "
            f"per-worker batch size {min_size}: use fewer workers, a smaller batch or (dirichlet) a larger alpha"
        )
    return [torch.from_numpy(np.sort(s)).long() for s in shards]


def _k_classes(labels: np.ndarray, num_workers: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    slots = np.concatenate([rng.permutation(classes) for _ in range(-(-num_workers * k // len(classes)))])
    slots = slots[: num_workers * k].reshape(num_workers, k)
    shards: list[list[int]] = [[] for _ in range(num_workers)]
    for c in classes:
        holders = np.argwhere(slots == c)[:, 0]  # one entry per slot holding class c
        if len(holders) == 0:
            continue
        members = rng.permutation(np.flatnonzero(labels == c))
        for worker, part in zip(holders, np.array_split(members, len(holders)), strict=True):
            shards[worker].extend(part.tolist())
    return [np.asarray(s, dtype=np.int64) for s in shards]


def _dirichlet(labels: np.ndarray, num_workers: int, alpha: float, rng: np.random.Generator, min_size: int):
    classes = np.unique(labels)
    for _ in range(100):
        shards: list[list[int]] = [[] for _ in range(num_workers)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            proportions = rng.dirichlet(np.full(num_workers, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for worker, part in enumerate(np.split(members, cuts)):
                shards[worker].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            break
    return [np.asarray(s, dtype=np.int64) for s in shards]


def label_distribution(targets: Tensor, shards: list[Tensor] | None, num_workers: int, num_classes: int) -> dict:
    """Per-worker label counts and the heterogeneity they imply: each worker's total-variation distance between
    its label distribution and the whole set's (0: identical; 1: disjoint supports)."""
    overall = torch.bincount(targets, minlength=num_classes).double()
    overall /= overall.sum()
    pools = shards if shards is not None else [torch.arange(len(targets))] * num_workers
    counts = [torch.bincount(targets[p], minlength=num_classes) for p in pools]
    tv = [0.5 * (c.double() / max(1, int(c.sum())) - overall).abs().sum().item() for c in counts]
    return {
        "label_counts": [c.tolist() for c in counts],
        "examples": [len(p) for p in pools],
        "total_variation": tv,
        "mean_total_variation": float(np.mean(tv)),
    }
