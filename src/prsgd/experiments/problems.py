"""Synthetic non-convex problems whose constants are known, to watch the paper's theorems hold (or not).

:class:`NonConvexRegression` gives N workers the objectives

    f_i(x) = 1/(2m) ||A x - b_i||^2 + lam * sum_k x_k^2 / (1 + x_k^2),      f = (1/N) sum_i f_i

with a shared A (m x d) and worker targets b_i = b + delta_i (sum_i delta_i = 0). The regulariser
r(t) = t^2 / (1 + t^2) has r'' in [-1/2, 2], so f is non-convex once lam exceeds twice the smallest eigenvalue of
A^T A / m, and L-smooth with L = lambda_max(A^T A / m) + 2 lam (attained at x = 0). Stochastic gradients, with
``noise="additive"`` (the default), add Gaussian noise of exactly sigma^2 expected squared norm:
G_i = grad f_i(x) + (sigma / sqrt(d)) xi, xi ~ N(0, I). There every worker's linear part has the same Hessian and
the noise does not depend on x, so with identical data averaging every I steps gives the same average as every
step (only the regulariser lets the period matter). With ``noise="rows"`` a worker's gradient is that of a
``batch`` of rows of its least-squares part drawn uniformly (plus the regulariser's): the Hessian
a_j a_j^T / batch then differs from sample to sample, workers drift apart between rounds even with identical data,
and the variance sigma^2(x) depends on x (:meth:`NonConvexRegression.noise_variance` gives it exactly).
Heterogeneity is exact too, of one of two kinds (``heterogeneity=``):

- ``"shift"`` (the default): grad f_i(x) - grad f(x) = -A^T delta_i / m for every x, the delta_i scaled so that
  (1/N) sum_i ||grad f_i - grad f||^2 = zeta^2. Every worker has the same Hessian, so the heterogeneity cancels in
  the node average of the quadratic part and acts only through the regulariser's curvature: weakly (at zeta = 4,
  period 16 raises the floor 2.4x where "curvature" raises it 18x, ``tests/test_heterogeneity.py``);
- ``"curvature"``: each worker weighs the regulariser per coordinate, f_i = 1/(2m) ||A x - b||^2 + sum_k w_ik r(x_k)
  with w_ik = lam + zeta s_ik, sum_i s_ik = 0, so the workers differ in curvature (Hessians A^T A / m +
  diag(w_ik r''(x_k))) and grad f_i - grad f = zeta s_i * r'(x). Since |r'| <= 9 / (8 sqrt 3), attained at
  |t| = 1/sqrt 3, scaling s so that (1/N) sum_ik s_ik^2 (9 / (8 sqrt 3))^2 = 1 makes zeta^2 the exact supremum over
  x of (1/N) sum_i ||grad f_i(x) - grad f(x)||^2 (Assumption 1's constant, attained). f is the same function for
  every zeta, and zeta = 0 is the identical-data problem of the same seed.

L is exact for both: the largest |eigenvalue| any worker's Hessian takes over x (each r''(x_k) ranges over
[-1/2, 2] independently, attained at x_k = +-1 and 0).

:func:`run` drives the workers with prsgd's own algorithm (:class:`prsgd.algorithm.PeriodicSync` over the
simulator's stacked communicator, on (N, d) tensors) and returns the paper's convergence measure
(1/T) sum_t ||grad f(x_bar^t)||^2, computed exactly along the run.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from prsgd.algorithm import Hyperparameters, PeriodicSync, RoundSpec, UpdateGroup
from prsgd.algorithm.topology import make_topology
from prsgd.engines.stacked import StackedCommunicator
from prsgd.errors import check_choice, check_int, check_number

MAX_SLOPE = 9 / (8 * math.sqrt(3))
"""max |r'(t)| of the regulariser r(t) = t^2 / (1 + t^2), attained at |t| = 1/sqrt 3."""


class NonConvexRegression:
    """N workers' objectives with known L, sigma^2 and zeta^2 (see the module docstring). float64 throughout."""

    def __init__(
        self,
        num_workers: int,
        dim: int = 20,
        samples: int = 40,
        lam: float = 1.0,
        sigma: float = 1.0,
        zeta: float = 0.0,
        seed: int = 0,
        noise: str = "additive",
        batch: int = 1,
        heterogeneity: str = "shift",
    ) -> None:
        for name, value in (("num_workers", num_workers), ("dim", dim), ("samples", samples), ("batch", batch)):
            check_int(name, value, 1)
        self.noise = check_choice("noise", noise, ("additive", "rows"))
        self.heterogeneity = check_choice("heterogeneity", heterogeneity, ("shift", "curvature"))
        self.batch = batch
        for name, value in (("lam", lam), ("sigma", sigma), ("zeta", zeta)):
            check_number(name, value, 0)
        check_int("seed", seed, 0)
        g = torch.Generator().manual_seed(seed)
        self.num_workers, self.dim, self.samples = num_workers, dim, samples
        self.lam, self.sigma, self.zeta = float(lam), float(sigma), float(zeta)
        self.A = torch.randn(samples, dim, generator=g, dtype=torch.float64)
        self.b = torch.randn(samples, generator=g, dtype=torch.float64) + self.A @ torch.randn(
            dim, generator=g, dtype=torch.float64
        )
        self.AtA = self.A.T @ self.A / samples
        shifts = torch.randn(num_workers, samples, generator=g, dtype=torch.float64)
        shifts -= shifts.mean(0)
        spread = (shifts @ self.A / samples).pow(2).sum(1).mean()
        scale = self.zeta / spread.sqrt() if num_workers > 1 and spread > 0 else 0.0
        self.delta = shifts * scale  # (N, m), sum over workers is 0
        spreads = torch.randn(num_workers, dim, generator=g, dtype=torch.float64)  # drawn after: A, b, delta kept
        spreads -= spreads.mean(0)
        size = spreads.pow(2).mean(0).sum() * MAX_SLOPE**2
        spreads = spreads / size.sqrt() if num_workers > 1 and size > 0 else spreads * 0
        if self.heterogeneity == "curvature":
            self.delta = torch.zeros_like(self.delta)
        else:
            spreads = spreads * 0
        self.weights = self.lam + self.zeta * spreads  # (N, d): each worker's regulariser weight per coordinate
        self.x0 = torch.full((dim,), 1.5, dtype=torch.float64)  # start in the non-convex region (|x_k| > 1/sqrt 3)

    @functools.cached_property
    def L(self) -> float:
        """The smoothness constant of every f_i: the largest |eigenvalue| of A^T A / m + diag(w_ik r''(x_k)) over
        workers i and points x. Each r''(x_k) ranges over [-1/2, 2] on its own and eigenvalues grow with the
        diagonal, so the extremes are at the diagonal's extremes (lambda_max(A^T A / m) + 2 lam for "shift")."""
        c = self.weights
        high, low = torch.where(c >= 0, 2 * c, -c / 2), torch.where(c >= 0, -c / 2, 2 * c)
        return max(
            max(
                float(torch.linalg.eigvalsh(self.AtA + torch.diag(hi))[-1]),
                -float(torch.linalg.eigvalsh(self.AtA + torch.diag(lo))[0]),
            )
            for hi, lo in zip(high, low, strict=True)
        )

    def heterogeneity_at(self, x: Tensor) -> float:
        """(1/N) sum_i ||grad f_i(x) - grad f(x)||^2 at one point x (at most zeta^2, for every x)."""
        return float(
            (self.worker_gradients(x.expand(self.num_workers, -1)) - self.full_gradient(x)).pow(2).sum(1).mean()
        )

    @property
    def sigma2(self) -> float:
        return self.sigma**2

    @property
    def zeta2(self) -> float:
        return self.zeta**2

    def _regulariser_grad(self, x: Tensor, weights: Tensor | float | None = None) -> Tensor:
        return (self.lam if weights is None else weights) * 2 * x / (1 + x * x) ** 2

    def full_gradient(self, x: Tensor) -> Tensor:
        """grad f at x, shape (..., d)."""
        return (x @ self.A.T - self.b) @ self.A / self.samples + self._regulariser_grad(x)

    def worker_gradients(self, xs: Tensor) -> Tensor:
        """grad f_i at worker i's point xs[i], shape (N, d)."""
        residual = xs @ self.A.T - (self.b + self.delta)
        return residual @ self.A / self.samples + self._regulariser_grad(xs, self.weights)

    def stochastic_gradients(self, xs: Tensor, generator: torch.Generator) -> Tensor:
        if self.noise == "rows":
            rows = torch.randint(self.samples, (xs.shape[0], self.batch), generator=generator)
            a = self.A[rows]  # (N, B, d)
            targets = torch.gather(self.b + self.delta, 1, rows)  # (N, B)
            residual = torch.einsum("nbd,nd->nb", a, xs) - targets
            return torch.einsum("nb,nbd->nd", residual, a) / self.batch + self._regulariser_grad(xs, self.weights)
        noise = torch.randn(xs.shape, generator=generator, dtype=torch.float64)
        return self.worker_gradients(xs) + self.sigma / math.sqrt(self.dim) * noise

    def noise_variance(self, xs: Tensor) -> Tensor:
        """E ||G_i - grad f_i||^2 at each worker's point xs[i], shape (N,): sigma^2 for additive noise; for row
        sampling, the variance of one row's gradient over the m rows, divided by the batch."""
        if self.noise == "additive":
            return torch.full((xs.shape[0],), self.sigma2, dtype=torch.float64)
        residual = xs @ self.A.T - (self.b + self.delta)  # (N, m)
        per_row = residual.unsqueeze(-1) * self.A  # (N, m, d): each row's gradient
        centred = per_row - per_row.mean(1, keepdim=True)
        return centred.pow(2).sum(-1).mean(1) / self.batch

    def value(self, x: Tensor) -> Tensor:
        """f(x) (up to the constant mean_i ||delta_i||^2 / 2m that does not move the gradient)."""
        residual = x @ self.A.T - self.b
        return 0.5 * residual.pow(2).sum(-1) / self.samples + self.lam * (x * x / (1 + x * x)).sum(-1)


@dataclass(frozen=True)
class RunResult:
    measure: float  # (1/T) sum_{t<T} ||grad f(x_bar^t)||^2
    grad_norms: Tensor  # ||grad f(x_bar^t)||^2 for t = 0 .. T-1
    rounds: int
    bytes: int
    drift: Tensor  # the consensus distance (1/N) sum_i ||x_i - x_bar||^2 just before each round


def run(
    problem: NonConvexRegression,
    steps: int,
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    period: int = 1,
    sync: str = "params_and_momentum",
    topology: object = None,
    seed: int = 0,
) -> RunResult:
    """T = ``steps`` steps of every worker from x^0 with prsgd's algorithm; the exact convergence measure."""
    hyper = Hyperparameters(lr=lr, momentum=momentum, nesterov=nesterov)
    algorithm = PeriodicSync(RoundSpec(sync, period, topology=topology), has_state=momentum > 0)
    n = problem.num_workers
    xs = problem.x0.repeat(n, 1)
    momentum_buffers = [torch.zeros_like(xs)] if momentum > 0 else []
    mixing = make_topology(topology, n) if topology is not None else None
    engine = StackedCommunicator(n, [xs], [], momentum_buffers, mixing)
    algorithm.attach(engine)
    g = torch.Generator().manual_seed(seed)
    norms = torch.empty(steps, dtype=torch.float64)
    drift = []
    for t in range(steps):
        norms[t] = problem.full_gradient(xs.mean(0)).pow(2).sum()
        grads = problem.stochastic_gradients(xs, g)
        state = {"momentum_buffer": momentum_buffers} if momentum_buffers else {}
        algorithm.step([UpdateGroup([xs], engine.set_grads([grads]), state, hyper)])
        if algorithm.drift.latest is not None and algorithm.drift.latest.step == t + 1:
            drift.append(algorithm.drift.latest.consensus_distance)
    drifts = torch.tensor(drift, dtype=torch.float64)
    return RunResult(float(norms.mean()), norms, engine.comm.rounds, engine.comm.bytes, drifts)


def drift_without_curvature(problem: NonConvexRegression, lr: float, momentum: float, period: int) -> float:
    """The expected consensus distance after ``period`` steps of Algorithm 1 (Polyak momentum; or the cleared-
    momentum rule), just before its round, if the objectives had no curvature: from a round every worker starts
    at x_bar with the averaged buffer, and worker i's deviation after k steps is -gamma sum_r c_{k-r+1} (G_i^r -
    G_bar^r), c_j = (1 - beta^j) / (1 - beta). Its heterogeneity part is constant (mean_i ||.||^2 = zeta^2), its
    noise part independent across steps ((N-1)/N sigma^2 each), so

        E D = gamma^2 [ zeta^2 (sum_j c_j)^2 + (N-1)/N sigma^2 sum_j c_j^2 ],   j = 1 .. I,

    the two terms of the paper's Lemma 5 (in I^2 zeta^2 and I sigma^2) with their exact constants in this
    setting. Curvature (the shared Hessian, gamma L I not small) contracts the deviations, so the measured value
    lies below it as gamma L I grows; the additive noise of ``noise="additive"`` is what makes sigma^2 exact."""
    c = [(1 - momentum**j) / (1 - momentum) if momentum else 1.0 for j in range(1, period + 1)]
    n = problem.num_workers
    return lr**2 * (problem.zeta2 * sum(c) ** 2 + (n - 1) / n * problem.sigma2 * sum(x * x for x in c))
