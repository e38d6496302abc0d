"""The cost of one prsgd.LocalSGD sync in 4 gloo processes on loopback, against its limit and naive code (issue 6).

    .venv/bin/python benchmarks/sync_cost.py [--workers 4] [--repeats 30] [--model resnet20]
    sudo .venv/bin/python benchmarks/sync_cost.py --rate 100mbit [--repeats 10]

For a ResNet-20-sized model (parameters, BatchNorm buffers and momentum: what params_and_momentum averages),
each process times, after warm-up and a barrier, the median over repeats of:
  limit      one bare all_reduce of a flat tensor of the same number of bytes;
  prsgd      one LocalSGD sync round (the optimizer's own averaging call, as step() makes it every period);
  naive      one all_reduce per parameter, per buffer and per momentum tensor;
  torch      PyTorch's PeriodicModelAverager.average_parameters (parameters only, so fewer bytes);
  bf16       one compressed round (LocalSGD(compression="bf16"): change since the last round in bf16, error
             feedback, all-to-all + all-gather; half the bytes);
  int8       the same with compression="int8" (0.254x the bytes).
Also the memory a sync allocates (torch's allocations, from the profiler; and the process's RSS growth) relative
to the model's size.
Rank 0 prints the ratios.

``--rate``: the same processes, each in its own network namespace with a link rate-limited by tbf (the network of
``time_to_target.py``), timing only the rounds that matter there: the bare all_reduce, the fp32 round and the bf16
and int8 rounds (the slow link's cost of a compressed round against an exact one).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import prsgd
from prsgd.engines.distributed import init_process_group
from prsgd.models import build_model

PORT = 29590  # the rendezvous port inside the namespaces of --rate


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank: int, world: int, port: int, args: argparse.Namespace, addr: str = "127.0.0.1") -> None:
    torch.set_num_threads(1)
    init_process_group(  # prsgd's: torch._dynamo imported first (see its docstring)
        "gloo",
        init_method=f"tcp://{addr}:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    torch.manual_seed(0)
    model = build_model(args.model, (3, 32, 32), 10)
    opt = prsgd.LocalSGD(model, lr=0.1, momentum=0.9, period=1, sync="params_and_momentum")
    every = [t for field in ("params", "buffers", "state") for t in opt.storage.tensors(field)]
    nbytes = sum(t.numel() * t.element_size() for t in every)
    flat = torch.randn(nbytes // 4)

    def limit():
        dist.all_reduce(flat)

    def prsgd_sync():
        opt.algorithm.synchronize()

    def compressed_round(codec: str):
        compressed = prsgd.LocalSGD(
            build_model(args.model, (3, 32, 32), 10), lr=0.1, momentum=0.9, period=1, compression=codec
        )
        return lambda: compressed.algorithm._round(exact=False)

    bf16_round, int8_round = compressed_round("bf16"), compressed_round("int8")

    def naive():
        with torch.no_grad():
            for t in every:
                dist.all_reduce(t)
                t.div_(world)

    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    averager = PeriodicModelAverager(period=1, warmup_steps=0)
    # PyTorch's averager silently skips parameters whose .grad is None: give every parameter a gradient first.
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()

    def torch_averager():
        averager.average_parameters(model.parameters())

    measured = [("limit", limit), ("prsgd", prsgd_sync), ("bf16", bf16_round), ("int8", int8_round)]
    if args.rate:  # over the slow link: the exact and the compressed round
        results = {name: timed(fn, args.repeats) for name, fn in measured}
        if rank == 0:
            print(
                f"{world} gloo processes, each in its own namespace, links {args.rate} (tbf), {args.model}: one "
                f"round of {nbytes / 1e6:.2f} MB in fp32, {nbytes / 2e6:.2f} MB in bf16; median of {args.repeats}"
            )
            print("| what | median time (ms) | / fp32 round |")
            print("|---|---:|---:|")
            for name, label in [
                ("limit", "one bare fp32 all_reduce, same bytes"),
                ("prsgd", "prsgd.LocalSGD fp32 round"),
                ("bf16", "prsgd.LocalSGD bf16 round (compression='bf16')"),
                ("int8", "prsgd.LocalSGD int8 round (compression='int8')"),
            ]:
                print(f"| {label} | {results[name] * 1e3:.1f} | {results[name] / results['prsgd']:.2f}x |")
        dist.destroy_process_group()
        return
    results = {name: timed(fn, args.repeats) for name, fn in [*measured, ("naive", naive)]}
    span = opt.storage.span(("params", "buffers", "state"))
    assert span.numel() * span.element_size() == nbytes, "a round must be one span of flat storage"
    before = rss_bytes()
    prsgd_sync()
    grown = rss_bytes() - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        prsgd_sync()
    allocated = sum(max(0, e.self_cpu_memory_usage) for e in prof.events())
    # Last, because PyTorch's averager rebinds p.data to fresh tensors, which takes the parameters out of prsgd's
    # flat storage (after it, a LocalSGD sync falls back to packing a copy).
    results["torch"] = timed(torch_averager, args.repeats)
    if rank == 0:
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        print(
            f"torch {torch.__version__}, {world} gloo processes on loopback, {args.model}: "
            f"{sum(p.numel() for p in model.parameters())} parameters; one sync reduces {nbytes / 1e6:.2f} MB "
            f"({len(every)} tensors)"
        )
        print("| what | median time (ms) | / limit |")
        print("|---|---:|---:|")
        for name, label in [
            ("limit", "one bare all_reduce, same bytes (limit)"),
            ("prsgd", "prsgd.LocalSGD sync"),
            ("naive", f"one all_reduce per tensor ({len(every)})"),
            ("torch", "PyTorch PeriodicModelAverager (params only)"),
            ("bf16", "prsgd.LocalSGD compressed round (bf16, half the bytes)"),
            ("int8", "prsgd.LocalSGD compressed round (int8 + a scale per 256 values)"),
        ]:
            print(f"| {label} | {results[name] * 1e3:.2f} | {results[name] / results['limit']:.2f}x |")
        print(
            f"memory: torch allocated {allocated / 1e6:.3f} MB during a sync = {allocated / model_bytes:.3f}x the "
            f"model's {model_bytes / 1e6:.2f} MB of parameters; process RSS grew by {grown / 1e6:.3f} MB"
        )
    dist.destroy_process_group()


def over_slow_links(args: argparse.Namespace) -> None:
    """Every rank in its own namespace behind a tbf-limited link (time_to_target.py's network)."""
    import time_to_target as network

    network.remove_network(args.workers)
    network.make_network(args.workers, args.rate)
    try:
        procs = []
        for rank in range(args.workers):
            cmd = ["ip", "netns", "exec", f"{network.NS}-w{rank}", sys.executable, __file__, "--rank", str(rank)]
            cmd += ["--workers", str(args.workers), "--repeats", str(args.repeats), "--model", args.model]
            cmd += ["--rate", args.rate]
            env = dict(os.environ, GLOO_SOCKET_IFNAME=f"tt{rank}a", OMP_NUM_THREADS="1")
            procs.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait(timeout=1200) for p in procs]
        if any(codes):
            raise SystemExit(f"a worker failed (exit codes {codes})")
    finally:
        network.remove_network(args.workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--rate", default="", help="e.g. 100mbit: over tbf-limited links in namespaces (as root)")
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)  # a worker of --rate
    args = parser.parse_args()
    if args.rate and args.rank is None:
        over_slow_links(args)
    elif args.rate:
        worker(args.rank, args.workers, PORT, args, addr="10.77.0.1")
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(args.workers, port, args), nprocs=args.workers, join=True)


if __name__ == "__main__":
    main()
