"""Sparse vs dense gossip mixing in the simulator at N = 64 workers (issue 4).

    .venv/bin/python benchmarks/mixing.py [--workers 64] [--numel 272474] [--repeats 10]

For each sparse built-in graph, times one mixing step x <- W x of a stacked (N, D) float32 tensor (D defaults to
a ResNet-20's parameter count) with prsgd's sparse plan (one gather + weighted add per neighbour slot) and with a
dense N x N matrix product, both measured in this run, and prints the speed-up of sparse over dense.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prsgd.algorithm import topology as T
from prsgd.engines.stacked import StackedMixer


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--numel", type=int, default=272_474)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    n = args.workers
    x = torch.randn(n, args.numel)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={n}, D={args.numel} float32")
    print("| topology | max degree | rho | sparse (ms) | dense (ms) | dense / sparse | auto picks |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in ("ring", "torus", "exponential", "hypercube", "one_peer_exponential"):
        topo = T.make_topology(name, n)
        sparse = StackedMixer(topo, x.device, mode="sparse")
        dense = StackedMixer(topo, x.device, mode="dense")
        auto = StackedMixer(topo, x.device)
        a, b = x.clone(), x.clone()
        sparse([a], 0)
        dense([b], 0)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        t_sparse = median_seconds(lambda s=sparse: s([x], 0), args.repeats)
        t_dense = median_seconds(lambda d=dense: d([x], 0), args.repeats)
        print(
            f"| {topo.name} | {topo.max_degree} | {topo.rho:.4f} | {t_sparse * 1e3:.1f} | {t_dense * 1e3:.1f} "
            f"| {t_dense / t_sparse:.2f}x | {'sparse' if auto._sparse(args.numel) else 'dense'} |"
        )


if __name__ == "__main__":
    main()
