"""What the paper's corollaries prescribe for N workers and T steps: learning rate, period and rounds.

    prsgd theory --workers 16 --steps 100000 [--non-identical] [--momentum 0.9 --smoothness 2.0]

The formulas are :mod:`prsgd.algorithm.theory`'s.
"""

from __future__ import annotations

from prsgd.algorithm.theory import recommend
from prsgd.training import command


def main(argv: list[str] | None = None) -> None:
    parser = command.parser("prsgd theory", __doc__)
    parser.add_argument("--workers", type=int, required=True, help="N")
    parser.add_argument("--steps", type=int, required=True, help="T, iterations of every worker")
    parser.add_argument("--non-identical", action="store_true", help="workers' data differ (zeta > 0)")
    parser.add_argument("--momentum", type=float, default=0.0, help="beta (enters the learning-rate cap)")
    parser.add_argument("--smoothness", type=float, default=None, help="L, to cap gamma at (1 - beta)^2 / (c L)")
    parser.add_argument("--lr-scale", type=float, default=1.0)
    parser.add_argument("--period-scale", type=float, default=1.0)
    parser.add_argument("--c", type=float, default=1.0)
    args = parser.parse_args(argv)
    r = recommend(
        args.workers,
        args.steps,
        not args.non_identical,
        lr_scale=args.lr_scale,
        period_scale=args.period_scale,
        momentum=args.momentum,
        smoothness=args.smoothness,
        c=args.c,
    )
    case = "identical" if r.identical else "non-identical"
    print(f"N = {r.workers} workers, T = {r.steps} iterations, {case} data")
    print(f"learning rate gamma = {r.lr:.6g}")
    print(f"period I = {r.period}")
    print(
        f"communication rounds = {r.rounds} (vs {r.steps} at period 1: {r.rounds_saved} saved, "
        f"{r.steps / r.rounds:.1f}x fewer)"
    )
