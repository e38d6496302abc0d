"""What the examples share: scikit-learn's digits (offline) as torch datasets, a small MLP with BatchNorm (so that
buffers travel too), the command-line options, and the per-rank state they save for the tests to compare."""

from __future__ import annotations

import argparse
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

import prsgd
from prsgd.data.datasets import load_digits


def options(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=5, help="passes over this rank's share of the data")
    parser.add_argument("--batch-size", type=int, default=32, help="per-rank batch size")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="the local rule")
    parser.add_argument("--momentum", type=float, default=0.9, help="sgd's momentum")
    parser.add_argument("--period", type=int, default=8, help="local steps between rounds (I)")
    parser.add_argument("--sync", default="params_and_momentum", choices=list(prsgd.SYNC_RULES))
    parser.add_argument("--train-size", type=int, default=0, help="use the first N training images (0: all 1438)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="32", choices=["32", "bf16", "fp16"], help="autocast dtype")
    parser.add_argument("--clip", type=float, default=0.0, help="clip the gradient norm to this (0: off)")
    parser.add_argument("--lr-step", type=int, default=0, help="halve the lr every this many steps (0: constant)")
    parser.add_argument("--out", default="", help="folder for each rank's final state (rank-R.pt)")
    parser.add_argument(
        "--round",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a round option of prsgd.RoundSpec (compression=int8, overlap=2, outer_lr=0.7, ...); repeatable",
    )
    return parser


def local_rule(args: argparse.Namespace) -> dict[str, object]:
    """LocalSGD's local-rule keywords: momentum SGD with ``--momentum``, or AdamW (torch's defaults)."""
    return {"momentum": args.momentum} if args.optimizer == "sgd" else {"optimizer": "adamw"}


def round_options(items: list[str]) -> dict[str, object]:
    """``["compression=int8", "overlap=2"]`` -> ``{"compression": "int8", "overlap": 2}`` (numbers as numbers)."""
    options: dict[str, object] = {}
    for item in items:
        key, _, value = item.partition("=")
        for kind in (int, float):
            try:
                options[key] = kind(value)
                break
            except ValueError:
                continue
        else:
            options[key] = value
    return options


def digits(train_size: int = 0) -> tuple[TensorDataset, TensorDataset]:
    data = load_digits()
    n = train_size or len(data.train)
    return (
        TensorDataset(data.train.inputs[:n], data.train.targets[:n]),
        TensorDataset(data.test.inputs, data.test.targets),
    )


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


def autocast(precision: str):
    """The forward's autocast context for ``--precision`` on the CPU."""
    if precision == "32":
        return nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    was_training = model.training
    model.eval()
    inputs, targets = data.tensors
    correct = (model(inputs).argmax(1) == targets).float().mean().item()
    model.train(was_training)
    return correct


def state_tensors(opt: prsgd.LocalSGD) -> list[torch.Tensor]:
    """The optimizer's state, as any torch optimizer keeps it (``opt.state[p][name]``: momentum buffers, or AdamW's
    moments and step), parameter by parameter, name by name."""
    return [
        value
        for group in opt.param_groups
        for p in group["params"]
        for _, value in sorted(opt.state[p].items())
        if isinstance(value, torch.Tensor)
    ]


def momentum_spread(opt: prsgd.LocalSGD) -> float:
    """max |u_r - u_0| over ranks r of the optimizer state (0 when every rank holds the same)."""
    mine = torch.cat([m.reshape(-1) for m in state_tensors(opt)])
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return max((u - every[0]).abs().max().item() for u in every)


def save_state(out: str, rank: int, model: nn.Module, opt: prsgd.LocalSGD, **extra) -> None:
    """This rank's parameters, buffers, optimizer state and counters to OUT/rank-R.pt (for the tests)."""
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    state = {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "momentum": [m.detach().clone() for m in state_tensors(opt)],
        "steps_done": opt.steps_done,
        "comm": (opt.comm.rounds, opt.comm.bytes),
        **extra,
    }
    torch.save(state, os.path.join(out, f"rank-{rank}.pt"))
