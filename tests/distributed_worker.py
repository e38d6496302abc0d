"""Run by the distributed tests in each spawned gloo process: trains with prsgd.LocalSGD and saves what it saw."""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import batches, leave_after_success, mlp

import prsgd
from prsgd.engines.distributed import init_process_group


def run(rank: int, world_size: int, port: int, out_dir: str, cases: list[dict], steps: int) -> None:
    torch.set_num_threads(1)
    init_process_group(  # prsgd's: torch._dynamo imported first (see its docstring)
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        for index, case in enumerate(cases):
            case = dict(case)
            batchnorm = case.pop("batchnorm", False)
            seed = rank if case.pop("distinct_init", False) else 0
            inf_at = case.pop("inf_at", None)  # (rank, step) whose loss is made inf, under a GradScaler
            no_grad_on = case.pop("no_grad_on", None)  # a rank whose last layer's weight never gets a gradient
            model = mlp(seed=seed, batchnorm=batchnorm)
            opt = prsgd.LocalSGD(model, **case)
            opt.comm.trace = [[]]  # each round's collective, step by step: what prsgd predict's cost model reads
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if inf_at is not None else None
            trajectory, applied, drift = [], [], []
            for t, (x, y) in enumerate(batches(world_size, steps)):
                opt.zero_grad()
                loss = F.cross_entropy(model(x[rank]), y[rank])
                if scaler is None:
                    loss.backward()
                    if no_grad_on == rank:
                        model[-1].weight.grad = None
                    opt.step()
                else:
                    if inf_at == (rank, t):
                        loss = loss * float("inf")
                    before = [p.detach().clone() for p in model.parameters()]
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    applied.append(any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)))
                trajectory.append({n: p.detach().clone() for n, p in model.named_parameters()})
                if opt.drift.latest is not None and opt.drift.latest.step == t + 1:  # measured before this round
                    drift.append(dataclasses.astuple(opt.drift.latest))
            torch.save(
                {
                    "trajectory": trajectory,
                    "buffers": {n: b.clone() for n, b in model.named_buffers()},
                    "momentum": [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
                    if opt.has_momentum and "momentum_buffer" in opt.state[model[0].weight]
                    else [],
                    "state": {  # every tensor the local rule keeps, by torch's names
                        name: {n: opt.state[p][name].clone() for n, p in model.named_parameters()}
                        for name in next(iter(opt.state.values()))
                        if opt.state[model[0].weight][name] is not None
                    },
                    "rounds": opt.comm.rounds,
                    "bytes": opt.comm.bytes,
                    "comm": dataclasses.astuple(opt.comm),
                    "trace": [[dataclasses.astuple(c) for c in step] for step in opt.comm.trace],
                    "steps_done": opt.steps_done,
                    "applied": applied,
                    "drift": drift,
                },
                os.path.join(out_dir, f"case{index}_rank{rank}.pt"),
            )
    finally:
        dist.destroy_process_group()
    leave_after_success()
