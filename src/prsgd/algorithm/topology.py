"""Communication graphs and their mixing matrices W for decentralized momentum SGD (Algorithm 2, eq. 18).

A :class:`Topology` gives, for each step, a doubly-stochastic N x N mixing matrix W (symmetric for static graphs)
and, from it, each worker's in-neighbours with their weights (whom it receives from) and out-neighbours (whom it
sends to). Built-in graphs: ring, 2-D torus, complete, hypercube, static exponential, Erdos-Renyi, any user graph
(adjacency list or matrix) with uniform (max-degree) or Metropolis-Hastings weights, and the time-varying one-peer
exponential graph. ``rho = max(|lambda_2(W)|, |lambda_N(W)|)`` (Assumption 2) and the spectral gap ``1 - rho``
are computed with numpy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from prsgd.algorithm.mixing import Neighbours, neighbours
from prsgd.errors import InvalidArgument

TOLERANCE = 1e-6
"""Row and column sums of W must be 1 within this absolute tolerance; symmetry is checked to the same."""

WEIGHTS = ("uniform", "metropolis")


class TopologyError(InvalidArgument):
    """An invalid graph or mixing matrix; the message names the offending entry or property."""


@dataclass(frozen=True)
class Topology:
    """A static mixing matrix W (symmetric, doubly stochastic, connected), with its name."""

    name: str
    matrix: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        validate_mixing_matrix(self.matrix)

    @property
    def num_workers(self) -> int:
        return self.matrix.shape[0]

    @property
    def time_varying(self) -> bool:
        return False

    def mixing_matrix(self, step: int = 0) -> np.ndarray:
        """W used at ``step`` (the same at every step for a static graph)."""
        return self.matrix

    @property
    def rho(self) -> float:
        """max(|lambda_2(W)|, |lambda_N(W)|): how much one mixing step shrinks the distance to consensus."""
        return spectral_rho(self.matrix)

    @property
    def spectral_gap(self) -> float:
        return 1.0 - self.rho

    @property
    def max_degree(self) -> int:
        """The most neighbours (self excluded) any worker receives from in one step."""
        return max(len(neighbours(self.mixing_matrix(0), i).sources) for i in range(self.num_workers))

    def neighbours(self, worker: int, step: int = 0) -> Neighbours:
        return neighbours(self.mixing_matrix(step), worker)


@dataclass(frozen=True)
class OnePeerExponential(Topology):
    """Time-varying one-peer exponential graph (beyond the paper; as in stochastic gradient push, Assran et al.).

    At step t every worker i averages with one peer, ``x_i <- (x_i + x_{i - 2^k}) / 2`` with
    ``k = t mod ceil(log2 N)``: W_t = (I + P_t) / 2 for a cyclic shift P_t, doubly stochastic but not symmetric.
    ``rho`` is that of one full cycle of steps (the product of the W_t), which is 0 when N is a power of 2.
    ``matrix`` holds W_0.
    """

    def __post_init__(self) -> None:
        for step in range(self.cycle_length):
            validate_mixing_matrix(self.mixing_matrix(step), symmetric=False, connected=False)

    @property
    def time_varying(self) -> bool:
        return True

    @property
    def cycle_length(self) -> int:
        return max(1, math.ceil(math.log2(self.num_workers))) if self.num_workers > 1 else 1

    def mixing_matrix(self, step: int = 0) -> np.ndarray:
        return _one_peer_matrix(self.num_workers, 2 ** (step % self.cycle_length))

    @property
    def rho(self) -> float:
        product = np.eye(self.num_workers)
        for step in range(self.cycle_length):
            product = self.mixing_matrix(step) @ product
        deviation = product - np.full_like(product, 1.0 / self.num_workers)
        return float(np.linalg.norm(deviation, 2))


def spectral_rho(w: np.ndarray) -> float:
    """max(|lambda_2|, |lambda_N|) of a symmetric doubly-stochastic W (0 for a single worker)."""
    if w.shape[0] == 1:
        return 0.0
    eigenvalues = np.linalg.eigvalsh(w)  # ascending; the largest is 1
    return float(max(abs(eigenvalues[0]), abs(eigenvalues[-2])))


def validate_mixing_matrix(
    w: np.ndarray,
    num_workers: int | None = None,
    *,
    adjacency: np.ndarray | None = None,
    symmetric: bool = True,
    connected: bool = True,
    tol: float = TOLERANCE,
) -> None:
    """Raise :class:`TopologyError` naming the first violated property of a mixing matrix ``w``.

    Checked: square, size ``num_workers``, finite, no negative entry, symmetric (static W), every row and column
    summing to 1 within ``tol``, nonzero only between neighbours of ``adjacency`` (when given), and connected
    (rho < 1, Assumption 2).
    """
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise TopologyError(f"mixing matrix must be square (N x N); got shape {w.shape}")
    n = w.shape[0]
    if num_workers is not None and n != num_workers:
        raise TopologyError(f"mixing matrix is {n} x {n} but there are num_workers={num_workers} workers")
    if not np.all(np.isfinite(w)):
        i, j = np.argwhere(~np.isfinite(w))[0]
        raise TopologyError(f"mixing matrix entry W[{i},{j}]={w[i, j]} is not finite")
    if np.any(w < 0):
        i, j = np.argwhere(w < 0)[0]
        raise TopologyError(f"mixing matrix entry W[{i},{j}]={w[i, j]:.6g} is negative; entries must be >= 0")
    if symmetric and not np.allclose(w, w.T, rtol=0, atol=tol):
        i, j = np.unravel_index(np.argmax(np.abs(w - w.T)), w.shape)
        raise TopologyError(f"mixing matrix is not symmetric: W[{i},{j}]={w[i, j]:.6g} but W[{j},{i}]={w[j, i]:.6g}")
    for axis, kind in ((1, "row"), (0, "column")):
        sums = w.sum(axis=axis)
        bad = np.flatnonzero(np.abs(sums - 1) > tol)
        if bad.size:
            raise TopologyError(
                f"mixing matrix {kind} {bad[0]} sums to {sums[bad[0]]:.6g}; every row and column must sum to 1 "
                f"(within {tol:g}): W must be doubly stochastic"
            )
    if adjacency is not None:
        allowed = np.asarray(adjacency, dtype=bool) | np.eye(n, dtype=bool)
        bad_pairs = np.argwhere((w > 0) & ~allowed)
        if bad_pairs.size:
            i, j = bad_pairs[0]
            raise TopologyError(
                f"mixing matrix entry W[{i},{j}]={w[i, j]:.6g} > 0 but workers {i} and {j} are not neighbours"
            )
    if connected and n > 1:
        rho = spectral_rho(w) if symmetric else float(np.linalg.norm(w - np.full_like(w, 1.0 / n), 2))
        if rho >= 1 - tol:
            raise TopologyError(
                f"mixing matrix has rho={rho:.6g} >= 1: the graph is disconnected, so workers never reach consensus "
                "(Assumption 2 needs rho < 1)"
            )


def _adjacency_from(graph: np.ndarray | Sequence[Iterable[int]] | Mapping[int, Iterable[int]], n: int | None = None):
    """A symmetric boolean adjacency matrix (no self-loops) from an adjacency matrix or list."""
    if isinstance(graph, Mapping):
        size = n if n is not None else (max(max(graph), *(max(v, default=-1) for v in graph.values())) + 1)
        lists = [list(graph.get(i, ())) for i in range(size)]
    elif isinstance(graph, np.ndarray) or (len(graph) and not isinstance(graph[0], Iterable)):
        a = np.asarray(graph)
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise TopologyError(f"adjacency matrix must be square; got shape {a.shape}")
        if np.any(a != a.T):
            i, j = np.argwhere(a != a.T)[0]
            raise TopologyError(f"adjacency matrix is not symmetric: A[{i},{j}]={a[i, j]} but A[{j},{i}]={a[j, i]}")
        adjacency = a.astype(bool)
        np.fill_diagonal(adjacency, False)
        return adjacency
    else:
        lists = [list(v) for v in graph]
    size = len(lists)
    adjacency = np.zeros((size, size), dtype=bool)
    for i, nbrs in enumerate(lists):
        for j in nbrs:
            if not (isinstance(j, int | np.integer) and 0 <= j < size):
                raise TopologyError(f"worker {i} lists neighbour {j!r}; neighbours must be integers in [0, {size})")
            if j != i:
                adjacency[i, j] = adjacency[j, i] = True
    return adjacency


def weights_for(adjacency: np.ndarray, weights: str = "metropolis") -> np.ndarray:
    """Symmetric doubly-stochastic W on the graph ``adjacency``.

    ``"uniform"``: W_ij = 1 / (d_max + 1) for every edge, the rest on the diagonal (max-degree weights; on a
    regular graph every worker weighs itself and each neighbour 1 / (d + 1)). ``"metropolis"``:
    W_ij = 1 / (1 + max(d_i, d_j)) (Metropolis-Hastings), the rest on the diagonal.
    """
    if weights not in WEIGHTS:
        raise TopologyError(f"weights={weights!r} is not known; allowed: {', '.join(WEIGHTS)}")
    a = np.asarray(adjacency, dtype=bool)
    degree = a.sum(axis=1)
    denominator = degree.max(initial=0) + 1.0 if weights == "uniform" else 1.0 + np.maximum.outer(degree, degree)
    w = a / denominator
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def from_graph(
    graph: np.ndarray | Sequence[Iterable[int]] | Mapping[int, Iterable[int]],
    weights: str = "metropolis",
    name: str = "graph",
) -> Topology:
    """A topology from a user graph: an adjacency matrix, a list of neighbour lists, or a dict worker -> list."""
    adjacency = _adjacency_from(graph)
    w = weights_for(adjacency, weights)
    validate_mixing_matrix(w, adjacency=adjacency)
    return Topology(f"{name}({weights})", w)


def from_matrix(matrix: np.ndarray | Sequence[Sequence[float]], name: str = "matrix") -> Topology:
    """A topology from a user's mixing matrix W (validated)."""
    w = np.array(matrix, dtype=np.float64)
    validate_mixing_matrix(w)
    return Topology(name, w)


def _circulant(n: int, offsets: Iterable[int]) -> np.ndarray:
    a = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for s in offsets:
            j = (i + s) % n
            if j != i:
                a[i, j] = a[j, i] = True
    return a


def ring(n: int, weights: str = "uniform") -> Topology:
    """Each worker talks to its two neighbours i - 1 and i + 1 (mod N)."""
    _check_size(n)
    return Topology("ring", weights_for(_circulant(n, (1, -1)), weights))


def torus(n: int, rows: int | None = None, weights: str = "uniform") -> Topology:
    """2-D torus of ``rows`` x ``n // rows`` workers (default: the most square factorization); 4 neighbours."""
    _check_size(n)
    if rows is None:
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    if n % rows:
        raise TopologyError(f"torus rows={rows} does not divide num_workers={n}")
    cols = n // rows
    a = np.zeros((n, n), dtype=bool)
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            for j in (((r + 1) % rows) * cols + c, r * cols + (c + 1) % cols):
                if j != i:
                    a[i, j] = a[j, i] = True
    return Topology(f"torus({rows}x{cols})", weights_for(a, weights))


def complete(n: int) -> Topology:
    """Everyone with everyone, W = ones / N: one mixing step is exact averaging (Algorithm 1 with I = 1)."""
    _check_size(n)
    return Topology("complete", np.full((n, n), 1.0 / n))


def hypercube(n: int, weights: str = "uniform") -> Topology:
    """log2(N)-dimensional hypercube: i and j are neighbours when they differ in one bit. N must be a power of 2."""
    _check_size(n)
    if n & (n - 1):
        raise TopologyError(f"hypercube needs num_workers to be a power of 2; got {n}")
    a = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for bit in range(int(math.log2(n)) if n > 1 else 0):
            a[i, i ^ (1 << bit)] = True
    return Topology("hypercube", weights_for(a, weights))


def exponential(n: int, weights: str = "uniform") -> Topology:
    """Static exponential graph: neighbours at distances 1, 2, 4, ... (both directions, mod N)."""
    _check_size(n)
    offsets = [2**k for k in range(max(1, math.ceil(math.log2(n)))) if 2**k < n]
    return Topology("exponential", weights_for(_circulant(n, [*offsets, *(-s for s in offsets)]), weights))


def erdos_renyi(n: int, p: float, seed: int = 0, weights: str = "metropolis", max_tries: int = 1000) -> Topology:
    """A connected Erdos-Renyi G(N, p) graph: edges drawn independently with probability ``p`` (seeded),
    redrawn until connected."""
    _check_size(n)
    if not 0 < p <= 1:
        raise TopologyError(f"p={p!r} is not allowed; the edge probability must be in (0, 1]")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        upper = np.triu(rng.random((n, n)) < p, k=1)
        a = upper | upper.T
        if n == 1 or spectral_rho(weights_for(a, "metropolis")) < 1 - TOLERANCE:
            return Topology(f"erdos_renyi(p={p:g})", weights_for(a, weights))
    raise TopologyError(f"no connected Erdos-Renyi graph with N={n}, p={p:g} in {max_tries} draws; raise p")


def _one_peer_matrix(n: int, shift: int) -> np.ndarray:
    """(I + P) / 2 for the cyclic shift P receiving from i - shift (W = [[1]] for one worker)."""
    if n == 1:
        return np.ones((1, 1))
    w = np.eye(n) / 2
    for i in range(n):
        w[i, (i - shift) % n] += 0.5
    return w


def one_peer_exponential(n: int) -> OnePeerExponential:
    _check_size(n)
    return OnePeerExponential("one_peer_exponential", _one_peer_matrix(n, 1))


def _check_size(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TopologyError(f"num_workers={n!r} is not allowed; it must be an integer >= 1")


BUILT_IN = {
    "ring": ring,
    "torus": torus,
    "complete": complete,
    "hypercube": hypercube,
    "exponential": exponential,
    "one_peer_exponential": one_peer_exponential,
}


def make_topology(spec: object, num_workers: int) -> Topology:
    """A topology for ``num_workers`` from a name (``"ring"``, ``"torus"``, ...), a :class:`Topology`, a mixing
    matrix (N x N floats), or a graph as a list of neighbour lists / dict (Metropolis-Hastings weights)."""
    _check_size(num_workers)
    try:
        topology = _topology_from(spec, num_workers)
    except TopologyError:
        raise
    except (TypeError, ValueError, IndexError, OverflowError) as error:
        raise TopologyError(
            f"topology={spec!r} is not a valid mixing matrix or adjacency list ({type(error).__name__}: {error})"
        ) from None
    if topology.num_workers != num_workers:
        raise TopologyError(
            f"topology {topology.name} has {topology.num_workers} workers but num_workers={num_workers}"
        )
    return topology


def _topology_from(spec: object, num_workers: int) -> Topology:
    if isinstance(spec, Topology):
        return spec
    if isinstance(spec, str):
        if spec not in BUILT_IN:
            raise TopologyError(f"topology={spec!r} is not known; allowed: {', '.join(BUILT_IN)}")
        return BUILT_IN[spec](num_workers)
    if isinstance(spec, Mapping):
        return from_graph(spec)
    if hasattr(spec, "shape"):
        a = np.asarray(spec)
        return from_matrix(a) if a.dtype.kind == "f" else from_graph(a)
    if isinstance(spec, Sequence) and not isinstance(spec, str | bytes):
        rows = [list(row) if isinstance(row, Iterable) else None for row in spec]
        if any(row is None for row in rows):
            raise TopologyError(f"topology={spec!r} is not allowed; a graph or matrix is a list of rows")
        entries = [v for row in rows for v in row]
        if any(isinstance(v, float | np.floating) for v in entries):  # any weight, wherever it is: a mixing matrix
            return from_matrix(np.asarray(spec, dtype=np.float64))
        square = all(len(row) == len(rows) for row in rows)
        if square and len(rows) > 2 and all(v in (0, 1) for v in entries):  # a 0/1 adjacency matrix
            return from_graph(np.asarray(spec))
        return from_graph([list(row) for row in rows])
    raise TopologyError(
        f"topology={spec!r} is not allowed; give a name ({', '.join(BUILT_IN)}), a Topology, "
        "an N x N mixing matrix or an adjacency list"
    )
