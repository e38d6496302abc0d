"""The communication overhead each round option leaves, over a real slow link between two hosts (issue 28).

    sudo .venv/bin/python benchmarks/comm_overhead.py [--rate 100mbit] [--seeds 3] [--runs NAME,...]

Two "hosts" (network namespaces made and removed here, as ``benchmarks/time_to_target.py`` does), one gloo rank
each, joined by links rate-limited with ``tc tbf``; the MLP of width 512 on digits, 20 epochs, batch 16, momentum
SGD (lr 0.05, momentum 0.9), real ``prsgd train --engine distributed`` runs. For each run the overhead left is

    (T - T_none) / (T_gradients - T_none),

T being the training wall-clock (evaluation excluded) of the run, T_none that of ``sync="none"`` (no communication:
the floor) and T_gradients that of every-step gradient averaging, all of the same seed: the share of gradient
averaging's communication time the run still pays. Printed with mean +- sd over seeds, next to the final test
accuracy and its paired difference to the gradients run (points), the bytes per worker and the peak in one step.
The target: an option that leaves <= 5% at test accuracy within 1 point of gradients.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from time_to_target import make_network, remove_network, spread, train

FLAGS = [
    *("--dataset", "digits", "--model", "mlp", "--hidden", "512", "--batch-size", "16"),
    *("--lr", "0.05", "--momentum", "0.9", "--workers", "2", "--evals", "2", "--overwrite"),
]
RUNS = {
    "gradients": ["--sync", "gradients"],
    "none": ["--sync", "none"],
    "I=8": ["--period", "8"],
    "I=8 bf16 overlap=1": ["--period", "8", "--compression", "bf16", "--overlap", "1"],
    "I=8 int4 overlap=1": ["--period", "8", "--compression", "int4", "--overlap", "1"],
    "I=8 int4 overlap=8": ["--period", "8", "--compression", "int4", "--overlap", "8"],
    "I=8 topk:0.01": ["--period", "8", "--compression", "topk:0.01"],
    "I=8 topk:0.01 overlap=8": ["--period", "8", "--compression", "topk:0.01", "--overlap", "8"],
    "I=8 int4 fragments=4 overlap=2": ["--period", "8", "--compression", "int4", "--fragments", "4", "--overlap", "2"],
    "I=16 int4 overlap=16": ["--period", "16", "--compression", "int4", "--overlap", "16"],
    "I=16 topk:0.01 overlap=16": ["--period", "16", "--compression", "topk:0.01", "--overlap", "16"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", default="100mbit", help="tbf rate per host link, e.g. 100mbit or 1gbit")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated names of RUNS (gradients, none kept)")
    parser.add_argument("--epochs", default="20")
    parser.add_argument("--loopback", action="store_true", help="no namespaces (a smoke run: no slow link at all)")
    parser.add_argument("--out", default="runs/comm_overhead")
    args = parser.parse_args()
    wanted = ["gradients", "none", *(n for n in args.runs.split(",") if n not in ("gradients", "none"))]
    unknown = [n for n in wanted if n not in RUNS]
    if unknown:
        parser.error(f"--runs: {unknown[0]!r} is not one of: {', '.join(RUNS)}")
    namespaces = not args.loopback
    try:
        if namespaces:
            remove_network(2)
            make_network(2, args.rate)
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        remove_network(2)
        parser.error(f"network namespaces could not be made ({error}); run as root with iproute2, or --loopback")
    logs: dict[str, list[dict]] = {name: [] for name in wanted}
    try:
        for seed in range(args.seeds):
            for i, name in enumerate(wanted):
                folder = Path(args.out) / args.rate / name.replace(" ", "_").replace("=", "") / f"seed{seed}"
                flags = [*FLAGS, *RUNS[name], "--epochs", args.epochs, "--seed", str(seed)]
                logs[name].append(train(flags, folder, 2, namespaces, 29700 + i + 40 * seed)[-1])
                print(f"ran {name} seed {seed}: {logs[name][-1]['wall_clock']:.2f} s", flush=True)
    finally:
        if namespaces:
            remove_network(2)
    base, floor = logs["gradients"], logs["none"]
    link = "loopback (no slow link)" if args.loopback else f"links {args.rate} (tbf, network namespaces)"
    print(f"\n2 hosts x 1 rank, {link}; MLP 512 on digits, {args.epochs} epochs, {args.seeds} seeds")
    print(
        "| run | overhead left | training time (s) | test accuracy | vs gradients (points) | MB / worker "
        "| peak KB / step |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, finals in logs.items():
        overhead = [
            100 * (r["wall_clock"] - n["wall_clock"]) / (g["wall_clock"] - n["wall_clock"])
            for r, n, g in zip(finals, floor, base, strict=True)
        ]
        accuracy = [100 * r["test_accuracy"] for r in finals]
        points = [a - 100 * g["test_accuracy"] for a, g in zip(accuracy, base, strict=True)]
        print(
            f"| {name} | {spread(overhead, '.1f', '%')} | {spread([r['wall_clock'] for r in finals], '.2f')} "
            f"| {spread(accuracy, '.1f')} | {spread(points, '+.1f')} | {finals[0]['comm_bytes'] / 1e6:.2f} "
            f"| {finals[0]['comm_peak_step_bytes'] / 1e3:.1f} |"
        )
    gaps = [g["wall_clock"] - n["wall_clock"] for g, n in zip(base, floor, strict=True)]
    print(f"T_gradients - T_none = {spread(gaps, '.2f')} s")


if __name__ == "__main__":
    main()
