"""The paper's theory, measured on :class:`prsgd.experiments.problems.NonConvexRegression` (every constant known).

    python -m prsgd.experiments.theory_experiments [--config configs/theory/full.toml] [--out docs] [--seeds 3]

Writes ``OUT/theory.md`` and its figures ``OUT/figures/theory_*.png``:
1. linear speedup, where the corollary applies: eps is one worker's measure (1/T) sum_t ||grad f(x_bar^t)||^2 at a
   long run T1, and for each N the run length T_eps at which N workers reach it (gamma and I set for that T, as the
   corollaries do); the theory's rate O(1/sqrt(NT)) gives T_eps = T1 / N, a slope of -1 in N, and efficiency
   T1 / (N T_eps) = 1. A point whose gamma = c sqrt(N/T) hits the step-size cap (1 - beta)^2 / L lies outside the
   corollary's conditions and is flagged. The measure at fixed T against N (slope -1/2) is kept;
2. communication complexity: the largest period whose measure stays within 5%, 10% or 20% of period 1's, per seed,
   and the exponent of the rounds T / I in T (the corollaries' sufficient rates: T^1/2 identical, T^3/4
   non-identical), plus the sufficiency check: the measure at the corollary's I against period 1's as T grows.
   Identical data use row-sampled gradients (sample-dependent Hessians), so that local drift costs something;
3. momentum handling at sync: params_and_momentum vs params_clear_momentum vs params_only across periods;
4. decentralized: the measure against the topology's spectral gap at fixed N.
Numbers are means over seeds with their standard deviation (or min-max); verdicts say what was measured: held, not
held, or not testable on this problem (and why).
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import torch

from prsgd.algorithm.theory import recommended_period
from prsgd.algorithm.topology import make_topology
from prsgd.errors import check_int
from prsgd.experiments import heterogeneity, rounds, scaling
from prsgd.experiments.report import mean_sd
from prsgd.experiments.theory_measures import (
    BETA,
    COMMUNICATION_GRID,
    LR_SCALE,
    QUICK,
    SPEEDUP_CASES,
    THRESHOLDS,
    Plan,
    case_name,
    fmt,
    held,
    is_capped,
    load_plan,
    measures,
    pm,
    problem_for,
    save,
    search_periods,
    slope,
    speedup,
)
from prsgd.training import command


def linear_speedup(plan: Plan, plt, fig_dir: Path) -> list[str]:
    seeds, t1, workers = plan.seeds, plan.speedup_steps, list(plan.speedup_workers)
    lines = [
        "## 1. Linear speedup",
        "",
        f"beta = {BETA}, gamma = {LR_SCALE} sqrt(N/T) (capped at (1-beta)^2/L; a capped point is outside the "
        "corollary's conditions and is marked *capped*), period from the corollaries "
        "(`prsgd.algorithm.theory.recommended_period`), sigma = 2, zeta = 0 (identical) or 2 (non-identical). "
        f"eps is one worker's measure at T1 = {t1} (per seed); T_eps is the run length at which N workers reach it "
        "(bracketed by factors of sqrt 2 from T1/N and interpolated log-log; gamma and I set for each length). "
        f"Theory: T_eps = T1 / N, so slope -1 and efficiency T1 / (N T_eps) = 1. {seeds} seeds: mean +- sd.",
        "",
        "| case | N | T_eps | efficiency T1/(N T_eps) | capped |",
        "|---|---:|---:|---:|---|",
    ]
    results = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for nesterov, identical in SPEEDUP_CASES[: plan.speedup_cases]:
        result = speedup(seeds, t1, workers, nesterov, identical)
        results.append(((nesterov, identical), result))
        efficiency = result.efficiency()
        for k, n in enumerate(workers):
            capped = int(result.capped[:, k].sum())
            t_eps = mean_sd(result.steps[:, k], ".0f")
            lines.append(
                f"| {case_name(nesterov, identical)} | {n} | {t_eps} | {pm(efficiency[:, k])} "
                f"| {f'*capped* ({capped} of {seeds} seeds)' if capped else 'no'} |"
            )
        mean_steps = result.steps.mean(0)
        sd = result.steps.std(0, ddof=1) if seeds > 1 else np.zeros(len(workers))
        axes[1].errorbar(workers, mean_steps, yerr=sd, fmt="o-", capsize=3, label=case_name(nesterov, identical))
    axes[1].loglog(workers, [t1 / n for n in workers], "k--", lw=1, label="T1 / N (theory)")
    axes[1].set(xlabel="workers N", ylabel="iterations T to reach eps", title=f"iterations to eps (T1 = {t1})")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")

    small = max([n for n in workers if n <= 8], default=workers[-1])
    lines += [
        "",
        "| case | slope of T_eps vs N, each seed | mean +- sd | N <= 8 | theory | verdict |",
        "|---|---|---:|---:|---:|---|",
    ]
    verdicts = []
    for (nesterov, identical), result in results:
        every, few = result.slopes(), result.slopes(small)
        ok = abs(every.mean() + 1) <= 0.15
        any_capped = bool(result.capped.any())
        text = held(ok, f"slope {pm(every)}", "-1 within 0.15")
        if any_capped:
            text += "; some points capped (outside the corollary's conditions)"
        lines.append(
            f"| {case_name(nesterov, identical)} | {', '.join(f'{v:.2f}' for v in every)} | {pm(every)} "
            f"| {pm(few)} | -1 | {text} |"
        )
        verdicts.append(f"- {case_name(nesterov, identical)}: iterations to eps vs N: {text}.")
    by_case = dict(results)
    for nesterov in (False, True):
        same, other = by_case.get((nesterov, True)), by_case.get((nesterov, False))
        if same is not None and other is not None:
            gap = float(np.max(np.abs(other.steps / same.steps - 1)))
            verdicts.append(
                f"- {'Nesterov' if nesterov else 'Polyak'}: non-identical vs identical data, largest relative "
                f"difference in T_eps {100 * gap:.2f}%"
                + (
                    ". On this problem the heterogeneity is a constant shift of each worker's gradient, which "
                    "cancels in the node average of the quadratic part, so non-identical data behave as identical "
                    "ones here (even with their shorter periods): **not testable on this problem** as a separate "
                    "case; section 6 measures it on workers that differ in curvature."
                    if gap < 0.01
                    else "."
                )
            )

    lines += [
        "",
        f"The measure at fixed T = {plan.steps} against N (the form of the previous version of this page; the "
        "theory gives slope -1/2 while gamma is uncapped):",
        "",
        "| case | N | period | measure (mean, min-max over seeds) | capped |",
        "|---|---:|---:|---:|---|",
    ]
    fixed_slopes = []
    for nesterov, identical in SPEEDUP_CASES[: plan.speedup_cases]:
        means, per_seed = [], []
        for n in plan.workers:
            period = recommended_period(n, plan.steps, identical)
            values = measures(n, plan.steps, identical, seeds, nesterov=nesterov, period=period)
            means.append(values.mean())
            per_seed.append(values)
            capped = is_capped(n, plan.steps, problem_for(n, identical, 0))
            flag = "*capped*" if capped else "no"
            lines.append(f"| {case_name(nesterov, identical)} | {n} | {period} | {fmt(values)} | {flag} |")
        seed_slopes = np.array([slope(plan.workers, [v[s] for v in per_seed]) for s in range(seeds)])
        fixed_slopes.append((case_name(nesterov, identical), seed_slopes))
        axes[0].loglog(plan.workers, means, "o-", label=case_name(nesterov, identical))
    axes[0].set(xlabel="workers N", ylabel="(1/T) sum ||grad f(x_bar)||^2", title=f"measure at T = {plan.steps}")
    save(fig, axes, fig_dir / "theory_speedup.png", plt)
    lines += [
        "",
        *[
            f"- {name}: measure at fixed T vs N: {held(abs(v.mean() + 0.5) <= 0.1, f'slope {pm(v)}', '-1/2 +- 0.1')}."
            for name, v in fixed_slopes
        ],
        *verdicts,
        "",
        "![speedup](figures/theory_speedup.png)",
        "",
    ]
    return lines


def communication(plan: Plan, plt, fig_dir: Path) -> list[str]:
    n, lengths, seeds = plan.communication_workers, list(plan.lengths), plan.seeds
    rows_problem = problem_for(n, True, 0, "rows")
    x0 = rows_problem.x0.repeat(n, 1)
    x_ls = torch.linalg.lstsq(rows_problem.A, rows_problem.b.unsqueeze(1)).solution.T.repeat(n, 1)
    lines = [
        "## 2. Communication complexity",
        "",
        f"N = {n}; for each T and seed, the largest period I <= T / 4 in the grid {COMMUNICATION_GRID[:8]}... "
        "(searched upwards, stopping at the first failure) whose measure stays within 5%, 10% or 20% of period 1's, "
        "and the rounds T / I; the exponent of rounds in T is fitted per seed. The corollaries' rates "
        "(rounds ~ T^1/2 identical, T^3/4 non-identical) are sufficient: at their I the measure must stay within a "
        "constant factor of period 1's as T grows (sufficiency check), and the rounds actually needed may grow "
        "more slowly.",
        "",
        "- Identical data: each worker's gradient is that of one row of the least-squares part drawn uniformly "
        f'(`noise="rows"`), so Hessians differ between samples and workers drift apart between rounds; '
        f"L = {rows_problem.L:.3f}, zeta^2 = 0, and the noise variance depends on x: sigma^2(x^0) = "
        f"{float(rows_problem.noise_variance(x0)[0]):.0f} (seed 0), "
        f"{float(rows_problem.noise_variance(x_ls)[0]):.1f} at the least-squares solution. With "
        "additive noise (the other problem) every period gives the same average on the quadratic part, so "
        "identical data could not show the period's cost there.",
        "- Non-identical data: additive noise sigma^2 = 4, zeta^2 = 4 (the problem of section 1).",
        "",
        "| data | T | measure at I = 1 | largest I within 5% / 10% / 20% (median over seeds) | corollary's I | "
        "measure at corollary's I / at I = 1 |",
        "|---|---:|---:|---|---:|---:|",
    ]
    fits, verdicts = [], []
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for identical, noise in ((True, "rows"), (False, "additive")):
        case = "identical" if identical else "non-identical"
        result = search_periods(n, lengths, identical, seeds, noise)
        ratios = result.corollary / result.base
        for i, steps in enumerate(lengths):
            largest = " / ".join(
                f"{int(np.median(result.largest[k, i]))}{'*' if result.capped[k, i].any() else ''}"
                for k in range(len(THRESHOLDS))
            )
            lines.append(
                f"| {case} | {steps} | {result.base[i].mean():.4g} | {largest} | {result.periods[i]} "
                f"| {mean_sd(ratios[i], '.3f')} |"
            )
        theory = 0.5 if identical else 0.75
        exponents = {}
        for k, threshold in enumerate(THRESHOLDS):
            per_seed = np.array([slope(lengths, np.array(lengths) / result.largest[k, :, s]) for s in range(seeds)])
            exponents[threshold] = per_seed
            fits.append(
                f"| {case} | {threshold:.0%} | {', '.join(f'{v:.2f}' for v in per_seed)} | {pm(per_seed)} "
                f"| {int(result.capped[k].sum())} of {result.capped[k].size} | {theory} |"
            )
            if threshold == 0.10:
                median = np.median(result.largest[k], axis=1)
                ax.loglog(lengths, np.array(lengths) / median, "o-", label=f"{case}, 10%")
        worst = float(ratios.mean(1).max())
        sufficient = held(
            worst <= 1.1, f"largest mean ratio {worst:.3f} over T = {lengths[0]}..{lengths[-1]}", "<= 1.1"
        )
        ten, capped_ten = exponents[0.10], int(result.capped[1].sum())
        spread = ", ".join(f"{t:.0%}: {pm(v)}" for t, v in exponents.items())
        if capped_ten == result.capped[1].size:
            rate = (
                "**not testable on this problem**: at the 10% threshold every search reached I = T / 4, so the "
                "period never limits the measure here"
            )
        else:
            direction = "fall" if ten.mean() < 0 else "grow"
            capped_note = (
                f"; {capped_ten} of {result.capped[1].size} searches reached I = T / 4, where the period did not "
                "limit the measure at all"
                if capped_ten
                else ""
            )
            rate = (
                f"the rounds needed {direction} as T^({pm(ten)}) at 10% ({spread}){capped_note}. The corollary "
                f"bounds them by T^{theory}: "
                + (
                    "**held**" + (" (the bound is far from tight here)" if ten.mean() < theory - 0.3 else "")
                    if ten.mean() <= theory + 0.15
                    else "**not held** (faster growth than the bound by more than 0.15)"
                )
            )
        verdicts.append(f"- {case} data: sufficiency of the corollary's I: {sufficient}. Rate: {rate}.")
    ax.set(xlabel="iterations T", ylabel="rounds needed (T / largest I, 10%)")
    save(fig, [ax], fig_dir / "theory_rounds.png", plt)
    lines += [
        "",
        "`*`: the search reached I = T / 4 for at least one seed (the period did not limit the measure there).",
        "",
        "| data | threshold | exponent of rounds in T, each seed | mean +- sd | searches capped | theory |",
        "|---|---:|---|---:|---:|---:|",
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
        values = [measures(n, steps, False, seeds, period=period, sync=rule) for rule in rules]
        wins += values[0].mean() <= 1.01 * min(v.mean() for v in values)
        lines.append(f"| {period} | " + " | ".join(fmt(v) for v in values) + " |")
    outcome = "**held**" if wins == len(periods) else f"**not held** (held at {wins} of {len(periods)} periods)"
    return [
        *lines,
        "",
        f"- Averaging the momentum buffers (Algorithm 1) is as good as or better than (within 1%) clearing or keeping "
        f"them at every period: {outcome}. At period 1 keeping the local buffers gives exactly Algorithm 1's "
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
            values = measures(n, steps, False, seeds, sync="gossip", topology=name)
            by_rho.append((topo.rho, values.mean()))
            lines.append(f"| {n} | {topo.name} | {topo.rho:.4f} | {topo.spectral_gap:.4f} | {fmt(values)} |")
        by_rho.sort()
        worst, best = by_rho[-1][1], by_rho[0][1]
        monotone = all(a[1] <= b[1] * 1.0005 for a, b in itertools.pairwise(by_rho))
        verdicts.append(
            f"- N = {n}: the largest rho (smallest spectral gap) gives a measure {100 * (worst / best - 1):.2f}% "
            f"above the complete graph's; ordered by rho: {'yes' if monotone else 'no'}. The theory's rho term is "
            "of higher order in gamma, so at this learning rate the gap matters "
            + ("little: **held** in direction, small in size." if monotone else "little: **not held** (within noise).")
        )
    return [*lines, "", *verdicts, ""]


def main(argv: list[str] | None = None) -> None:
    parser = command.parser("python -m prsgd.experiments.theory_experiments", __doc__)
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
        "Made by `python -m prsgd.experiments.theory_experiments` "
        f"({plan.seeds} seeds) on `prsgd.experiments.problems.NonConvexRegression` "
        "(d = 20, m = 40, lam = 1: non-convex, "
        "L = lambda_max(A^T A / m) + 2 lam, exact gradient-noise variance sigma^2 and heterogeneity zeta^2). "
        "The algorithm is prsgd's own `PeriodicSync` on stacked workers.",
        "",
    ]
    doc += linear_speedup(plan, plt, fig_dir)
    doc += communication(plan, plt, fig_dir)
    doc += momentum_handling(plan.seeds, plan.steps, plan.momentum_workers)
    doc += decentralized(plan.seeds, plan.steps, list(plan.decentralized_workers))
    page = out / "theory.md"
    earlier = page.read_text() if page.is_file() else ""
    text = "\n".join(doc) + "\n"
    for rendered in (heterogeneity.SECTION, scaling.SECTION, rounds.SECTION):  # 5-7: rendered from their raw runs
        text = rendered.carried(earlier, text)
    page.write_text(text)
    print("\n".join(doc))


if __name__ == "__main__":
    main()
