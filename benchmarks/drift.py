"""The workers' drift before each round (prsgd.algorithm.drift): what measuring it costs, and how it compares with
the analysis where the constants are known (issue 30).

    .venv/bin/python benchmarks/drift.py [--model resnet20] [--repeats 30] [--seeds 3] [--out runs/drift]

1. LocalSGD, 2 gloo processes on loopback, a ResNet-20-sized model with momentum: the median time of measuring one
   round (each worker's squared norms before it, ||x_bar||^2 after it, one all-reduce of two float64) against the
   round itself (one all-reduce of parameters, buffers and momentum), and a training step with a round at every
   step (period 1, the worst case) with the measurement on and off, in alternating blocks.
2. The simulator, 8 workers of the same model, period 1: steps with the measurement on and off, alternating blocks.
3. NonConvexRegression (known sigma^2 and zeta^2): the consensus distance before each round of Algorithm 1 with
   momentum 0.9, mean +- sd over seeds of each run's mean over its rounds, against
   ``drift_without_curvature`` (the analysis's I sigma^2 and I^2 zeta^2 terms with their exact constants when
   the objectives have no curvature), for several periods and heterogeneities; drawn as ``OUT/drift_vs_period.png``.
"""

from __future__ import annotations

import argparse
import datetime
import socket
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import prsgd
from prsgd.engines.distributed import init_process_group
from prsgd.experiments.problems import NonConvexRegression, drift_without_curvature, run
from prsgd.experiments.report import mean_sd
from prsgd.models import build_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHAPE, CLASSES, BATCH = (3, 32, 32), 10, 16


def timed(fn, repeats: int, barrier: bool = True) -> float:
    """The median seconds of ``fn()`` over ``repeats``, after 3 untimed calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if barrier:
            dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_steps(step, meter, repeats: int, block: int = 3) -> tuple[float, float]:
    """Median seconds per step with the measurement on and off, in alternating blocks of ``block`` steps."""
    on, off = [], []
    for _ in range(repeats):
        for times, state in ((on, True), (off, False)):
            meter.on = state
            start = time.perf_counter()
            for _ in range(block):
                step()
            times.append((time.perf_counter() - start) / block)
    meter.on = True
    return statistics.median(on), statistics.median(off)


def distributed_worker(rank: int, world: int, port: int, args: argparse.Namespace, out: Path) -> None:
    torch.set_num_threads(1)
    init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(args.model, SHAPE, CLASSES)
    opt = prsgd.LocalSGD(model, lr=0.05, momentum=0.9, period=1)
    comm, fields = opt.algorithm.engine, opt.algorithm.rule.round_fields()
    x = torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(rank))
    y = torch.randint(CLASSES, (BATCH,), generator=torch.Generator().manual_seed(rank))

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def measure():
        finish = opt.drift.before_round(comm, opt.steps_done, fields)
        finish()

    step()
    round_s = timed(lambda: comm.average(fields), args.repeats)
    measure_s = timed(measure, args.repeats)
    on, off = paired_steps(step, opt.drift, args.repeats)
    if rank == 0:
        numel = sum(t.numel() for f in fields for t in comm.tensors(f))
        (out / "distributed.txt").write_text(f"{numel} {round_s} {measure_s} {on} {off}")
    dist.destroy_process_group()


def simulator_cost(args: argparse.Namespace) -> tuple[float, float]:
    torch.manual_seed(0)
    workers = 8
    sim = prsgd.Simulator(build_model(args.model, SHAPE, CLASSES), num_workers=workers, lr=0.05, momentum=0.9, period=1)
    x = torch.randn(workers, BATCH, *SHAPE)
    y = torch.randint(CLASSES, (workers, BATCH))
    return paired_steps(lambda: sim.step(x, y, F.cross_entropy), sim.drift, max(args.repeats // 3, 2))


def prediction_table(args: argparse.Namespace) -> list[tuple]:
    lr, beta, workers = 0.002, 0.9, 8
    rows = []
    for zeta in args.zetas:
        for period in args.periods:
            measured = []
            for seed in range(args.seeds):
                problem = NonConvexRegression(workers, zeta=zeta, sigma=1.0, seed=seed)
                result = run(problem, args.rounds * period, lr, momentum=beta, period=period, seed=seed)
                measured.append(float(result.drift.mean()))
            predicted = drift_without_curvature(problem, lr, beta, period)
            rows.append((zeta, period, np.array(measured), predicted, lr * problem.L * period / (1 - beta)))
    return rows


def draw(rows: list[tuple], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for zeta in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == zeta]
        periods = [r[1] for r in mine]
        (line,) = ax.plot(periods, [r[2].mean() for r in mine], "o-", label=f"measured, zeta^2={zeta**2:g}")
        ax.plot(periods, [r[3] for r in mine], "--", color=line.get_color(), label=f"analysis, zeta^2={zeta**2:g}")
    ax.set(xscale="log", yscale="log", xlabel="period I", ylabel="consensus distance before a round")
    ax.set_title("NonConvexRegression, N=8, lr=0.002, momentum 0.9 (dashed: no-curvature prediction)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=400, help="rounds per problem run")
    parser.add_argument("--periods", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--zetas", type=lambda s: [float(v) for v in s.split(",")], default=[0.0, 1.0, 3.0])
    parser.add_argument("--out", type=Path, default=Path("runs/drift"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    mp.spawn(distributed_worker, args=(2, free_port(), args, args.out), nprocs=2, join=True)
    numel, round_s, measure_s, on, off = map(float, (args.out / "distributed.txt").read_text().split())
    sim_on, sim_off = simulator_cost(args)
    print(f"## Cost of measuring drift ({args.model}, {int(numel):,} values per round, torch {torch.__version__})\n")
    print("| engine | round (ms) | measuring it (ms) | measuring / round | step, on (ms) | step, off (ms) | on / off |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| LocalSGD, 2 gloo processes, period 1 | {round_s * 1e3:.2f} | {measure_s * 1e3:.2f} "
        f"| {measure_s / round_s:.3f} | {on * 1e3:.1f} | {off * 1e3:.1f} | {on / off:.3f} |"
    )
    simulated = f"{sim_on * 1e3:.1f} | {sim_off * 1e3:.1f} | {sim_on / sim_off:.3f}"
    print(f"| simulator, 8 workers, period 1 | - | - | - | {simulated} |")

    rows = prediction_table(args)
    print(f"\n## Consensus distance before a round vs the analysis ({args.seeds} seeds, {args.rounds} rounds each)\n")
    print(
        "| zeta^2 | I | gamma L I / (1 - beta) | measured (mean +- sd over seeds) | predicted, no curvature "
        "| measured / predicted |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for zeta, period, measured, predicted, stiffness in rows:
        print(
            f"| {zeta**2:g} | {period} | {stiffness:.2f} | {mean_sd(measured, '.3e')} | {predicted:.3e} "
            f"| {measured.mean() / predicted:.3f} |"
        )
    draw(rows, args.out / "drift_vs_period.png")
    print(f"\n{args.out / 'drift_vs_period.png'}")


if __name__ == "__main__":
    main()
