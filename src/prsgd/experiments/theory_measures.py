"""What the theory experiments measure, and at which sizes (:class:`Plan`): the exact convergence measure of
Algorithm 1 on a problem with known constants, the steps to reach a target, the speed-up over workers, and the best
period; and how a measured value is written. The experiments and their report: :mod:`.theory_experiments`."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prsgd.algorithm.theory import lr_is_capped, recommended_lr, recommended_period
from prsgd.experiments.problems import NonConvexRegression, run
from prsgd.experiments.report import mean_sd
from prsgd.training.config import ConfigError

COMMUNICATION_GRID = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
BETA = 0.5
THRESHOLDS = (0.05, 0.10, 0.20)  # communication: "within this much of period 1's measure"
pm = functools.partial(mean_sd, fmt=".2f")  # slopes, exponents and efficiencies: mean +- sd over seeds
LR_SCALE = 0.3


@dataclass(frozen=True)
class Plan:
    """The sizes of the four experiments (``configs/theory/*.toml`` hold the same keys)."""

    seeds: int = 3
    steps: int = 4000  # T of the measure-vs-N form, and of experiments 3 and 4
    workers: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # N of the measure-vs-N form
    speedup_steps: int = 65536  # T1: eps is one worker's measure after T1 steps
    speedup_workers: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # N of the steps-to-eps form
    speedup_cases: int = 4  # Polyak/Nesterov x identical/non-identical, in that order; fewer for a quick plan
    lengths: tuple[int, ...] = (1000, 2000, 4000, 8000, 16000)  # T of experiment 2
    communication_workers: int = 4
    momentum_workers: int = 8
    decentralized_workers: tuple[int, ...] = (16, 64)


QUICK = Plan(
    seeds=1,
    steps=200,
    workers=(1, 2, 4),
    speedup_steps=16384,
    speedup_workers=(1, 2, 4, 8),
    speedup_cases=1,
    lengths=(400, 800),
    communication_workers=2,
    momentum_workers=2,
    decentralized_workers=(4,),
)


def load_plan(path: str | Path) -> Plan:
    """A :class:`Plan` from a TOML file; unknown keys and values that are not integers >= 1 raise ConfigError."""
    try:
        values = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"theory plan {str(path)!r} cannot be read: {error}") from None
    fields = [f.name for f in dataclasses.fields(Plan)]
    plan = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key {key!r} in {path}; known keys: {', '.join(fields)}")
        wants_list = isinstance(getattr(Plan(), key), tuple)
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) != wants_list or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items
        ):
            kind = "a list of integers >= 1" if wants_list else "an integer >= 1"
            raise ConfigError(f"{key}={value!r} in {path} is not allowed; it must be {kind}")
        plan[key] = tuple(value) if isinstance(value, list) else value
    if not 1 <= plan.get("speedup_cases", 4) <= 4:
        raise ConfigError(f"speedup_cases={plan['speedup_cases']} in {path} is not allowed; it must be in [1, 4]")
    return Plan(**plan)


def lr_for(n: int, steps: int, problem: NonConvexRegression) -> float:
    """The corollary's gamma = LR_SCALE sqrt(N / T), capped at (1 - beta)^2 / L (see prsgd.algorithm.theory)."""
    return recommended_lr(n, steps, lr_scale=LR_SCALE, momentum=BETA, smoothness=problem.L)


def is_capped(n: int, steps: float, problem: NonConvexRegression) -> bool:
    """Whether gamma for (N, T) hits the cap, i.e. lies outside the corollary's conditions."""
    return lr_is_capped(n, steps, LR_SCALE, BETA, problem.L)


def problem_for(
    n: int, identical: bool, seed: int, noise: str = "additive", heterogeneity: str = "shift"
) -> NonConvexRegression:
    zeta = 0.0 if identical else 2.0
    return NonConvexRegression(
        n, dim=20, samples=40, lam=1.0, sigma=2.0, zeta=zeta, seed=seed, noise=noise, heterogeneity=heterogeneity
    )


def measure(
    n: int, steps: int, identical: bool, seed: int, noise: str = "additive", heterogeneity: str = "shift", **kw
) -> float:
    """One seed's measure after ``steps`` steps, with momentum BETA and gamma from :func:`lr_for`."""
    problem = problem_for(n, identical, seed, noise, heterogeneity)
    return run(problem, steps, lr=lr_for(n, steps, problem), momentum=BETA, seed=seed, **kw).measure


def measures(n: int, steps: int, identical: bool, seeds: int, noise: str = "additive", **kw) -> np.ndarray:
    """:func:`measure` for seeds 0 .. seeds - 1."""
    return np.array([measure(n, steps, identical, seed, noise, **kw) for seed in range(seeds)])


def corollary_measure(n: int, steps: int, identical: bool, seed: int, nesterov: bool) -> float:
    """One seed's measure with the corollaries' gamma and period for (N, T)."""
    return measure(n, steps, identical, seed, nesterov=nesterov, period=recommended_period(n, steps, identical))


def steps_to_reach(eps: float, n: int, identical: bool, seed: int, nesterov: bool, guess: float) -> tuple[float, bool]:
    """The run length T at which N workers' measure (gamma and I set for that T) reaches ``eps`` (see
    :func:`length_to_reach`). Returns (T, whether gamma was capped there)."""
    reached, before = length_to_reach(eps, lambda t: corollary_measure(n, t, identical, seed, nesterov), guess)
    return reached, (is_capped(n, before, problem_for(n, identical, seed)) if before else False)


def length_to_reach(eps: float, at: Callable[[int], float], guess: float) -> tuple[float, int | None]:
    """The run length T at which ``at(T)`` (a run of that length's measure) reaches ``eps``: bracketed by factors
    of sqrt(2) from ``guess``, interpolated log-log. Returns (T, the bracket's shorter length), or (nan, None) when
    12 factors either way do not bracket it."""
    factor = np.sqrt(2.0)
    points: dict[int, float] = {}

    def measured(t: int) -> float:
        if t not in points:
            points[t] = at(t)
        return points[t]

    t = max(2, round(guess))
    if measured(t) > eps:
        for _ in range(12):
            t = round(t * factor)
            if measured(t) <= eps:
                break
    else:
        for _ in range(12):
            if t <= 2:
                break
            t = max(2, round(t / factor))
            if measured(t) > eps:
                break
    for (t0, v0), (t1, v1) in itertools.pairwise(sorted(points.items())):
        if v0 > eps >= v1:  # the first length that reaches eps, and the one before it
            frac = (np.log(v0) - np.log(eps)) / (np.log(v0) - np.log(v1))
            return float(np.exp(np.log(t0) + frac * (np.log(t1) - np.log(t0)))), t0
    return float("nan"), None


SPEEDUP_CASES = [(False, True), (False, False), (True, True), (True, False)]  # (nesterov, identical)


def case_name(nesterov: bool, identical: bool) -> str:
    return f"{'Nesterov' if nesterov else 'Polyak'}, {'identical' if identical else 'non-identical'}"


@dataclass
class Speedup:
    """Steps to eps for one case: ``steps[s][k]`` is seed s's T_eps for ``workers[k]`` (T1 for N = 1)."""

    workers: list[int]
    steps: np.ndarray  # (seeds, len(workers))
    capped: np.ndarray  # (seeds, len(workers)) bool
    eps: np.ndarray  # (seeds,)

    def slopes(self, max_workers: int | None = None) -> np.ndarray:
        keep = [k for k, n in enumerate(self.workers) if max_workers is None or n <= max_workers]
        return np.array([slope([self.workers[k] for k in keep], row[keep]) for row in self.steps])

    def efficiency(self) -> np.ndarray:
        return self.steps[:, :1] / (np.array(self.workers) * self.steps)


def speedup(seeds: int, t1: int, workers: list[int], nesterov: bool, identical: bool) -> Speedup:
    """Steps to reach eps (one worker's measure at ``t1``, per seed) for each N in ``workers`` (first: 1)."""
    steps, capped, eps = [], [], []
    for seed in range(seeds):
        e = corollary_measure(1, t1, identical, seed, nesterov)
        row, flags = [float(t1)], [is_capped(1, t1, problem_for(1, identical, seed))]
        for n in workers[1:]:
            t, flag = steps_to_reach(e, n, identical, seed, nesterov, guess=t1 / n)
            row.append(t)
            flags.append(flag)
        steps.append(row)
        capped.append(flags)
        eps.append(e)
    return Speedup(list(workers), np.array(steps), np.array(capped), np.array(eps))


@dataclass
class PeriodSearch:
    """For one data case: per length and seed, period 1's measure, the largest period within each threshold (and
    whether the search reached its cap T / 4), and the measure at the corollary's period."""

    base: np.ndarray  # (lengths, seeds)
    largest: np.ndarray  # (thresholds, lengths, seeds)
    capped: np.ndarray  # (thresholds, lengths, seeds) bool
    corollary: np.ndarray  # (lengths, seeds): measure at the corollary's I
    periods: list[int]  # the corollary's I per length


def search_periods(
    n: int, lengths: list[int], identical: bool, seeds: int, noise: str, heterogeneity: str = "shift"
) -> PeriodSearch:
    """Measures for growing periods (up to T / 4), each seed on its own, until every threshold has failed."""
    base = np.zeros((len(lengths), seeds))
    largest = np.ones((len(THRESHOLDS), len(lengths), seeds), dtype=int)
    capped = np.zeros((len(THRESHOLDS), len(lengths), seeds), dtype=bool)
    corollary = np.zeros((len(lengths), seeds))
    periods = [recommended_period(n, t, identical) for t in lengths]
    for i, steps in enumerate(lengths):
        for seed in range(seeds):

            def at(period: int, steps=steps, seed=seed) -> float:
                return measure(n, steps, identical, seed, noise, heterogeneity, period=period)

            base[i, seed] = at(1)
            known = {1: base[i, seed]}
            failed = [False] * len(THRESHOLDS)
            for period in COMMUNICATION_GRID[1:]:
                if period > steps // 4:
                    break
                known[period] = at(period)
                for k, threshold in enumerate(THRESHOLDS):
                    if not failed[k] and known[period] > (1 + threshold) * base[i, seed]:
                        failed[k] = True  # the first period that fails ends this threshold's search
                    elif not failed[k]:
                        largest[k, i, seed] = period
                if all(failed):
                    break
            for k in range(len(THRESHOLDS)):
                capped[k, i, seed] = not failed[k]
            corollary[i, seed] = known.get(periods[i]) or at(periods[i])
    return PeriodSearch(base, largest, capped, corollary, periods)


def held(ok: bool, measured: str, predicted: str) -> str:
    return f"**held** ({measured}; theory {predicted})" if ok else f"**not held** ({measured}; theory {predicted})"


def slope(xs, ys) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def save(fig, axes, path: Path, plt) -> None:
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(values: np.ndarray) -> str:
    return f"{values.mean():.4g} ({values.min():.3g}-{values.max():.3g})"
