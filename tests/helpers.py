"""Small models and deterministic per-worker data shared by the tests."""

from __future__ import annotations

import socket

import torch
import torch.nn.functional as F
from torch import nn


def mlp(seed: int = 0, batchnorm: bool = False, in_dim: int = 6, hidden: int = 16, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.Tanh(), nn.Linear(hidden, classes)]
    return nn.Sequential(*layers)


def batches(num_workers: int, steps: int, batch: int = 8, in_dim: int = 6, classes: int = 4, seed: int = 1):
    """Per-worker batches: a list over steps of (inputs (N, b, in_dim), targets (N, b))."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(num_workers, batch, in_dim, generator=g)
        y = torch.randint(0, classes, (num_workers, batch), generator=g)
        out.append((x, y))
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def per_worker_gradients(params, x, y):
    """G_i: each worker's gradient of cross-entropy at its own parameters, by plain autograd, one model each."""
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(x.shape[0]):
        worker = mlp()
        worker.load_state_dict({n: p[i] for n, p in params.items()})
        gs = torch.autograd.grad(F.cross_entropy(worker(x[i]), y[i]), list(worker.parameters()))
        for (n, _), g in zip(worker.named_parameters(), gs, strict=True):
            grads[n][i] = g
    return grads
