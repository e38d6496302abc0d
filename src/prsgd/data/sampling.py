"""Which examples each worker reads at each step, as a pure function of (seed, step, worker).

Both engines call the same sampler, so a simulated run and a torchrun run see identical per-worker batches.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from prsgd.errors import InvalidArgument, check_int


class WorkerSampler:
    """Every worker reshuffles its pool of examples once per local epoch with its own seeded permutation and reads
    consecutive batches of ``batch_size`` (the last incomplete batch of a local epoch is dropped). The pools are
    ``shards[i]`` (see :func:`prsgd.data.splits.partition`), or the whole training set when ``shards`` is None
    (identical data, the paper's zeta = 0 case)."""

    def __init__(
        self, num_examples: int, num_workers: int, batch_size: int, seed: int = 0, shards: list[Tensor] | None = None
    ) -> None:
        check_int("num_examples", num_examples, 1)
        check_int("num_workers", num_workers, 1)
        check_int("seed", seed, 0)
        check_int("batch_size", batch_size, 1)
        if shards is not None and (not isinstance(shards, list | tuple) or len(shards) != num_workers):
            raise InvalidArgument(f"shards must be a list of num_workers={num_workers} index tensors")
        smallest = min(len(s) for s in shards) if shards is not None else num_examples
        if batch_size < 1 or batch_size > smallest:
            raise InvalidArgument(
                f"batch_size={batch_size!r} is not allowed; it must be between 1 and the {smallest} "
                "training examples of the smallest worker"
            )
        if shards is not None and len(shards) != num_workers:
            raise InvalidArgument(f"{len(shards)} shards for num_workers={num_workers}")
        self.num_examples = num_examples
        self.num_workers = num_workers
        self.batch_size = batch_size
        self.seed = seed
        self.shards = shards
        self._cache: dict[tuple[int, int], Tensor] = {}

    def _pool_size(self, worker: int) -> int:
        return self.num_examples if self.shards is None else len(self.shards[worker])

    def _permutation(self, worker: int, local_epoch: int) -> Tensor:
        key = (worker, local_epoch)
        if key not in self._cache:
            if len(self._cache) > 4 * self.num_workers:
                self._cache.clear()
            seed = int(np.random.SeedSequence([self.seed, worker, local_epoch]).generate_state(1)[0])
            g = torch.Generator().manual_seed(seed)
            order = torch.randperm(self._pool_size(worker), generator=g)
            self._cache[key] = order if self.shards is None else self.shards[worker][order]
        return self._cache[key]

    def worker_indices(self, step: int, worker: int) -> Tensor:
        """Indices of ``worker``'s batch at ``step`` (0-based), shape ``(batch_size,)``."""
        local_epoch, k = divmod(step, self._pool_size(worker) // self.batch_size)
        start = k * self.batch_size
        return self._permutation(worker, local_epoch)[start : start + self.batch_size]

    def indices(self, step: int) -> Tensor:
        """Every worker's batch indices at ``step``, shape ``(num_workers, batch_size)``."""
        return torch.stack([self.worker_indices(step, w) for w in range(self.num_workers)])
