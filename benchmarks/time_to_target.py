"""Wall-clock to a target training loss over a slow network: Algorithm 1 vs gradient all-reduce (issue 6).

    sudo .venv/bin/python benchmarks/time_to_target.py [--rate 100mbit] [--model mlp] [--periods 2,4,8,16]
                                                       [--compressions none,bf16]

Real multi-process training (gloo, 4 workers, ``python -m prsgd.train --engine distributed``) where every worker
lives in its own network namespace, linked to a bridge (in a namespace of its own) by a veth pair whose egress is
rate-limited with ``tc qdisc ... tbf``. The script makes the namespaces and removes them; traffic stays between
them (addresses 10.77.0.0/24 inside those namespaces only). Latency is not modelled (no netem in this kernel).
Runs: sync="gradients" (every step) and params_and_momentum with each period (and each ``--compressions``
codec: exact rounds, or rounds in bf16/fp16 with error feedback); each logs the loss of the averaged
model against training wall-clock. Prints the time to reach the target loss (default: 1.1 x the final loss of the
gradients run) and the final losses; plots loss vs wall-clock for all runs (the paper's Figure 3 form).

If namespaces cannot be made (not root, no iproute2), it says so and falls back to loopback runs whose times are
then *modelled*: measured time + rounds x (bytes / rate), labelled as such.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

NS = "prsgd-tt"
SUBNET = "10.77.0"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def make_network(workers: int, rate: str) -> None:
    sh("ip", "netns", "add", f"{NS}-hub")
    sh("ip", "netns", "exec", f"{NS}-hub", "ip", "link", "add", "br0", "type", "bridge")
    sh("ip", "netns", "exec", f"{NS}-hub", "ip", "link", "set", "br0", "up")
    for k in range(workers):
        ns, inner, outer = f"{NS}-w{k}", f"tt{k}a", f"tt{k}b"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer, "netns", f"{NS}-hub")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{SUBNET}.{k + 1}/24", "dev", inner)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", inner, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", f"{NS}-hub", "ip", "link", "set", outer, "master", "br0")
        sh("ip", "netns", "exec", f"{NS}-hub", "ip", "link", "set", outer, "up")
        sh(
            "ip",
            "netns",
            "exec",
            ns,
            "tc",
            "qdisc",
            "add",
            "dev",
            inner,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "64kb",
            "latency",
            "100ms",
        )


def remove_network(workers: int) -> None:
    for name in [f"{NS}-w{k}" for k in range(workers)] + [f"{NS}-hub"]:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def train(flags: list[str], out: Path, workers: int, namespaces: bool, port: int) -> list[dict]:
    procs = []
    for rank in range(workers):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(workers),
            OMP_NUM_THREADS="1",
            MASTER_ADDR=f"{SUBNET}.1" if namespaces else "127.0.0.1",
            MASTER_PORT=str(port),
        )
        cmd = [
            sys.executable,
            "-m",
            "prsgd.train",
            "--engine",
            "distributed",
            *flags,
            "--out",
            str(out),
            "--no-progress",
        ]
        if namespaces:
            env["GLOO_SOCKET_IFNAME"] = f"tt{rank}a"
            cmd = ["ip", "netns", "exec", f"{NS}-w{rank}", *cmd]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=1200)
        if p.returncode:
            raise RuntimeError(f"a worker failed: {err.decode()[-2000:]}")
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def bits_per_second(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}  # tc's units; "bit" last
    for unit, scale in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise ValueError(f"--rate {rate!r}: use e.g. 100mbit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rate", default="100mbit", help="tbf rate per worker link, e.g. 100mbit")
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    parser.add_argument("--periods", default="2,4,8,16")
    parser.add_argument("--compressions", default="none", help="comma-separated: none (exact rounds), bf16, fp16")
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--target", type=float, default=None, help="target training loss")
    parser.add_argument("--out", default="runs/time_to_target")
    args = parser.parse_args()
    if args.model == "mlp":
        flags = ["--dataset", "digits", "--model", "mlp", "--epochs", str(args.epochs or 30), "--lr", "0.05"]
    else:
        flags = [
            "--dataset",
            "fashion_mnist",
            "--train-subset",
            "8000",
            "--model",
            "cnn",
            "--epochs",
            str(args.epochs or 3),
            "--lr",
            "0.05",
            "--eval-train-examples",
            "2000",
        ]
    flags += ["--workers", str(args.workers), "--batch-size", "16", "--momentum", "0.9", "--evals", "40"]
    runs = {"gradients": ["--sync", "gradients", "--period", "1"]}
    for period in map(int, args.periods.split(",")):
        for codec in args.compressions.split(","):
            name = f"params_and_momentum I={period}" + (f" {codec}" if codec != "none" else "")
            runs[name] = ["--sync", "params_and_momentum", "--period", str(period)]
            runs[name] += ["--compression", codec] if codec != "none" else []

    namespaces = True
    try:
        remove_network(args.workers)
        make_network(args.workers, args.rate)
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        namespaces = False
        remove_network(args.workers)
        print(
            f"network namespaces could not be made ({error}); falling back to loopback with MODELLED times: "
            f"measured + rounds x bytes / {args.rate}"
        )
    out = Path(args.out)
    logs = {}
    try:
        for i, (name, extra) in enumerate(runs.items()):
            logs[name] = train([*flags, *extra], out / name.replace(" ", "_"), args.workers, namespaces, 29600 + i)
            print(f"ran {name}", flush=True)
    finally:
        if namespaces:
            remove_network(args.workers)
    if not namespaces:
        bandwidth = bits_per_second(args.rate) / 8
        for records in logs.values():
            for r in records:
                r["wall_clock"] += r["comm_bytes"] / bandwidth
    target = args.target or 1.1 * logs["gradients"][-1]["train_loss"]

    def time_to(records):
        return next((r["wall_clock"] for r in records if r["train_loss"] <= target), float("nan"))

    base_time = time_to(logs["gradients"])
    base_loss = logs["gradients"][-1]["train_loss"]
    label = "real tbf-limited network namespaces" if namespaces else "MODELLED (loopback + bytes / rate)"
    print(f"\n{args.workers} gloo workers, {args.model}, links {args.rate} ({label}); target train loss {target:.4f}")
    print("| run | time to target (s) | speed-up vs gradients | final train loss | vs gradients | rounds | MB/worker |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, records in logs.items():
        t, last = time_to(records), records[-1]
        print(
            f"| {name} | {t:.2f} | {base_time / t:.2f}x | {last['train_loss']:.4f} "
            f"| {100 * (last['train_loss'] / base_loss - 1):+.1f}% | {last['comm_rounds']} "
            f"| {last['comm_bytes'] / 1e6:.2f} |"
        )
    from prsgd.report import plot_groups

    written = plot_groups(
        {k: [v] for k, v in logs.items()}, out / "loss_vs_wall_clock", x_axes=("wall_clock",), metrics=("train_loss",)
    )
    print(f"plot: {written[0]}")


if __name__ == "__main__":
    main()
