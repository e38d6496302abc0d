"""Which examples each worker reads at each step, as a pure function of (seed, step, worker).

Both engines call the same sampler, so a simulated run and a torchrun run see identical per-worker batches.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class WorkerSampler:
    """Identical data across workers (the paper's zeta = 0 case): every worker reshuffles the whole training set
    once per local epoch with its own seeded permutation and reads consecutive batches of ``batch_size``
    (the last incomplete batch of a local epoch is dropped)."""

    def __init__(self, num_examples: int, num_workers: int, batch_size: int, seed: int = 0) -> None:
        if batch_size < 1 or batch_size > num_examples:
            raise ValueError(
                f"batch_size={batch_size!r} is not allowed; it must be between 1 and the {num_examples} "
                "training examples"
            )
        self.num_examples = num_examples
        self.num_workers = num_workers
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_local_epoch = num_examples // batch_size
        self._cache: dict[tuple[int, int], Tensor] = {}

    def _permutation(self, worker: int, local_epoch: int) -> Tensor:
        key = (worker, local_epoch)
        if key not in self._cache:
            if len(self._cache) > 4 * self.num_workers:
                self._cache.clear()
            seed = int(np.random.SeedSequence([self.seed, worker, local_epoch]).generate_state(1)[0])
            g = torch.Generator().manual_seed(seed)
            self._cache[key] = torch.randperm(self.num_examples, generator=g)
        return self._cache[key]

    def worker_indices(self, step: int, worker: int) -> Tensor:
        """Indices of ``worker``'s batch at ``step`` (0-based), shape ``(batch_size,)``."""
        local_epoch, k = divmod(step, self.steps_per_local_epoch)
        start = k * self.batch_size
        return self._permutation(worker, local_epoch)[start : start + self.batch_size]

    def indices(self, step: int) -> Tensor:
        """Every worker's batch indices at ``step``, shape ``(num_workers, batch_size)``."""
        return torch.stack([self.worker_indices(step, w) for w in range(self.num_workers)])
