"""``prsgd plot RUN_DIR...``: the paper's figure forms from finished runs, and a table of final metrics.

    prsgd plot runs/periods [runs/other ...] [--out runs/periods/figure] [--x joint_epoch,wall_clock,comm_rounds,bytes]

Draws training loss and test accuracy (mean over seeds, min-max band) against each x axis, as PNG and PDF, and
writes the markdown table beside them. Runs with rounds add the workers' drift measured before each round: the
consensus distance (1/N) sum_i ||x_i - x_bar||^2 and the optimizer state's spread (log scale). A training run's
smoothness, noise and heterogeneity constants are unknown, so no bound is drawn next to them; on problems whose
constants are known, ``benchmarks/drift.py`` draws the measured distance next to its prediction. The legend names
what differs between the runs' configs (the swept value), the title what they share. ``--x bytes`` shows the payload
each worker sent: Algorithm 1 sends parameters and momentum, twice what parameter-only averaging sends per round.
"""

from __future__ import annotations

from pathlib import Path

from prsgd.experiments.report import X_AXES, discover, group_configs, plot_groups, plotted_metrics, summary_table
from prsgd.training import command


def main(argv: list[str] | None = None) -> None:
    parser = command.parser("prsgd plot", __doc__)
    parser.add_argument("runs", nargs="+", help="run folders (a run, a folder of seeds, or a sweep folder)")
    parser.add_argument("--out", help="figure path without suffix (default: FIRST_RUN_DIR/figure)")
    parser.add_argument(
        "--x", default="joint_epoch,wall_clock,comm_rounds", help=f"comma-separated x axes from: {', '.join(X_AXES)}"
    )
    args = parser.parse_args(argv)
    groups = discover(args.runs)
    out = Path(args.out) if args.out else Path(args.runs[0]) / "figure"
    x_axes = [x for x in args.x.split(",") if x]
    written = plot_groups(groups, out, x_axes=x_axes, metrics=plotted_metrics(groups), configs=group_configs(args.runs))
    table = summary_table(groups)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print("\n" + "\n".join(str(p) for p in [*written, out.with_suffix(".md")]))
