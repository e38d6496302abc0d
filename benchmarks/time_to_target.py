"""Wall-clock to a target training loss over a slow network: Algorithm 1 vs gradient all-reduce (issue 6).

    sudo .venv/bin/python benchmarks/time_to_target.py [--rate 100mbit] [--model mlp] [--periods 2,4,8,16]
                                                       [--compressions none,bf16] [--overlaps 0,1] [--seeds 3]
    sudo .venv/bin/python benchmarks/time_to_target.py --model cnn --hierarchical

Real multi-process training (gloo, 4 workers, ``python -m prsgd.train --engine distributed``) where every worker
lives in its own network namespace, linked to a bridge (in a namespace of its own) by a veth pair whose egress is
rate-limited with ``tc qdisc ... tbf``. The script makes the namespaces and removes them; traffic stays between
them (addresses 10.77.0.0/24 inside those namespaces only). Latency is not modelled (no netem in this kernel).
Runs: sync="gradients" (every step) and params_and_momentum with each period (and each ``--compressions``
codec: exact rounds, or rounds in bf16/fp16 with error feedback, and each ``--overlaps`` delay: 0 applies the
round at once, d > 0 runs it in the background and applies it d steps later, ``I`` = the period); each logs the
loss of the averaged model against training wall-clock. Prints the time to reach the target loss (default: 1.1 x
the final loss of the gradients run of the same seed) and the final losses; with ``--seeds`` > 1 every run is
repeated per seed and the table gives mean +- sd over seeds of the speed-up and of the final loss's difference to
the gradients run of the same seed (paired). Plots loss vs wall-clock for all runs of the first seed.

``--hierarchical``: 2 "hosts" of 2 ranks each: the ranks of a host share one namespace (they talk over its
loopback, unlimited), the hosts are linked at ``--rate``. Runs: gradients, flat Algorithm 1 at I = 8 and 32, and
two-level rounds (within a host every ``inner_period`` steps, across hosts every I) at (1, 8) and (2, 32); also
reports the bytes that crossed the host links, read from the veth counters (all traffic: rounds, evaluation,
checkpoints, rendezvous). ``--floor`` adds sync='none' (no communication at all): its training time is the
floor that no communication scheme can beat on this machine.

If namespaces cannot be made (not root, no iproute2), it says so and falls back to loopback runs whose times are
then *modelled*: measured time + rounds x (bytes / rate), labelled as such.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

NS = "prsgd-tt"
SUBNET = "10.77.0"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def make_network(hosts: int, rate: str, burst: str = "64kb") -> None:
    sh("ip", "netns", "add", f"{NS}-hub")
    sh("ip", "netns", "exec", f"{NS}-hub", "ip", "link", "add", "br0", "type", "bridge")
    sh("ip", "netns", "exec", f"{NS}-hub", "ip", "link", "set", "br0", "up")
    for k in range(hosts):
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
            burst,
            "latency",
            "100ms",
        )


def remove_network(hosts: int) -> None:
    for name in [f"{NS}-w{k}" for k in range(hosts)] + [f"{NS}-hub"]:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def host_tx_bytes(hosts: int) -> int:
    """Bytes sent so far on every host's link (the veth inside its namespace)."""
    total = 0
    for k in range(hosts):
        path = f"/sys/class/net/tt{k}a/statistics/tx_bytes"
        read = subprocess.run(["ip", "netns", "exec", f"{NS}-w{k}", "cat", path], capture_output=True, text=True)
        total += int(read.stdout.strip() or 0)
    return total


def train(flags: list[str], out: Path, workers: int, namespaces: bool, port: int, per_host: int = 1) -> list[dict]:
    procs = []
    for rank in range(workers):
        host = rank // per_host
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank % per_host),
            LOCAL_WORLD_SIZE=str(per_host),
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
            env["GLOO_SOCKET_IFNAME"] = f"tt{host}a"
            cmd = ["ip", "netns", "exec", f"{NS}-w{host}", *cmd]
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
    parser.add_argument("--overlaps", default="0", help="comma-separated delays in steps; I: the period; 0: none")
    parser.add_argument("--seeds", type=int, default=1, help="repeat every run with seeds 0..seeds-1")
    parser.add_argument("--hierarchical", action="store_true", help="2 hosts x 2 ranks: flat vs two-level rounds")
    parser.add_argument(
        "--floor", action="store_true", help="also sync='none' (no communication): the training time's floor"
    )
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
    if args.floor:
        runs["none (no communication)"] = ["--sync", "none"]
    per_host = 1
    if args.hierarchical:
        per_host = 2
        for period in (8, 32):
            runs[f"flat I={period}"] = ["--sync", "params_and_momentum", "--period", str(period)]
        for inner, period in ((1, 8), (2, 32)):
            runs[f"two-level {inner}/{period}"] = ["--period", str(period), "--inner-period", str(inner)]
    else:
        for period in map(int, args.periods.split(",")):
            for codec in args.compressions.split(","):
                for overlap in args.overlaps.split(","):
                    delay = period if overlap == "I" else int(overlap)
                    name = f"params_and_momentum I={period}" + (f" {codec}" if codec != "none" else "")
                    name += f" overlap={delay}" if delay else ""
                    runs[name] = ["--sync", "params_and_momentum", "--period", str(period), "--overlap", str(delay)]
                    runs[name] += ["--compression", codec] if codec != "none" else []
    if args.workers % per_host:
        parser.error(f"--workers {args.workers} is not a multiple of {per_host} ranks per host")
    hosts = args.workers // per_host

    namespaces = True
    try:
        remove_network(hosts)
        make_network(hosts, args.rate)
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        namespaces = False
        remove_network(hosts)
        print(
            f"network namespaces could not be made ({error}); falling back to loopback with MODELLED times: "
            f"measured + rounds x bytes / {args.rate}"
        )
    out = Path(args.out)
    logs: dict[str, list[list[dict]]] = {name: [] for name in runs}
    crossed: dict[str, list[int]] = {name: [] for name in runs}
    try:
        for seed in range(args.seeds):
            for i, (name, extra) in enumerate(runs.items()):
                folder = out / name.replace(" ", "_").replace("/", "-") / f"seed{seed}"
                before = host_tx_bytes(hosts) if namespaces else 0
                port = 29600 + i + 50 * seed
                logs[name].append(
                    train([*flags, *extra, "--seed", str(seed)], folder, args.workers, namespaces, port, per_host)
                )
                crossed[name].append(host_tx_bytes(hosts) - before if namespaces else 0)
                print(f"ran {name} seed {seed}", flush=True)
    finally:
        if namespaces:
            remove_network(hosts)
    if not namespaces:
        bandwidth = bits_per_second(args.rate) / 8
        for per_seed in logs.values():
            for records in per_seed:
                for r in records:
                    r["wall_clock"] += r["comm_bytes"] / bandwidth
    targets = [args.target or 1.1 * logs["gradients"][seed][-1]["train_loss"] for seed in range(args.seeds)]

    def time_to(records: list[dict], target: float) -> float:
        return next((r["wall_clock"] for r in records if r["train_loss"] <= target), float("nan"))

    label = "real tbf-limited network namespaces" if namespaces else "MODELLED (loopback + bytes / rate)"
    layout = f"{hosts} hosts x {per_host} ranks" if per_host > 1 else f"{args.workers} gloo workers"
    print(
        f"\n{layout}, {args.model}, links {args.rate} ({label}); {args.seeds} seed(s); target: "
        + ("given" if args.target else "1.1 x the gradients run's final train loss, per seed")
        + f" ({', '.join(f'{t:.4f}' for t in targets)})"
    )
    print(
        "| run | time to target (s) | speed-up vs gradients | final train loss | vs gradients (paired) "
        "| training time (s) | rounds | MB/worker | MB over host links |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = logs["gradients"]
    for name, per_seed in logs.items():
        times = [time_to(records, target) for records, target in zip(per_seed, targets, strict=True)]
        speedups = [time_to(b, target) / t for b, t, target in zip(base, times, targets, strict=True)]
        finals = [records[-1]["train_loss"] for records in per_seed]
        differences = [100 * (f / b[-1]["train_loss"] - 1) for f, b in zip(finals, base, strict=True)]
        last = per_seed[0][-1]
        print(
            f"| {name} | {spread(times, '.2f')} | {spread(speedups, '.2f', 'x')} | {spread(finals, '.4f')} "
            f"| {spread(differences, '+.1f', '%')} | {spread([r[-1]['wall_clock'] for r in per_seed], '.1f')} "
            f"| {last['comm_rounds']} | {last['comm_bytes'] / 1e6:.2f} "
            f"| {statistics.mean(crossed[name]) / 1e6:.2f} |"
        )
    from prsgd.experiments.report import plot_groups

    first_seed = {name: [per_seed[0]] for name, per_seed in logs.items()}
    written = plot_groups(first_seed, out / "loss_vs_wall_clock", x_axes=("wall_clock",), metrics=("train_loss",))
    print(f"plot: {written[0]}")


def spread(values: list[float], fmt: str, unit: str = "") -> str:
    """``mean +- sd`` over seeds (just the value for one seed)."""
    if any(math.isnan(v) for v in values):
        return "not reached" if all(math.isnan(v) for v in values) else f"not reached in {sum(map(math.isnan, values))}"
    if len(values) == 1:
        return format(values[0], fmt) + unit
    return f"{format(statistics.mean(values), fmt)}{unit} +- {format(statistics.stdev(values), fmt.lstrip('+'))}"


if __name__ == "__main__":
    main()
