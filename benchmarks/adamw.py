"""AdamW's cost in prsgd (issue 27): the foreach step against torch's, and the simulator's AdamW transformer against
what a user writes without it.

    .venv/bin/python benchmarks/adamw.py [--workers 4,8] [--width 64] [--repeats 9]

Two tables, each timed in interleaved rounds (median) in one run:
  step       one AdamW step over the GPT's parameters (width ``--step-width``, 4 layers) with fixed gradients:
             prsgd's stateless foreach rule (``adamw_``), ``prsgd.LocalSGD(optimizer="adamw", sync="none")`` (the
             rule plus the engine's bookkeeping), and ``torch.optim.AdamW(foreach=True)``; target: prsgd <= 1.2x
             torch;
  simulator  samples per second of one training step of the byte-level GPT (``--width``, 2 layers, context 64,
             b = 16, AdamW, Algorithm 1 with period 8) for N workers: ``limit`` is ONE model on a batch of N*b,
             ``loop`` N model copies with N torch.optim.AdamW, ``prsgd`` the simulator (eager, its default compute:
             vmap for a transformer) and ``prsgd loop`` (``compute="loop"``); target: prsgd >= 0.8x the faster of
             limit and loop.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from simulator_throughput import interleaved_seconds

import prsgd
from prsgd.algorithm.functional import adamw_
from prsgd.models import GPT

ADAMW = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
CONTEXT, BATCH = 64, 16


def step_seconds(width: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    models = [GPT(width=width, layers=4, context=CONTEXT) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    grads = [torch.randn_like(p) for p in models[0].parameters()]
    for m in models:
        for p, g in zip(m.parameters(), grads, strict=True):
            p.grad = g.clone()
    params = list(models[0].parameters())
    exp_avgs, exp_avg_sqs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    local = prsgd.LocalSGD(models[1], optimizer="adamw", sync="none", **ADAMW)
    theirs = torch.optim.AdamW(models[2].parameters(), foreach=True, **ADAMW)
    with torch.no_grad():
        return interleaved_seconds(
            {
                "prsgd adamw_": lambda: adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, **ADAMW),
                "prsgd LocalSGD": local.step,
                "torch AdamW(foreach)": theirs.step,
            },
            repeats,
        )


def simulator_samples(n: int, width: int, repeats: int) -> tuple[dict[str, float], str]:
    torch.manual_seed(0)
    model = GPT(width=width, layers=2, context=CONTEXT)
    x = torch.randint(0, 256, (n, BATCH, CONTEXT))
    y = torch.randint(0, 256, (n, BATCH, CONTEXT))
    one = copy.deepcopy(model)
    opt = torch.optim.AdamW(one.parameters(), **ADAMW)
    xs, ys = x.reshape(n * BATCH, CONTEXT), y.reshape(n * BATCH, CONTEXT)

    def limit():
        opt.zero_grad()
        F.cross_entropy(one(xs), ys).backward()
        opt.step()

    copies = [copy.deepcopy(model) for _ in range(n)]
    opts = [torch.optim.AdamW(m.parameters(), **ADAMW) for m in copies]

    def loop():
        for i, (m, o) in enumerate(zip(copies, opts, strict=True)):
            o.zero_grad()
            F.cross_entropy(m(x[i]), y[i]).backward()
            o.step()

    sim = prsgd.Simulator(model, num_workers=n, optimizer="adamw", period=8, **ADAMW)
    sim_loop = prsgd.Simulator(model, num_workers=n, optimizer="adamw", period=8, compute="loop", **ADAMW)
    steps = {"limit": limit, "loop": loop, "prsgd": lambda: sim.step(x, y, F.cross_entropy)}
    steps["prsgd loop"] = lambda: sim_loop.step(x, y, F.cross_entropy)
    seconds = interleaved_seconds(steps, repeats)
    return {k: n * BATCH / v for k, v in seconds.items()}, sim.compute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="4,8")
    parser.add_argument("--width", type=int, default=64, help="the simulated GPT's width")
    parser.add_argument("--step-width", type=int, default=256, help="the width of the GPT whose step is timed")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    s = step_seconds(args.step_width, max(args.repeats, 3) * 5)
    torch_s = s["torch AdamW(foreach)"]
    tensors = sum(1 for _ in GPT(width=args.step_width, layers=4).parameters())
    print(f"\nOne AdamW step, GPT width {args.step_width}, 4 layers ({tensors} tensors)")
    print("| step | ms | / torch AdamW(foreach) |")
    print("|---|---:|---:|")
    for name, seconds in s.items():
        print(f"| {name} | {1e3 * seconds:.3f} | {seconds / torch_s:.2f}x |")
    print(f"\nSimulator, byte-level GPT width {args.width}, 2 layers, context {CONTEXT}, b = {BATCH}, AdamW")
    print("| N | limit (samples/s) | loop | prsgd (default) | its compute | / max(limit, loop) | prsgd loop | / max |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|")
    for n in map(int, args.workers.split(",")):
        r, compute = simulator_samples(n, args.width, args.repeats)
        best = max(r["limit"], r["loop"])
        print(
            f"| {n} | {r['limit']:.0f} | {r['loop']:.0f} | {r['prsgd']:.0f} | {compute} | {r['prsgd'] / best:.2f}x "
            f"| {r['prsgd loop']:.0f} | {r['prsgd loop'] / best:.2f}x |"
        )


if __name__ == "__main__":
    main()
