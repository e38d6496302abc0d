"""``prsgd plot RUN_DIR...``: the paper's figure forms from finished runs, and a table of final metrics.

    prsgd plot runs/periods [runs/other ...] [--out runs/periods/figure] [--x joint_epoch,wall_clock,comm_rounds]

Draws training loss and test accuracy (mean over seeds, min-max band) against each x axis, as PNG and PDF, and
writes the markdown table beside them.
"""

from __future__ import annotations

from pathlib import Path

from prsgd import command
from prsgd.report import X_AXES, discover, plot_groups, summary_table


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
    written = plot_groups(groups, out, x_axes=[x for x in args.x.split(",") if x])
    table = summary_table(groups)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print("\n" + "\n".join(str(p) for p in [*written, out.with_suffix(".md")]))


if __name__ == "__main__":
    main()
