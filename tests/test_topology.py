"""Mixing matrices: the built-in graphs, rho against numpy, Metropolis-Hastings weights, validation errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prsgd.algorithm import topology as T
from prsgd.engines.stacked import StackedMixer

STATIC = ["ring", "torus", "complete", "hypercube", "exponential"]


def numpy_rho(w):
    """Second-largest eigenvalue modulus, from numpy's general eigenvalue routine (not eigvalsh)."""
    moduli = np.sort(np.abs(np.linalg.eigvals(w)))
    return moduli[-2]


@pytest.mark.parametrize("name", STATIC)
@pytest.mark.parametrize("n", [4, 16, 64])
def test_built_in_graphs_are_valid_and_rho_matches_numpy(name, n):
    topo = T.make_topology(name, n)
    w = topo.mixing_matrix()
    assert w.shape == (n, n)
    np.testing.assert_allclose(w, w.T, atol=1e-12)
    np.testing.assert_allclose(w.sum(0), 1, atol=1e-12)
    np.testing.assert_allclose(w.sum(1), 1, atol=1e-12)
    assert (w >= 0).all()
    assert topo.rho == pytest.approx(numpy_rho(w), abs=1e-9)
    assert topo.spectral_gap == pytest.approx(1 - topo.rho)
    assert topo.rho < 1


def test_known_spectra():
    assert T.ring(16).rho == pytest.approx((1 + 2 * np.cos(2 * np.pi / 16)) / 3)
    assert T.complete(8).rho == pytest.approx(0, abs=1e-12)
    assert T.hypercube(16).max_degree == 4 and T.exponential(16).max_degree == 7
    assert T.torus(16).name == "torus(4x4)" and T.torus(16).max_degree == 4


def test_one_peer_exponential_is_doubly_stochastic_each_step_and_averages_exactly_over_a_cycle():
    topo = T.one_peer_exponential(16)
    assert topo.cycle_length == 4 and topo.max_degree == 1
    for step in range(8):
        w = topo.mixing_matrix(step)
        np.testing.assert_allclose(w.sum(0), 1)
        np.testing.assert_allclose(w.sum(1), 1)
        assert ((w > 0).sum(1) == 2).all()
    assert topo.rho == pytest.approx(0, abs=1e-12)
    assert T.one_peer_exponential(12).rho < 1


@pytest.mark.parametrize("name", [*STATIC, "one_peer_exponential"])
def test_consensus_distance_shrinks_by_at_most_rho_per_step(name):
    """Pure mixing (no gradient): ||X_{t+1} - X_bar|| <= rho ||X_t - X_bar||, and the ratio tends to rho."""
    n = 16
    topo = T.make_topology(name, n)
    x = torch.randn(n, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mean = x.mean(0)
    mix = StackedMixer(topo, torch.device("cpu"))
    ratios = []
    steps = topo.cycle_length if topo.time_varying else 25
    for step in range(steps):
        before = (x - mean).norm().item()
        mix([x], step)
        torch.testing.assert_close(x.mean(0), mean)  # doubly stochastic: the node average is kept
        ratios.append((x - mean).norm().item() / before)
    if topo.time_varying:  # one cycle of the one-peer exponential graph averages exactly when N = 16
        assert (x - mean).norm().item() < 1e-12
    elif topo.rho < 1e-12:
        assert ratios[0] < 1e-12
    else:
        assert max(ratios) <= topo.rho + 1e-9
        assert ratios[-1] == pytest.approx(topo.rho, abs=1e-2)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_sparse_and_dense_mixing_agree_with_the_matrix_product(mode):
    topo = T.erdos_renyi(12, 0.3, seed=3)
    x = torch.randn(12, 7, dtype=torch.float64)
    expected = torch.as_tensor(topo.mixing_matrix()) @ x
    StackedMixer(topo, torch.device("cpu"), mode=mode)([x], 0)
    torch.testing.assert_close(x, expected)


@st.composite
def connected_graphs(draw):
    """A random spanning tree plus random extra edges: connected by construction."""
    n = draw(st.integers(2, 24))
    adjacency = np.zeros((n, n), dtype=bool)
    for i in range(1, n):
        j = draw(st.integers(0, i - 1))
        adjacency[i, j] = adjacency[j, i] = True
    for i, j in draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=3 * n)):
        if i != j:
            adjacency[i, j] = adjacency[j, i] = True
    return adjacency


@settings(max_examples=50, deadline=None)
@given(adjacency=connected_graphs())
def test_metropolis_weights_of_a_random_connected_graph(adjacency):
    topo = T.from_graph(adjacency, weights="metropolis")
    w = topo.mixing_matrix()
    assert ((w > 0) == (adjacency | np.eye(len(w), dtype=bool))).all()
    np.testing.assert_allclose(w, w.T, atol=1e-12)
    np.testing.assert_allclose(w.sum(0), 1, atol=1e-12)
    np.testing.assert_allclose(w.sum(1), 1, atol=1e-12)
    assert (w >= 0).all()
    assert topo.rho < 1
    assert topo.rho == pytest.approx(numpy_rho(w), abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_erdos_renyi_is_connected_and_seeded(seed):
    a, b = T.erdos_renyi(20, 0.15, seed=seed), T.erdos_renyi(20, 0.15, seed=seed)
    np.testing.assert_array_equal(a.mixing_matrix(), b.mixing_matrix())
    assert a.rho < 1


def test_user_graph_as_adjacency_list_and_matrix():
    star = [[1, 2, 3], [0], [0], [0]]
    a = T.from_graph(star, weights="metropolis").mixing_matrix()
    b = T.from_graph(np.array([[0, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]])).mixing_matrix()
    np.testing.assert_allclose(a, b)
    assert a[0, 1] == pytest.approx(1 / 4) and a[1, 1] == pytest.approx(3 / 4)
    uniform = T.from_graph(star, weights="uniform").mixing_matrix()
    assert uniform[0, 1] == pytest.approx(1 / 4) and uniform[1, 1] == pytest.approx(3 / 4)
    np.testing.assert_allclose(T.from_graph({0: [1], 1: [2], 2: [0]}).mixing_matrix(), np.full((3, 3), 1 / 3))


RING4 = T.ring(4).mixing_matrix()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: T.from_matrix(np.ones((3, 4)) / 4), r"must be square .*\(3, 4\)"),
        (lambda: T.make_topology(RING4, 5), r"has 4 workers but num_workers=5"),
        (lambda: T.validate_mixing_matrix(RING4, num_workers=5), r"4 x 4 but there are num_workers=5"),
        (
            lambda: T.from_matrix([[1.5, -0.5], [-0.5, 1.5]]),
            r"W\[0,1\]=-0\.5 is negative",
        ),
        (lambda: T.from_matrix([[0.5, 0.5], [0.4, 0.6]]), r"not symmetric: W\[0,1\]=0\.5 but W\[1,0\]=0\.4"),
        (lambda: T.from_matrix([[0.5, 0.4], [0.4, 0.5]]), r"row 0 sums to 0\.9.*within 1e-06"),
        (
            lambda: T.from_matrix(np.kron(np.eye(2), np.full((2, 2), 0.5))),
            r"rho=1 >= 1: the graph is disconnected",
        ),
        (
            lambda: T.validate_mixing_matrix(
                np.full((3, 3), 1 / 3), adjacency=np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]])
            ),
            r"W\[0,2\]=0\.333333 > 0 but workers 0 and 2 are not neighbours",
        ),
        (lambda: T.from_graph([[1], [0], [3], [2]]), r"disconnected"),
        (lambda: T.from_graph([[1, 7], [0]]), r"worker 0 lists neighbour 7"),
        (lambda: T.from_graph([[1], [0]], weights="max"), r"weights='max' is not known"),
        (lambda: T.hypercube(6), r"power of 2; got 6"),
        (lambda: T.make_topology("star", 4), r"topology='star' is not known; allowed: ring, torus"),
        (lambda: T.erdos_renyi(5, 0.0), r"p=0\.0 .*\(0, 1\]"),
        (lambda: T.from_matrix([[float("nan")]]), r"W\[0,0\]=nan is not finite"),
    ],
)
def test_validation_errors_name_the_offending_entry(build, message):
    with pytest.raises(T.TopologyError, match=message):
        build()


def test_a_mixing_matrix_is_read_as_one_whatever_its_first_entry_and_a_0_1_matrix_as_a_graph():
    w = [[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]  # integer 0 first: still a mixing matrix
    np.testing.assert_array_equal(T.make_topology(w, 3).matrix, np.asarray(w))
    path = [[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0]]  # a 0/1 adjacency matrix as lists
    as_graph = T.make_topology(path, 4)
    assert as_graph.name == "graph(metropolis)"
    np.testing.assert_array_equal(as_graph.matrix, T.make_topology({0: [1], 1: [2], 2: [3]}, 4).matrix)
    np.testing.assert_array_equal(T.make_topology([[1], [0, 2], [1, 3], [2]], 4).matrix, as_graph.matrix)
