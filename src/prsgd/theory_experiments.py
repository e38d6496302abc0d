"""The paper's theory, measured on :class:`prsgd.problems.NonConvexRegression` (every constant known).

    python -m prsgd.theory_experiments [--out docs] [--seeds 3] [--quick]

Writes ``OUT/theory.md`` and its figures ``OUT/figures/theory_*.png``:
1. linear speedup: the measure (1/T) sum_t ||grad f(x_bar^t)||^2 at fixed T against N (fitted log-log slope vs the
   theory's -1/2), and the steps to reach a target eps against N (slope vs -1); Polyak and Nesterov, identical and
   non-identical data; learning rate gamma = c sqrt(N / T) and the corollaries' period (prsgd.theory);
2. communication complexity: for growing T, the largest period keeping the measure within 10% of period 1's, and
   the resulting rounds T / I, with the fitted exponent in T vs 1/2 (identical) and 3/4 (non-identical);
3. momentum handling at sync: params_and_momentum vs params_clear_momentum vs params_only across periods;
4. decentralized: the measure against the topology's spectral gap at fixed N.
Every point is the mean over seeds, with the min-max spread in the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prsgd.config import ConfigError
from prsgd.errors import check_int
from prsgd.problems import NonConvexRegression, run
from prsgd.theory import recommended_period
from prsgd.topology import make_topology

BETA = 0.5
LR_SCALE = 0.3


@dataclass(frozen=True)
class Plan:
    """The sizes of the four experiments (``configs/theory/*.toml`` hold the same keys)."""

    seeds: int = 3
    steps: int = 4000  # T of experiments 1, 3 and 4
    workers: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # N of experiment 1
    lengths: tuple[int, ...] = (1000, 2000, 4000, 8000, 16000)  # T of experiment 2
    communication_workers: int = 4
    momentum_workers: int = 8
    decentralized_workers: tuple[int, ...] = (16, 64)


QUICK = Plan(
    seeds=1,
    steps=200,
    workers=(1, 2, 4),
    lengths=(100, 200),
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
    return Plan(**plan)


def lr_for(n: int, steps: int, problem: NonConvexRegression) -> float:
    """gamma = LR_SCALE sqrt(N / T), capped at (1 - beta)^2 / L (the theorems' step-size condition)."""
    return min(LR_SCALE * np.sqrt(n / steps), (1 - BETA) ** 2 / problem.L)


def problem_for(n: int, identical: bool, seed: int) -> NonConvexRegression:
    return NonConvexRegression(n, dim=20, samples=40, lam=1.0, sigma=2.0, zeta=0.0 if identical else 2.0, seed=seed)


def measures(n: int, steps: int, identical: bool, seeds: int, **kw) -> tuple[np.ndarray, list]:
    """The measure of each seed's run (and the runs), with momentum BETA and gamma from :func:`lr_for`."""
    results = []
    for seed in range(seeds):
        problem = problem_for(n, identical, seed)
        results.append(run(problem, steps, lr=lr_for(n, steps, problem), momentum=BETA, seed=seed, **kw))
    return np.array([r.measure for r in results]), results


def verdict(measured: float, predicted: float, tolerance: float) -> str:
    """Whether a fitted exponent agrees with the theory's, within ``tolerance``, in words."""
    held = abs(measured - predicted) <= tolerance
    return (
        f"**prediction held** ({measured:.2f} vs {predicted:g}, within {tolerance:g})"
        if held
        else f"**prediction not met** ({measured:.2f} vs {predicted:g}, off by more than {tolerance:g})"
    )


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


def steps_to_reach(eps: float, n: int, lengths: list[int], identical: bool, seeds: int, nesterov: bool) -> float:
    """The run length T at which the measure (with gamma and I chosen for that T) first reaches ``eps``,
    interpolated log-log between the lengths tried; NaN if even the longest does not reach it."""
    previous = None
    for steps in lengths:
        period = recommended_period(n, steps, identical)
        value = measures(n, steps, identical, seeds, nesterov=nesterov, period=period)[0].mean()
        if value <= eps:
            if previous is None:
                return float(steps)
            (t0, v0), (t1, v1) = previous, (steps, value)
            frac = (np.log(v0) - np.log(eps)) / (np.log(v0) - np.log(v1))
            return float(np.exp(np.log(t0) + frac * (np.log(t1) - np.log(t0))))
        previous = (steps, value)
    return float("nan")


def linear_speedup(seeds: int, steps: int, workers: list[int], plt, fig_dir: Path) -> list[str]:
    lengths = [steps // 2**k for k in range(6, -1, -1)]
    lines = [
        "## 1. Linear speedup",
        "",
        f"Measure at T = {steps}; beta = {BETA}, gamma = min({LR_SCALE} sqrt(N/T), (1-beta)^2/L), period from the "
        "corollaries (`prsgd.theory.recommended_period`), sigma = 2, zeta = 0 (identical) or 2 (non-identical). "
        f"Steps to eps: eps is one worker's measure at T = {steps}; for each N the run length T in {lengths} "
        "(gamma and I set for that T, as the corollaries do) at which the measure reaches eps, interpolated "
        "log-log.",
        "",
        "| option | data | N | period | measure (mean, min-max over seeds) | T to reach eps |",
        "|---|---|---:|---:|---:|---:|",
    ]
    summary, slopes = [], []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for nesterov in (False, True):
        for identical in (True, False):
            means, steps_to = [], []
            for n in workers:
                period = recommended_period(n, steps, identical)
                values = measures(n, steps, identical, seeds, nesterov=nesterov, period=period)[0]
                means.append(values.mean())
                eps = means[0]
                steps_to.append(
                    float(steps) if n == workers[0] else steps_to_reach(eps, n, lengths, identical, seeds, nesterov)
                )
                lines.append(
                    f"| {'Nesterov' if nesterov else 'Polyak'} | {'identical' if identical else 'non-identical'}"
                    f" | {n} | {period} | {fmt(values)} | {steps_to[-1]:.0f} |"
                )
            label = f"{'Nesterov' if nesterov else 'Polyak'}, {'identical' if identical else 'non-identical'}"
            reached = [(n, t) for n, t in zip(workers, steps_to, strict=True) if np.isfinite(t)]
            s_measure, s_steps = slope(workers, means), slope(*zip(*reached, strict=True))
            summary.append(f"| {label} | {s_measure:.2f} | -0.5 | {s_steps:.2f} (eps = {means[0]:.3g}) | -1 |")
            slopes.append((label, s_measure, s_steps))
            axes[0].loglog(workers, means, "o-", label=label)
            axes[1].loglog(*zip(*reached, strict=True), "o-", label=label)
    axes[0].set(xlabel="workers N", ylabel="(1/T) sum ||grad f(x_bar)||^2", title=f"measure at T = {steps}")
    axes[1].set(xlabel="workers N", ylabel="iterations T to reach eps", title="iterations to eps")
    save(fig, axes, fig_dir / "theory_speedup.png", plt)
    lines += [
        "",
        "| case | slope of measure vs N | theory | slope of T to eps vs N | theory |",
        "|---|---:|---:|---:|---:|",
        *summary,
        "",
        "![speedup](figures/theory_speedup.png)",
        "",
        *[
            f"- {label}: measure vs N {verdict(sm, -0.5, 0.1)}; iterations to eps vs N {verdict(st, -1.0, 0.2)}."
            for label, sm, st in slopes
        ],
        "",
    ]
    return lines


def communication(seeds: int, lengths: list[int], n: int, plt, fig_dir: Path) -> list[str]:
    grid = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072]
    lines = [
        "## 2. Communication complexity",
        "",
        f"N = {n}; for each T the largest period I <= T / 4 in {grid} (searched upwards, stopping at the first "
        "failure) whose measure stays within 10% of period 1's (mean over seeds), and the rounds T / I.",
        "",
        "| data | T | measure at I = 1 | largest I within 10% | rounds | corollary's I |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    fits, verdicts = [], []
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for identical in (True, False):
        rounds, capped = [], 0
        for steps in lengths:
            base = measures(n, steps, identical, seeds, period=1)[0].mean()
            best = 1
            for period in grid[1:]:
                if period > steps // 4:
                    capped += 1  # every period up to T / 4 passed: the search hit its cap
                    break
                if measures(n, steps, identical, seeds, period=period)[0].mean() > 1.1 * base:
                    break  # the measure grows with I: the first period that fails ends the search
                best = period
            else:
                capped += 1  # every period up to T / 4 passed: the search hit its cap
            rounds.append(steps / best)
            lines.append(
                f"| {'identical' if identical else 'non-identical'} | {steps} | {base:.4g} | {best} "
                f"| {steps / best:.0f} | {recommended_period(n, steps, identical)} |"
            )
        exponent = slope(lengths, rounds)
        theory = 0.5 if identical else 0.75
        fits.append(f"| {'identical' if identical else 'non-identical'} | {exponent:.2f} | {theory} |")
        case = "identical" if identical else "non-identical"
        note = (
            f" The search reached its cap (I = T / 4) for {capped} of {len(lengths)} lengths: on this problem the "
            "period is not what limits the measure, and the corollary's I is a sufficient, worst-case bound."
            if capped
            else ""
        )
        verdicts.append(f"- {case} data: rounds grow as T^{exponent:.2f}: {verdict(exponent, theory, 0.15)}.{note}")
        ax.loglog(
            lengths, rounds, "o-", label=f"{'identical' if identical else 'non-identical'} (slope {exponent:.2f})"
        )
    ax.set(xlabel="iterations T", ylabel="rounds needed (T / largest I)")
    save(fig, [ax], fig_dir / "theory_rounds.png", plt)
    lines += [
        "",
        "| data | fitted exponent of rounds in T | theory |",
        "|---|---:|---:|",
        *fits,
        "",
        "![rounds](figures/theory_rounds.png)",
        "",
        *verdicts,
        "",
    ]
    return lines


def momentum_handling(seeds: int, steps: int, n: int) -> list[str]:
    periods = [1, 2, 4, 8, 16, 32]
    rules = ["params_and_momentum", "params_clear_momentum", "params_only"]
    lines = [
        "## 3. Momentum handling at sync",
        "",
        f"N = {n}, T = {steps}, non-identical data; the measure for each sync rule and period.",
        "",
        "| period | " + " | ".join(rules) + " |",
        "|---:|" + "---:|" * len(rules),
    ]
    wins = 0
    for period in periods:
        values = [measures(n, steps, False, seeds, period=period, sync=rule)[0] for rule in rules]
        wins += values[0].mean() <= 1.01 * min(v.mean() for v in values)
        lines.append(f"| {period} | " + " | ".join(fmt(v) for v in values) + " |")
    held = "held" if wins == len(periods) else f"held at {wins} of {len(periods)} periods"
    return [
        *lines,
        "",
        f"- Averaging the momentum buffers (Algorithm 1) is as good as or better than (within 1%) clearing or keeping "
        f"them at every period: **{held}**. At period 1 keeping the local buffers gives exactly Algorithm 1's "
        "node average (the averaged buffers follow the same recursion), so only clearing differs there.",
        "",
    ]


def decentralized(seeds: int, steps: int, sizes: list[int]) -> list[str]:
    lines = [
        "## 4. Decentralized momentum SGD vs spectral gap",
        "",
        f"T = {steps}, non-identical data, sync = gossip (mixing every step).",
        "",
        "| N | topology | rho | spectral gap | measure |",
        "|---:|---|---:|---:|---:|",
    ]
    verdicts = []
    for n in sizes:
        by_rho = []
        for name in ("ring", "torus", "exponential", "complete"):
            topo = make_topology(name, n)
            values = measures(n, steps, False, seeds, sync="gossip", topology=name)[0]
            by_rho.append((topo.rho, values.mean()))
            lines.append(f"| {n} | {topo.name} | {topo.rho:.4f} | {topo.spectral_gap:.4f} | {fmt(values)} |")
        by_rho.sort()
        worst, best = by_rho[-1][1], by_rho[0][1]
        monotone = all(a[1] <= b[1] * 1.0005 for a, b in itertools.pairwise(by_rho))
        verdicts.append(
            f"- N = {n}: the largest rho (smallest spectral gap) gives a measure {100 * (worst / best - 1):.2f}% "
            f"above the complete graph's; ordered by rho: {'yes' if monotone else 'no'}. The theory's rho term is "
            "of higher order in gamma, so at this learning rate the gap matters "
            + (
                "little: **prediction held in direction, small in size**."
                if monotone
                else "little and is within noise."
            )
        )
    return [*lines, "", *verdicts, ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prsgd.theory_experiments", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs")
    parser.add_argument("--config", help="a TOML plan of sizes (configs/theory/full.toml is the default plan)")
    parser.add_argument("--seeds", type=int, help="override the plan's number of seeds")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (configs/theory/quick.toml; smoke test)")
    args = parser.parse_args(argv)
    plan = load_plan(args.config) if args.config else (QUICK if args.quick else Plan())
    if args.seeds is not None:
        plan = dataclasses.replace(plan, seeds=check_int("--seeds", args.seeds, 1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    doc = [
        "# Theory made measurable",
        "",
        "Made by `python -m prsgd.theory_experiments` "
        f"({plan.seeds} seeds) on `prsgd.problems.NonConvexRegression` (d = 20, m = 40, lam = 1: non-convex, "
        "L = lambda_max(A^T A / m) + 2 lam, exact gradient-noise variance sigma^2 and heterogeneity zeta^2). "
        "The algorithm is prsgd's own `run_step` on stacked workers.",
        "",
    ]
    doc += linear_speedup(plan.seeds, plan.steps, list(plan.workers), plt, fig_dir)
    doc += communication(plan.seeds, list(plan.lengths), plan.communication_workers, plt, fig_dir)
    doc += momentum_handling(plan.seeds, plan.steps, plan.momentum_workers)
    doc += decentralized(plan.seeds, plan.steps, list(plan.decentralized_workers))
    (out / "theory.md").write_text("\n".join(doc) + "\n")
    print("\n".join(doc))


if __name__ == "__main__":
    main()
