"""The README's demo: Algorithm 1 against the paper's baselines on scikit-learn's digits, 8 simulated workers.

    python -m prsgd.demo [--out runs/demo] [--epochs 30] [--workers 8] [--period 8]

Runs parallel mini-batch momentum SGD (gradients all-reduced every step) and, with the same period I, PR-SGD-
Momentum (params_and_momentum), model averaging with cleared momentum, and parameter-only averaging; prints a
markdown table and writes a plot of training loss and test accuracy vs joint epochs and vs communication rounds.
``--topology ring,torus,complete`` adds decentralized momentum SGD (Algorithm 2) on those graphs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prsgd.config import TrainConfig
from prsgd.report import plot_runs, summary_table
from prsgd.train import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prsgd.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--epochs", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--period", type=int, default=8)
    parser.add_argument(
        "--topology",
        default="",
        help="comma-separated graphs (ring,torus,complete,...) to add decentralized momentum SGD (gossip) runs",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    base = TrainConfig(
        dataset="digits",
        model="mlp",
        workers=args.workers,
        epochs=args.epochs,
        lr=0.05,
        momentum=0.9,
        batch_size=16,
        evals=30,
    )
    variants = {
        "gradients (every step)": base.replace(sync="gradients", period=1),
        f"params_and_momentum (I={args.period})": base.replace(sync="params_and_momentum", period=args.period),
        f"params_clear_momentum (I={args.period})": base.replace(sync="params_clear_momentum", period=args.period),
        f"params_only (I={args.period})": base.replace(sync="params_only", period=args.period),
    }
    for graph in filter(None, args.topology.split(",")):
        variants[f"gossip ({graph})"] = base.replace(sync="gossip", period=1, topology=graph)
    runs = {}
    for name, config in variants.items():
        folder = config.sync + (f"_{config.topology}" if config.topology else "")
        runs[name] = run(config.replace(out=str(out / folder)))
    table = summary_table(runs)
    plot = plot_runs(runs, out / "demo.png", x_axes=("joint_epoch", "comm_rounds"))
    (out / "summary.md").write_text(table + "\n")
    print(f"\n{args.workers} simulated workers, digits MLP, {args.epochs:g} joint epochs, momentum 0.9, lr 0.05\n")
    print(table)
    print(f"\nplot: {plot}\ntable: {out / 'summary.md'}")


if __name__ == "__main__":
    main()
