"""Communication rounds needed against T where heterogeneity acts, in the corollaries' regime (issue 31).

    python -m prsgd.experiments.rounds [--seeds 3]      # run, keep the raw runs, rewrite the section
    python -m prsgd.experiments.rounds --check          # the section against its raw runs

N = 4 workers of Algorithm 1 (Polyak momentum 0.5) on :class:`~prsgd.experiments.problems.NonConvexRegression` with
``heterogeneity="curvature"`` and row-sampled gradients (sample-dependent Hessians: local drift costs something
even with identical data), zeta^2 = 0 (identical) or 4 (non-identical, the same noise model). For each length T
the learning rate is the corollaries' gamma = 0.3 sqrt(N / T) (capped at (1 - beta)^2 / L), and the search finds,
per seed, the largest period I on a fixed grid (up to T / 4) whose measure stays within 5%, 10% or 20% of period
1's; the rounds needed are T / I. The corollaries' rates are sufficient ones: rounds ~ T^1/2 (identical) and
T^3/4 (non-identical) keep the O(1/sqrt(NT)) rate, so the rounds actually needed may grow more slowly; their own
period I must keep the measure within a constant factor of period 1's (the sufficiency check). Exponents are fitted
per seed (log-log over T); their 95% interval is the mean +- t sd / sqrt(seeds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prsgd.experiments import rendered
from prsgd.experiments.rendered import Record, RenderedSection
from prsgd.experiments.report import mean_sd
from prsgd.experiments.theory_measures import THRESHOLDS, lr_for, problem_for, search_periods, slope

WORKERS = 4
LENGTHS = (1000, 2000, 4000, 8000, 16000)
THEORY = {"identical": 0.5, "non-identical": 0.75}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Student's t, 97.5% quantile, by degrees of freedom (1.96 beyond)."""


def collect(seeds: int, longest: int) -> list[Record]:
    """Every (data, T, seed) search, the lengths doubling from 1000 up to ``longest``."""
    lengths = [t for t in LENGTHS if t <= longest] or [longest]
    records = []
    for case, identical in (("identical", True), ("non-identical", False)):
        found = search_periods(WORKERS, lengths, identical, seeds, "rows", heterogeneity="curvature")
        for i, steps in enumerate(lengths):
            for seed in range(seeds):
                problem = problem_for(WORKERS, identical, seed, "rows", "curvature")
                records.append({
                    "case": case, "steps": steps, "seed": seed, "workers": WORKERS, "zeta2": problem.zeta2,
                    "lr": lr_for(WORKERS, steps, problem), "base": float(found.base[i, seed]),
                    "largest": [int(found.largest[k, i, seed]) for k in range(len(THRESHOLDS))],
                    "reached_cap": [bool(found.capped[k, i, seed]) for k in range(len(THRESHOLDS))],
                    "corollary_period": found.periods[i],
                    "corollary_ratio": float(found.corollary[i, seed] / found.base[i, seed]),
                })  # fmt: skip
    return records


def _interval(values: np.ndarray) -> str:
    if len(values) < 2:
        return "-"
    half = T_975.get(len(values) - 1, 1.96) * values.std(ddof=1) / math.sqrt(len(values))
    return f"[{values.mean() - half:.2f}, {values.mean() + half:.2f}]"


def render(records: Sequence[Record]) -> tuple[list[str], dict[str, Any]]:
    seeds = sorted({r["seed"] for r in records})
    lengths = sorted({r["steps"] for r in records})
    lines = [
        "## 7. Communication rounds needed where heterogeneity acts",
        "",
        f'N = {WORKERS}, `NonConvexRegression(heterogeneity="curvature", noise="rows")`, zeta^2 = 0 (identical) '
        f"or {max(r['zeta2'] for r in records):g} (non-identical), Polyak momentum 0.5, gamma = 0.3 sqrt(N / T) "
        f"(capped at (1 - beta)^2 / L), T = {lengths[0]} to {lengths[-1]}; per seed, the largest I on the grid "
        "(up to T / 4) whose measure stays within 5%, 10% or 20% of period 1's, and the rounds T / I. "
        f"{len(seeds)} seeds; `python -m prsgd.experiments.rounds`, raw runs in `docs/theory/rounds_runs.jsonl`.",
        "",
        "| data | T | gamma | measure at I = 1 | largest I within 5% / 10% / 20% (median over seeds) | corollary's I "
        "| measure at corollary's I / at I = 1 |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    curves: dict[str, Any] = {"lengths": lengths}
    verdicts = []
    for case in THEORY:
        mine = [r for r in records if r["case"] == case]
        for steps in lengths:
            at = sorted((r for r in mine if r["steps"] == steps), key=lambda r: r["seed"])
            cells = []
            for k in range(len(THRESHOLDS)):
                median = int(np.median([r["largest"][k] for r in at]))
                cells.append(f"{median}{'*' if any(r['reached_cap'][k] for r in at) else ''}")
            ratio = np.array([r["corollary_ratio"] for r in at])
            lines.append(
                f"| {case} | {steps} | {at[0]['lr']:.4f} | {mean_sd([r['base'] for r in at], '.4g')} "
                f"| {' / '.join(cells)} | {at[0]['corollary_period']} | {mean_sd(ratio, '.3f')} |"
            )
        worst = max(np.mean([r["corollary_ratio"] for r in mine if r["steps"] == t]) for t in lengths)
        verdicts.append(
            f"- {case}: the corollary's I keeps the measure within 10% of period 1's: "
            f"{'**held**' if worst <= 1.1 else '**not held**'} (largest mean ratio {worst:.3f})."
        )
    lines += [
        "",
        "`*`: the search reached I = T / 4 for at least one seed (the period did not limit the measure there).",
        "",
        "| data | threshold | exponent of rounds in T, each seed | mean +- sd | 95% interval | searches capped "
        "| corollary's rate |",
        "|---|---:|---|---:|---|---:|---:|",
    ]
    for case, theory in THEORY.items():
        mine = [r for r in records if r["case"] == case]
        for k, threshold in enumerate(THRESHOLDS):
            rounds = np.array([[_rounds(mine, t, s, k) for t in lengths] for s in seeds])
            fits = np.array([slope(lengths, row) for row in rounds])
            capped = sum(r["reached_cap"][k] for r in mine)
            curves[(case, threshold)] = rounds.mean(0).tolist()
            lines.append(
                f"| {case} | {threshold:.0%} | {', '.join(f'{v:.2f}' for v in fits)} | {mean_sd(fits, '.2f')} "
                f"| {_interval(fits)} | {capped} of {len(mine)} | {theory} |"
            )
            if threshold == 0.10:
                verdicts.append(_rate_verdict(case, theory, fits, capped))
    lines += ["", "![rounds](figures/theory_rounds_heterogeneous.png)", "", *verdicts, ""]
    return lines, curves


def _rate_verdict(case: str, theory: float, fits: np.ndarray, capped: int) -> str:
    """Held when the mean exponent is at most the corollary's; says when the 95% interval reaches above it."""
    verdict = "**held**" if fits.mean() <= theory else "**not held**"
    if len(fits) > 1 and fits.mean() <= theory:
        half = T_975.get(len(fits) - 1, 1.96) * fits.std(ddof=1) / math.sqrt(len(fits))
        if fits.mean() + half > theory:
            verdict += " in the mean, though the 95% interval reaches above it"
    notes = f" ({capped} searches reached I = T / 4)" if capped else ""
    return (
        f"- {case}, 10%: rounds needed grow as T^({mean_sd(fits, '.2f')}), 95% interval {_interval(fits)}; the "
        f"corollary bounds them by T^{theory}: {verdict}{notes}."
    )


def _rounds(records: Sequence[Record], steps: int, seed: int, k: int) -> float:
    (found,) = [r for r in records if r["steps"] == steps and r["seed"] == seed]
    return steps / found["largest"][k]


def draw(curves: dict[str, Any], path: Path) -> None:
    fig, ax = rendered.log_log_axes()
    lengths = curves["lengths"]
    for case, theory in THEORY.items():
        rounds = curves[(case, 0.10)]
        (line,) = ax.plot(lengths, rounds, "o-", label=f"{case}, within 10%")
        scale = rounds[0] / lengths[0] ** theory
        ax.plot(lengths, [scale * t**theory for t in lengths], "--", color=line.get_color(), label=f"T^{theory}")
    rendered.save_log_log(fig, ax, path, "iterations T", "rounds needed T / I")


SECTION = RenderedSection("rounds", "python -m prsgd.experiments.rounds", "docs/theory/rounds_runs.jsonl", render)


def main(argv: list[str] | None = None) -> None:
    rendered.main(SECTION, __doc__, collect, draw, "theory_rounds_heterogeneous.png", LENGTHS[-1], argv)


if __name__ == "__main__":
    main()
