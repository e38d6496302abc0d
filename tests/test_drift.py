"""The workers' drift before each round (prsgd.algorithm.drift): the simulator's value against a plain per-worker
loop, the value the paper's analysis predicts on a problem with known constants, and that measuring changes
nothing. LocalSGD's value against the simulator's is in tests/test_distributed.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import batches, mlp
from reference import ReferenceWorkers

import prsgd
from prsgd.experiments.problems import NonConvexRegression, drift_without_curvature, run


def spread(stacked: dict[str, torch.Tensor]) -> float:
    """(1/N) sum_i ||x_i - x_bar||^2 over every tensor, in float64 NumPy."""
    total = 0.0
    for t in stacked.values():
        x = t.detach().double().numpy().reshape(t.shape[0], -1)
        total += float(((x - x.mean(0)) ** 2).sum(1).mean())
    return total


@pytest.mark.parametrize(
    ("sync", "optimizer"),
    [("params_and_momentum", "sgd"), ("params_only", "sgd"), ("gossip", "sgd"), ("params_and_momentum", "adamw")],
)
def test_the_simulator_measures_its_workers_just_before_each_round(sync, optimizer):
    workers, period = 4, 3
    hyper = dict(lr=0.05, momentum=0.9) if optimizer == "sgd" else dict(lr=0.01, optimizer="adamw")
    topology = {"topology": "ring"} if sync == "gossip" else {}
    sim = prsgd.Simulator(mlp(), num_workers=workers, period=period, sync=sync, **hyper, **topology)
    # the reference never averages: its workers after `period` steps are the simulator's just before its round
    ref = ReferenceWorkers(mlp(), workers, period=10**6, sync="params_and_momentum", **hyper)
    for t, (x, y) in enumerate(batches(workers, period)):
        sim.step(x, y, F.cross_entropy)
        ref.step(x, y, F.cross_entropy)
        assert (sim.drift.latest is None) == (t < period - 1)
    measured = sim.drift.latest
    assert measured.step == period
    # AdamW's first steps move each coordinate by about lr * sign(g): the float noise between vmap's gradients and
    # autograd's, where a gradient is near zero, moves the distance by ~1e-4 of itself
    rel = 1e-5 if optimizer == "sgd" else 1e-3
    assert measured.consensus_distance == pytest.approx(spread(ref.params()), rel=rel)
    state = {f"{name}.{p}": t for name, by_param in ref.state().items() if name != "step" for p, t in by_param.items()}
    assert measured.state_spread == pytest.approx(spread(state), rel=rel)
    assert sim.drift.take() == {
        "consensus_distance": measured.consensus_distance,
        "state_spread": measured.state_spread,
    }
    assert sim.drift.take() == {"consensus_distance": None, "state_spread": None}  # nothing since


def test_measuring_drift_changes_no_training_and_can_be_turned_off():
    runs = []
    for on in (True, False):
        sim = prsgd.Simulator(mlp(), num_workers=3, lr=0.1, momentum=0.9, period=2)
        sim.drift.on = on
        for x, y in batches(3, 6):
            sim.step(x, y, F.cross_entropy)
        runs.append(sim)
    assert runs[0].drift.latest.step == 6 and runs[1].drift.latest is None
    for name, p in runs[0].params().items():
        assert torch.equal(p, runs[1].params()[name])


def test_gradient_averaging_has_no_rounds_to_measure():
    sim = prsgd.Simulator(mlp(), num_workers=3, lr=0.1, momentum=0.9, sync="gradients")
    for x, y in batches(3, 4):
        sim.step(x, y, F.cross_entropy)
    assert sim.drift.latest is None


@pytest.mark.parametrize("zeta", [0.0, 3.0])
def test_the_consensus_distance_is_the_analysis_prediction_where_curvature_is_negligible(zeta):
    """E D = gamma^2 [zeta^2 (sum_j c_j)^2 + (N-1)/N sigma^2 sum_j c_j^2] without curvature (derived in
    drift_without_curvature's docstring): measured over 1000 rounds at gamma L I / (1 - beta) = 0.18 it holds to
    noise; at 16x the period the shared curvature contracts the workers' deviations, so it lies well below."""
    problem = NonConvexRegression(8, zeta=zeta, sigma=1.0, seed=1)
    lr, beta = 0.002, 0.9
    short = run(problem, 2000, lr, momentum=beta, period=2)
    assert len(short.drift) == 1000
    assert float(short.drift.mean()) == pytest.approx(drift_without_curvature(problem, lr, beta, 2), rel=0.03)
    long = run(problem, 2048, lr, momentum=beta, period=32)
    assert float(long.drift.mean()) < 0.8 * drift_without_curvature(problem, lr, beta, 32)
    if zeta:  # heterogeneity dominates the noise term here: (sum c_j)^2 zeta^2 vs sum c_j^2 sigma^2
        assert drift_without_curvature(problem, lr, beta, 2) > 5 * drift_without_curvature(
            NonConvexRegression(8, zeta=0.0, sigma=1.0, seed=1), lr, beta, 2
        )
    assert np.all(short.drift.numpy() >= 0)
