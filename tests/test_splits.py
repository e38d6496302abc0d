"""Splitting data across workers: identical, disjoint iid, Dirichlet label skew, k classes per worker."""

from __future__ import annotations

import pytest
import torch

from prsgd.data import WorkerSampler, label_distribution, partition

TARGETS = torch.arange(10).repeat_interleave(200)  # 10 balanced classes, 2000 examples


def test_identical_data_means_everyone_samples_everything():
    assert partition(TARGETS, 4, "identical") is None
    sampler = WorkerSampler(len(TARGETS), 4, 50, seed=0)
    seen = torch.cat([sampler.indices(s) for s in range(40)], dim=1)  # one local epoch per worker
    for w in range(4):
        assert sorted(seen[w].tolist()) == list(range(2000))
    assert not torch.equal(seen[0], seen[1])  # each worker has its own order


def test_disjoint_shards_partition_the_set_and_are_iid():
    shards = partition(TARGETS, 8, "disjoint", seed=3)
    assert sorted(torch.cat(shards).tolist()) == list(range(2000))
    assert {len(s) for s in shards} == {250}
    assert label_distribution(TARGETS, shards, 8, 10)["mean_total_variation"] < 0.12


@pytest.mark.parametrize(("alpha", "low", "high"), [(0.05, 0.6, 1.0), (1.0, 0.2, 0.6), (1000.0, 0.0, 0.08)])
def test_dirichlet_skew_grows_as_alpha_shrinks(alpha, low, high):
    shards = partition(TARGETS, 10, "dirichlet", seed=1, alpha=alpha)
    assert sorted(torch.cat(shards).tolist()) == list(range(2000))  # every example to exactly one worker
    tv = label_distribution(TARGETS, shards, 10, 10)["mean_total_variation"]
    assert low <= tv <= high
    again = partition(TARGETS, 10, "dirichlet", seed=1, alpha=alpha)
    assert all(torch.equal(a, b) for a, b in zip(shards, again, strict=True))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_k_classes_per_worker(k):
    shards = partition(TARGETS, 10, "classes", seed=0, classes_per_worker=k)
    assert sorted(torch.cat(shards).tolist()) == list(range(2000))
    for s in shards:
        assert len(TARGETS[s].unique()) <= k


def test_sampler_draws_each_worker_from_its_own_shard():
    shards = partition(TARGETS, 4, "classes", seed=0, classes_per_worker=2)
    sampler = WorkerSampler(len(TARGETS), 4, 32, seed=0, shards=shards)
    for step in range(30):
        for w, row in enumerate(sampler.indices(step)):
            assert set(row.tolist()) <= set(shards[w].tolist())


def test_a_shard_smaller_than_the_batch_is_refused():
    with pytest.raises(
        ValueError, match=r"worker \d+ only \d+ training examples, fewer than the per-worker batch size 300"
    ):
        partition(TARGETS, 8, "disjoint", min_size=300)
