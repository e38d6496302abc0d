"""Small models and deterministic per-worker data shared by the tests."""

from __future__ import annotations

import os
import socket
import sys

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


def leave_after_success() -> None:
    """End a spawned gloo worker whose results are written: exit now, without Python's finalization. Gloo's threads
    and DDP's reducer are torn down by C++ destructors at interpreter exit, and about one spawned worker in a hundred
    aborted there ("terminate called without an active exception") after its results were saved; that is PyTorch's
    teardown, not the test's subject. Called only on success, so a failing worker still reports its error."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torchrun_command(workers: int, *args: str, torchrun_args: tuple[str, ...] = ()) -> list[str]:
    """``python -m torch.distributed.run`` on loopback with a free port (or ``--standalone``: c10d rendezvous, which
    starts each restart attempt with fresh keys), running ``python -m prsgd.train ARGS``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(workers)]
    if "--standalone" not in torchrun_args:
        launcher += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    return [*launcher, *torchrun_args, "-m", "prsgd.train", *args]


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


def step_and_check_equation_10(sim, x, y, lr, beta, nesterov):
    """One simulator step, checking that the node averages follow eq. (10) exactly (Nesterov: the x update uses
    beta * u_bar + g_bar), with the G_i computed independently by :func:`per_worker_gradients`."""
    params, momentum = sim.params(), sim.momentum()
    grads = per_worker_gradients(params, x, y)
    sim.step(x, y, F.cross_entropy)
    for n in params:
        g_bar = grads[n].mean(0)
        u_bar = beta * momentum[n].mean(0) + g_bar
        direction = beta * u_bar + g_bar if nesterov else u_bar
        torch.testing.assert_close(sim.momentum()[n].mean(0), u_bar, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sim.params()[n].mean(0), params[n].mean(0) - lr * direction, rtol=1e-5, atol=1e-6)


def assert_bitwise_equal(a, b, step=None):
    """Two simulators hold exactly the same parameters, momentum buffers and model buffers."""
    for get in ("params", "momentum", "buffers"):
        for name, value in getattr(a, get)().items():
            assert torch.equal(getattr(b, get)()[name], value), (step, get, name)


def assert_workers_close(sim, ref, step):
    """A simulator's workers hold a reference's parameters and momentum buffers (to float noise)."""
    for name, p in ref.params().items():
        torch.testing.assert_close(sim.params()[name], p, rtol=1e-5, atol=1e-6, msg=f"step {step} {name}")
    for name, m in ref.momentum().items():
        torch.testing.assert_close(sim.momentum()[name], m, rtol=1e-5, atol=1e-6, msg=f"step {step} {name}")


LOG_FIELDS = {
    "joint_epoch",
    "step",
    "lr",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "wall_clock",
    "comm_rounds",
    "comm_bytes",
    "comm_peak_step_bytes",
    "consensus_distance",
    "state_spread",
}
"""The documented fields of one log.jsonl record."""
