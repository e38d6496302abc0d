"""The README's demo: Algorithm 1 against the paper's baselines, 8 simulated workers, real offline data.

    prsgd demo [--dataset fashion_mnist|digits] [--out runs/demo] [--epochs E] [--period 8]
                         [--topology ring,torus,complete]

On Fashion-MNIST (Debian's dataset-fashion-mnist; a small CNN; 12,000 training images) or scikit-learn's digits (an
MLP), runs parallel mini-batch momentum SGD (gradients all-reduced every step) and, with the same period I,
PR-SGD-Momentum (params_and_momentum), model averaging with cleared momentum, and parameter-only averaging; prints
a markdown table and writes a plot of training loss and test accuracy vs joint epochs and vs communication rounds.
``--topology`` adds decentralized momentum SGD (Algorithm 2) on those graphs.
"""

from __future__ import annotations

from pathlib import Path

from prsgd.experiments.report import plot_groups, summary_table
from prsgd.training import command
from prsgd.training.config import RunConfig
from prsgd.training.train import run

PRESETS = {
    "fashion_mnist": {
        "data": {"dataset": "fashion_mnist", "train_subset": 12000},
        "model": {"model": "cnn"},
        "training": {"epochs": 3.0, "lr": 0.05, "evals": 5, "eval_train_examples": 2000},
    },
    "digits": {
        "data": {"dataset": "digits"},
        "model": {"model": "mlp"},
        "training": {"epochs": 30.0, "lr": 0.05, "evals": 30},
    },
}


def main(argv: list[str] | None = None) -> None:
    parser = command.parser("prsgd demo", __doc__)
    parser.add_argument("--dataset", choices=sorted(PRESETS), default="fashion_mnist")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--epochs", type=float, default=None, help="joint epochs (default: the preset's)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--period", type=int, default=8)
    parser.add_argument("--topology", default="", help="comma-separated graphs (ring,torus,complete,...) for gossip")
    args = parser.parse_args(argv)
    out = Path(args.out)
    preset = PRESETS[args.dataset]
    overrides = {f"{section}.{k}": v for section, values in preset.items() for k, v in values.items()}
    overrides |= {"training.workers": args.workers, "training.batch_size": 16, "algorithm.momentum": 0.9}
    if args.epochs is not None:
        overrides["training.epochs"] = args.epochs
    base = RunConfig().with_overrides(overrides)
    variants = {
        "gradients (every step)": {"sync": "gradients", "period": 1},
        f"params_and_momentum (I={args.period})": {"sync": "params_and_momentum", "period": args.period},
        f"params_clear_momentum (I={args.period})": {"sync": "params_clear_momentum", "period": args.period},
        f"params_only (I={args.period})": {"sync": "params_only", "period": args.period},
    }
    for graph in filter(None, args.topology.split(",")):
        variants[f"gossip ({graph})"] = {"sync": "gossip", "period": 1, "topology": graph}
    runs = {}
    for name, changes in variants.items():
        folder = changes["sync"] + (f"_{changes['topology']}" if "topology" in changes else "")
        config = base.with_overrides({**changes, "out": str(out / folder)})
        runs[name] = [run(config)]
    table = summary_table(runs)
    plot_groups(runs, out / "demo.png", x_axes=("joint_epoch", "comm_rounds"))
    (out / "summary.md").write_text(table + "\n")
    t = base.training
    print(
        f"\n{args.dataset}, {base.model.model}, {t.workers} simulated workers x batch {t.batch_size}, "
        f"{t.epochs:g} joint epochs, momentum 0.9, lr {t.lr}\n"
    )
    print(table)
    print(f"\nplot: {out / 'demo.png'} (and .pdf)\ntable: {out / 'summary.md'}")
