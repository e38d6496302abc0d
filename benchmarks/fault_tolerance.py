"""Goodput when a worker is SIGKILLed and started again every K seconds (issue 29): live fault tolerance on torchft
against restarting every worker from the last checkpoint (today's path), on 127.0.0.1.

    .venv/bin/python benchmarks/fault_tolerance.py [--kill-every 60] [--epochs 5000] [--modes plain,restart,ft,ft-kill]

Three workers train the MLP of width 512 on digits (batch 32, momentum SGD, I = 8), each a real
``prsgd train --engine distributed`` process:

- ``plain``: one torchrun job of three ranks, no failure: the reference;
- ``restart``: the same job with ``--max-restarts``; every K s one rank is SIGKILLed, torchrun restarts all three,
  and they resume from the newest checkpoint (``--checkpoint-every``): the work since it and the restart are lost;
- ``ft``: three replica groups (``--fault-tolerant``, a Lighthouse needing 2, heartbeat timeout 1 s), no failure;
- ``ft-kill``: the same, and every K s group 1's process is SIGKILLed and its job started again at once: the others
  go on, it recovers from a live peer at their next round.

Goodput is useful local steps per second over all workers, from launch until the run's end: steps x 3 for
``plain`` and ``restart`` (every step the final model holds, recomputed ones counted once), and for the
fault-tolerant runs the committed rounds' groups x I (``group_rounds`` in the log: a dead group's steps since its
last round, and those it missed, do not count). Printed as ratios to the no-failure run of the same engine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

FLAGS = [
    *("--dataset", "digits", "--model", "mlp", "--hidden", "512", "--batch-size", "32", "--period", "8"),
    *("--lr", "0.05", "--momentum", "0.9", "--workers", "3", "--evals", "2", "--no-progress", "--overwrite"),
]
MODES = ("plain", "restart", "ft", "ft-kill")


def torchrun(ranks: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), *extra]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's workers run in sessions of their own)."""
    children = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children[parent].append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children[todo.pop()]:
            found.append(child)
            todo.append(child)
    return found


def kill_worker(job: subprocess.Popen) -> bool:
    """SIGKILL one training process under ``job`` (the last one, for a job of several ranks)."""
    workers = [p for p in descendants(job.pid) if b"prsgd.train" in Path(f"/proc/{p}/cmdline").read_bytes()]
    if not workers:
        return False
    os.kill(sorted(workers)[-1], signal.SIGKILL)
    return True


def final_record(folder: Path) -> dict:
    return json.loads((folder / "log.jsonl").read_text().splitlines()[-1])


def run_plain(out: Path, flags: list[str], kill_every: float | None, checkpoint_every: int, max_kills: int) -> dict:
    extra = ["--max-restarts", "1000"] if kill_every else []
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = torchrun(3, "--master-addr", "127.0.0.1", "--master-port", str(port), *extra, "-m", "prsgd.train")
    command += ["--engine", "distributed", *flags, "--out", str(out), "--checkpoint-every", str(checkpoint_every)]
    started = time.monotonic()
    job = subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL)
    kills, next_kill = 0, started + (kill_every or float("inf"))
    while job.poll() is None:
        if time.monotonic() >= next_kill and kills < max_kills:
            kills += kill_worker(job)
            next_kill += kill_every
        time.sleep(0.05)
    wall = time.monotonic() - started
    if job.returncode != 0:
        raise SystemExit(f"the {'restart' if kill_every else 'plain'} run failed ({job.returncode})")
    final = final_record(out)
    return {"wall": wall, "useful": 3 * final["step"], "kills": kills, "final": final}


def run_ft(out: Path, flags: list[str], kill_every: float | None, max_kills: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    os.environ.setdefault("RUST_LOG", "error")  # the in-process Lighthouse: not a line per quorum
    from prsgd.engines.lighthouse import lighthouse_address, start_lighthouse

    server = start_lighthouse(2, 0, join_timeout_ms=5_000, heartbeat_timeout_ms=1_000)
    address = lighthouse_address(server)

    def launch(group: int) -> subprocess.Popen:
        env = dict(
            os.environ, OMP_NUM_THREADS="1", TORCHFT_LIGHTHOUSE=address, REPLICA_GROUP_ID=str(group), RUST_LOG="error"
        )
        command = torchrun(1, "--standalone", "-m", "prsgd.train", "--engine", "distributed", "--fault-tolerant")
        command += [*flags, "--out", str(out), "--worker-timeout", "60"]
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    try:
        started = time.monotonic()
        jobs = {g: launch(g) for g in range(3)}
        kills, next_kill = 0, started + (kill_every or float("inf"))
        while jobs[0].poll() is None or jobs[2].poll() is None:
            if time.monotonic() >= next_kill and kills < max_kills and kill_worker(jobs[1]):
                kills += 1
                jobs[1].wait()
                jobs[1] = launch(1)
                next_kill += kill_every
            time.sleep(0.05)
        wall = time.monotonic() - started
        try:  # group 1 ends with the others unless it was killed too near the end to rejoin
            jobs[1].wait(timeout=10)
        except subprocess.TimeoutExpired:
            jobs[1].kill()
    finally:
        server.shutdown()
    if jobs[0].returncode != 0 or jobs[2].returncode != 0:
        raise SystemExit(f"the fault-tolerant run failed ({jobs[0].returncode}, {jobs[2].returncode})")
    final = final_record(out / "group-0")
    period = int(flags[flags.index("--period") + 1])
    return {"wall": wall, "useful": final["group_rounds"] * period, "kills": kills, "final": final}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between kills")
    parser.add_argument("--epochs", default="5000")
    parser.add_argument("--checkpoint-every", type=int, default=5000, help="restart: steps between checkpoints")
    parser.add_argument("--max-kills", type=int, default=1000, help="kill at most this many times per run")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default="runs/fault_tolerance")
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: {unknown[0]!r} is not one of: {', '.join(MODES)}")
    flags = [*FLAGS, "--epochs", args.epochs]
    results = {}
    for mode in modes:
        out = Path(args.out) / mode
        if mode in ("plain", "restart"):
            kill = args.kill_every if mode == "restart" else None
            results[mode] = run_plain(out, flags, kill, args.checkpoint_every, args.max_kills)
        else:
            results[mode] = run_ft(out, flags, args.kill_every if mode == "ft-kill" else None, args.max_kills)
        r = results[mode]
        print(
            f"ran {mode}: {r['wall']:.1f} s, {r['useful']} useful steps, {r['kills']} kills, "
            f"test accuracy {r['final']['test_accuracy']:.4f}",
            flush=True,
        )
    print(f"\n3 workers on 127.0.0.1, MLP 512 on digits, {args.epochs} epochs, a kill every {args.kill_every:g} s")
    print("| run | wall-clock (s) | kills | useful steps | goodput (steps/s) | vs no failure | test accuracy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    reference = {"plain": "plain", "restart": "plain", "ft": "ft", "ft-kill": "ft"}
    for mode, r in results.items():
        goodput = r["useful"] / r["wall"]
        base = results.get(reference[mode])
        ratio = f"{100 * goodput / (base['useful'] / base['wall']):.1f}%" if base else "-"
        print(
            f"| {mode} | {r['wall']:.1f} | {r['kills']} | {r['useful']} | {goodput:.1f} | {ratio} "
            f"| {r['final']['test_accuracy']:.4f} |"
        )
    if "plain" in results and "ft" in results:
        plain, ft = (results[m]["useful"] / results[m]["wall"] for m in ("plain", "ft"))
        print(f"fault-tolerant engine without failures: {100 * ft / plain:.1f}% of plain LocalSGD's goodput")
    if "plain" in results and "ft-kill" in results:
        plain, ft = (results[m]["useful"] / results[m]["wall"] for m in ("plain", "ft-kill"))
        print(f"ft-kill vs plain without failures: {100 * ft / plain:.1f}%")


if __name__ == "__main__":
    main()
