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
from pathlib import Path

import numpy as np

from prsgd.problems import NonConvexRegression, run
from prsgd.theory import recommended_period
from prsgd.topology import make_topology

BETA = 0.5
LR_SCALE = 0.3


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
    summary = []
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
    fits = []
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for identical in (True, False):
        rounds = []
        for steps in lengths:
            base = measures(n, steps, identical, seeds, period=1)[0].mean()
            best = 1
            for period in grid[1:]:
                if period > steps // 4:
                    break
                if measures(n, steps, identical, seeds, period=period)[0].mean() > 1.1 * base:
                    break  # the measure grows with I: the first period that fails ends the search
                best = period
            rounds.append(steps / best)
            lines.append(
                f"| {'identical' if identical else 'non-identical'} | {steps} | {base:.4g} | {best} "
                f"| {steps / best:.0f} | {recommended_period(n, steps, identical)} |"
            )
        exponent = slope(lengths, rounds)
        theory = 0.5 if identical else 0.75
        fits.append(f"| {'identical' if identical else 'non-identical'} | {exponent:.2f} | {theory} |")
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
    for period in periods:
        cells = [fmt(measures(n, steps, False, seeds, period=period, sync=rule)[0]) for rule in rules]
        lines.append(f"| {period} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def decentralized(seeds: int, steps: int, sizes: list[int]) -> list[str]:
    lines = [
        "## 4. Decentralized momentum SGD vs spectral gap",
        "",
        f"T = {steps}, non-identical data, sync = gossip (mixing every step).",
        "",
        "| N | topology | rho | spectral gap | measure |",
        "|---:|---|---:|---:|---:|",
    ]
    for n in sizes:
        for name in ("ring", "torus", "exponential", "complete"):
            topo = make_topology(name, n)
            values = measures(n, steps, False, seeds, sync="gossip", topology=name)[0]
            lines.append(f"| {n} | {topo.name} | {topo.rho:.4f} | {topo.spectral_gap:.4f} | {fmt(values)} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prsgd.theory_experiments", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for the smoke test)")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    if args.quick:
        steps, workers, lengths, n2 = 200, [1, 2, 4], [100, 200], 2
    else:
        steps, workers, lengths, n2 = 4000, [1, 2, 4, 8, 16, 32, 64], [1000, 2000, 4000, 8000, 16000], 4
    doc = [
        "# Theory made measurable",
        "",
        "Made by `python -m prsgd.theory_experiments` "
        f"({args.seeds} seeds) on `prsgd.problems.NonConvexRegression` (d = 20, m = 40, lam = 1: non-convex, "
        "L = lambda_max(A^T A / m) + 2 lam, exact gradient-noise variance sigma^2 and heterogeneity zeta^2). "
        "The algorithm is prsgd's own `run_step` on stacked workers.",
        "",
    ]
    doc += linear_speedup(args.seeds, steps, workers, plt, fig_dir)
    doc += communication(args.seeds, lengths, n2, plt, fig_dir)
    doc += momentum_handling(args.seeds, steps, 8 if not args.quick else 2)
    doc += decentralized(args.seeds, steps, [16, 64] if not args.quick else [4])
    (out / "theory.md").write_text("\n".join(doc) + "\n")
    print("\n".join(doc))


if __name__ == "__main__":
    main()
