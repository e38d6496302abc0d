"""Decentralized momentum SGD (Algorithm 2) on the simulator: reference loop, Fact 1, W = ones/N, comm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import batches, mlp, step_and_check_equation_10
from reference import ReferenceWorkers

import prsgd
from prsgd.algorithm import topology as T

N = 8


def topologies():
    return {
        "ring": T.ring(N),
        "torus": T.torus(N),
        "exponential": T.exponential(N),
        "erdos_renyi": T.erdos_renyi(N, 0.4, seed=2),
        "one_peer_exponential": T.one_peer_exponential(N),
        "user_matrix": T.from_matrix(
            T.weights_for(T._adjacency_from([[1, 2], [0, 3], [0, 3], [1, 2], [5], [4, 6], [5, 7], [6, 0]]))
        ),
    }


@pytest.mark.parametrize("sync", ["gossip", "gossip_params_only"])
@pytest.mark.parametrize("name", ["ring", "erdos_renyi", "one_peer_exponential"])
@pytest.mark.parametrize("nesterov", [False, True], ids=["polyak", "nesterov"])
def test_gossip_matches_a_per_worker_loop_with_dense_mixing(sync, name, nesterov):
    topo = topologies()[name]
    kw = dict(lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=1e-3, sync=sync)
    model = mlp(batchnorm=True)
    sim = prsgd.Simulator(model, num_workers=N, topology=topo, **kw)
    ref = ReferenceWorkers(model, N, mixing_matrix=topo.mixing_matrix, **kw)
    for x, y in batches(N, 9):
        torch.testing.assert_close(
            sim.step(x, y, F.cross_entropy), ref.step(x, y, F.cross_entropy), rtol=1e-5, atol=1e-6
        )
        for n, p in ref.params().items():
            torch.testing.assert_close(sim.params()[n], p, rtol=1e-5, atol=1e-6)
    for n, b in ref.buffers().items():
        torch.testing.assert_close(sim.buffers()[n], b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(topologies()))
@pytest.mark.parametrize("nesterov", [False, True], ids=["polyak", "nesterov"])
def test_fact_1_node_averages_follow_equation_10(name, nesterov):
    lr, beta = 0.1, 0.9
    sim = prsgd.Simulator(
        mlp(), num_workers=N, lr=lr, momentum=beta, nesterov=nesterov, sync="gossip", topology=topologies()[name]
    )
    for x, y in batches(N, 8):
        step_and_check_equation_10(sim, x, y, lr, beta, nesterov)
    spread = max((p - p.mean(0)).abs().max().item() for p in sim.params().values())
    assert spread > 0 or name == "one_peer_exponential"  # workers do differ: this is not exact averaging


def test_complete_graph_equals_params_and_momentum_with_period_1():
    model = mlp()
    gossip = prsgd.Simulator(model, num_workers=N, lr=0.1, momentum=0.9, sync="gossip", topology=np.full((N, N), 1 / N))
    alg1 = prsgd.Simulator(model, num_workers=N, lr=0.1, momentum=0.9, period=1, sync="params_and_momentum")
    for x, y in batches(N, 10):
        gossip.step(x, y, F.cross_entropy)
        alg1.step(x, y, F.cross_entropy)
    for n, p in alg1.params().items():
        torch.testing.assert_close(gossip.params()[n], p, rtol=1e-5, atol=1e-6)
    for n, m in alg1.momentum().items():
        torch.testing.assert_close(gossip.momentum()[n], m, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "degree"), [("ring", 2), ("torus", 3), ("exponential", 5), ("one_peer_exponential", 1)]
)
@pytest.mark.parametrize("sync", ["gossip", "gossip_params_only"])
def test_gossip_bytes_are_degree_times_payload_per_step(name, degree, sync):
    model = mlp()
    n_params = sum(p.numel() for p in model.parameters())
    sim = prsgd.Simulator(model, num_workers=N, lr=0.1, momentum=0.9, sync=sync, topology=name)
    assert sim.topology.max_degree == degree  # torus(2x4): 3 distinct neighbours; exponential(8): 1, 2, 4 both ways
    for x, y in batches(N, 5):
        sim.step(x, y, F.cross_entropy)
    payload = (2 if sync == "gossip" else 1) * n_params * 4
    assert sim.comm.rounds == 5
    assert sim.comm.bytes == 5 * degree * payload


def test_gossip_with_a_period_mixes_every_period_steps():
    sim = prsgd.Simulator(mlp(), num_workers=N, lr=0.1, momentum=0.9, period=3, sync="gossip", topology="ring")
    for x, y in batches(N, 7):
        sim.step(x, y, F.cross_entropy)
    assert sim.comm.rounds == 2


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(sync="gossip"), r"sync='gossip' needs topology="),
        (dict(sync="params_and_momentum", topology="ring"), r"topology='ring' is only used by sync='gossip'"),
        (dict(sync="gossip", topology="ring4"), r"topology='ring4' is not known"),
        (dict(sync="gossip", topology=T.ring(4)), r"topology ring has 4 workers but num_workers=8"),
        (dict(sync="gossip", topology=[[0.5, 0.5], [0.5, 0.5]]), r"has 2 workers but num_workers=8"),
    ],
)
@pytest.mark.parametrize("engine", ["simulator", "local_sgd"])
def test_gossip_configuration_errors(engine, kw, message):
    if engine == "local_sgd":  # one process: a single worker
        message = message.replace("num_workers=8", "num_workers=1")
        with pytest.raises(ValueError, match=message):
            prsgd.LocalSGD(mlp(), lr=0.1, **kw)
    else:
        with pytest.raises(ValueError, match=message):
            prsgd.Simulator(mlp(), num_workers=N, lr=0.1, **kw)
