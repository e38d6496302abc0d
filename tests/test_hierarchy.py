"""Hierarchical rounds (issue 18) against a per-worker reference written here: each node's workers average every
``inner_period`` steps, all workers every ``period`` steps; with inner_period = period it is flat Algorithm 1."""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from helpers import assert_bitwise_equal, assert_workers_close, batches, mlp
from reference import ReferenceWorkers

import prsgd

N, STEPS = 4, 13


class TwoLevelReference(ReferenceWorkers):
    """The plain per-worker loop of tests/reference.py, plus: after every ``inner_period``-th step that is not a
    global round, the workers of each node (``N / nodes`` consecutive ones) average their parameters, float buffers
    and momentum (cleared instead for params_clear_momentum, kept for params_only)."""

    def __init__(self, model, num_workers, *, nodes, inner_period, **kw):
        super().__init__(model, num_workers, **kw)
        self.nodes, self.inner_period = nodes, inner_period

    def step(self, inputs, targets, loss_fn):
        losses = super().step(inputs, targets, loss_fn)
        if self.t % self.period and self.t % self.inner_period == 0:
            size = len(self.models) // self.nodes
            for node in range(self.nodes):
                models = self.models[node * size : (node + 1) * size]
                opts = self.opts[node * size : (node + 1) * size]
                for params in zip(*(m.parameters() for m in models), strict=True):
                    self._mean_into(list(params))
                    buffers = [opt.state[p]["momentum_buffer"] for opt, p in zip(opts, params, strict=True)]
                    if self.sync == "params_and_momentum":
                        self._mean_into(buffers)
                    elif self.sync == "params_clear_momentum":
                        for b in buffers:
                            b.zero_()
                for bufs in zip(*(m.buffers() for m in models), strict=True):
                    if bufs[0].is_floating_point():
                        self._mean_into(list(bufs))
        return losses


@pytest.mark.parametrize(
    ("sync", "nodes", "inner_period", "period"),
    [
        ("params_and_momentum", 2, 1, 4),
        ("params_and_momentum", 2, 2, 6),
        ("params_clear_momentum", 2, 2, 4),
        ("params_only", 4, 1, 3),
        ("params_and_momentum", 1, 3, 6),
    ],
)
def test_two_level_rounds_match_the_per_worker_reference(sync, nodes, inner_period, period):
    kw = dict(lr=0.1, momentum=0.9, period=period, sync=sync)
    model = mlp(batchnorm=True)
    sim = prsgd.Simulator(model, num_workers=N, inner_period=inner_period, nodes=nodes, **kw)
    ref = TwoLevelReference(model, N, nodes=nodes, inner_period=inner_period, **kw)
    for t, (x, y) in enumerate(batches(N, STEPS)):
        sim.step(x, y, F.cross_entropy)
        ref.step(x, y, F.cross_entropy)
        assert_workers_close(sim, ref, t)
        assert sim.in_consensus == ((t + 1) % period == 0 and sync != "params_only")
    params = sum(p[0].numel() for p in sim.params().values())
    buffers = sum(b[0].numel() for b in sim.buffers().values() if b.is_floating_point())
    per_round = 4 * (params + buffers + (params if sync == "params_and_momentum" else 0))
    inner = 0 if nodes == N else STEPS // inner_period - STEPS // period
    assert (sim.comm.node_rounds, sim.comm.node_bytes) == (inner, inner * per_round)
    assert (sim.comm.rounds, sim.comm.bytes) == (STEPS // period + inner, (STEPS // period + inner) * per_round)


def test_inner_period_equal_to_period_is_flat_algorithm_1_bit_for_bit():
    kw = dict(num_workers=N, lr=0.1, momentum=0.9, period=3)
    flat = prsgd.Simulator(mlp(batchnorm=True), **kw)
    two_level = prsgd.Simulator(mlp(batchnorm=True), inner_period=3, nodes=2, **kw)
    for x, y in batches(N, 10):
        flat.step(x, y, F.cross_entropy)
        two_level.step(x, y, F.cross_entropy)
        assert_bitwise_equal(flat, two_level)
    assert (two_level.comm.rounds, two_level.comm.bytes) == (flat.comm.rounds, flat.comm.bytes)
    assert two_level.comm.node_rounds == 0


def test_counters_survive_a_checkpoint():
    kw = dict(num_workers=N, lr=0.1, momentum=0.9, period=4, inner_period=2, nodes=2)
    sim = prsgd.Simulator(mlp(), **kw)
    for x, y in batches(N, 6):
        sim.step(x, y, F.cross_entropy)
    again = prsgd.Simulator(mlp(), **kw)
    again.load_state_dict(sim.state_dict())
    assert again.comm == sim.comm and sim.comm.node_rounds == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(period=4, inner_period=3, nodes=2), r"inner_period=3 is not allowed with period=4; .* must divide"),
        (dict(period=4, inner_period=8, nodes=2), r"inner_period=8 is not allowed with period=4"),
        (dict(period=4, inner_period=0, nodes=2), r"inner_period=0"),
        (dict(period=4, inner_period=2), r"inner_period= needs nodes="),
        (dict(period=4, inner_period=2, nodes=3), r"nodes=3 does not divide the 4 workers"),
        (dict(period=4, nodes=2), r"nodes=2 groups workers for inner rounds; it needs inner_period="),
        (dict(sync="gossip", topology="ring", inner_period=1, nodes=2), r"inner_period=1 changes averaging rounds"),
    ],
)
def test_bad_hierarchy_is_refused(kwargs, message):
    with pytest.raises(prsgd.InvalidArgument, match=message):
        prsgd.Simulator(mlp(), num_workers=N, lr=0.1, momentum=0.9, **kwargs)


def test_local_sgd_takes_its_nodes_from_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    opt = prsgd.LocalSGD(mlp(), lr=0.1, momentum=0.9, period=4, inner_period=2)
    assert opt.nodes == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with pytest.raises(prsgd.InvalidArgument, match="pass nodes="):
        prsgd.LocalSGD(mlp(), lr=0.1, momentum=0.9, period=4, inner_period=2)
