"""The simulator against an independent per-worker loop, and the paper's identities (Algorithm 1)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import batches, mlp, step_and_check_equation_10
from reference import ReferenceWorkers

import prsgd
from prsgd.algorithm import SYNC_RULES

N = 4
ALGORITHM_1_RULES = [name for name, rule in SYNC_RULES.items() if not rule.mixes]  # gossip: test_gossip.py
STEPS = 17


def assert_trajectories_equal(sim, ref, steps):
    for x, y in steps:
        sim_loss = sim.step(x, y, F.cross_entropy)
        ref_loss = ref.step(x, y, F.cross_entropy)
        torch.testing.assert_close(sim_loss, ref_loss, rtol=1e-5, atol=1e-6)
        for name, p in ref.params().items():
            torch.testing.assert_close(sim.params()[name], p, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("sync", "period"),
    # "gradients" and "none" ignore the period: one case each
    [(s, p) for s in ALGORITHM_1_RULES for p in ([1, 3, 8] if SYNC_RULES[s].periodic else [1])],
)
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("nesterov", [False, True], ids=["polyak", "nesterov"])
@pytest.mark.parametrize("compute", ["vmap", "loop"])
def test_simulator_matches_per_worker_sgd_loop(sync, period, weight_decay, nesterov, compute):
    kw = dict(lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay, period=period, sync=sync)
    model = mlp()
    sim = prsgd.Simulator(model, num_workers=N, compute=compute, **kw)
    ref = ReferenceWorkers(model, N, **kw)
    assert_trajectories_equal(sim, ref, batches(N, STEPS))
    if kw["sync"] != "none":
        assert sim.comm.rounds > 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_compiled_vmap_step_matches_per_worker_sgd_loop():
    """compile=True (torch.compile of the vmapped gradient step; one compilation, a few seconds) changes nothing."""
    kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, period=3, sync="params_and_momentum")
    model = mlp()
    sim = prsgd.Simulator(model, num_workers=N, compile=True, **kw)
    assert sim.compute == "vmap"
    assert_trajectories_equal(sim, ReferenceWorkers(model, N, **kw), batches(N, STEPS))
    with pytest.raises(ValueError, match=r"compile=True .*needs compute='vmap' \(got 'loop'\)"):
        prsgd.Simulator(model, num_workers=N, lr=0.1, compute="loop", compile=True)


@pytest.mark.parametrize("sync", ["params_and_momentum", "params_clear_momentum", "params_only"])
@pytest.mark.parametrize("compute", ["vmap", "loop"])
def test_batchnorm_running_statistics_are_averaged_like_the_reference(sync, compute):
    kw = dict(lr=0.05, momentum=0.9, period=3, sync=sync)
    model = mlp(batchnorm=True)
    sim = prsgd.Simulator(model, num_workers=N, compute=compute, **kw)
    ref = ReferenceWorkers(model, N, **kw)
    assert_trajectories_equal(sim, ref, batches(N, 7))  # ends one step after a sync: buffers differ again
    for name, b in ref.buffers().items():
        torch.testing.assert_close(sim.buffers()[name], b, rtol=1e-5, atol=1e-6, msg=name)
    running_mean = sim.buffers()["1.running_mean"]
    assert not torch.allclose(running_mean[0], running_mean[1])  # per-worker statistics between syncs
    sim.step(*batches(N, 1, seed=9)[0], F.cross_entropy)
    sim.step(*batches(N, 1, seed=10)[0], F.cross_entropy)  # step 9: a sync
    running_mean = sim.buffers()["1.running_mean"]
    torch.testing.assert_close(running_mean, running_mean[:1].expand_as(running_mean), rtol=0, atol=0)


@pytest.mark.parametrize("compute", ["vmap", "loop"])
def test_gradient_averaging_averages_batchnorm_statistics_every_step(compute):
    """sync="gradients": BatchNorm statistics are averaged with the gradients at every step, so all workers hold
    the same state after every step (checked against the reference loop, which averages them by hand)."""
    kw = dict(lr=0.05, momentum=0.9, sync="gradients")
    model = mlp(batchnorm=True)
    sim = prsgd.Simulator(model, num_workers=N, compute=compute, **kw)
    ref = ReferenceWorkers(model, N, **kw)
    for x, y in batches(N, 5):
        sim.step(x, y, F.cross_entropy)
        ref.step(x, y, F.cross_entropy)
        for name, b in ref.buffers().items():
            torch.testing.assert_close(sim.buffers()[name], b, rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(b, b[:1].expand_as(b), rtol=0, atol=0)
        assert sim.in_consensus


@pytest.mark.parametrize("sync", ["params_and_momentum", "params_clear_momentum", "params_only", "gossip"])
def test_synchronize_averages_now_and_in_consensus_follows_the_state(sync):
    """synchronize() is one exact round outside the schedule (counted); in_consensus is true exactly when every
    worker's parameters, float buffers and momentum are equal."""
    extra = {"topology": "ring"} if sync == "gossip" else {}
    sim = prsgd.Simulator(mlp(batchnorm=True), num_workers=N, lr=0.05, momentum=0.9, period=4, sync=sync, **extra)

    def all_equal():
        stacks = [*sim.params().values(), *sim.momentum().values()]
        stacks += [b for b in sim.buffers().values() if b.is_floating_point()]
        return all(torch.equal(t, t[:1].expand_as(t)) for t in stacks)

    assert sim.in_consensus and all_equal()
    for x, y in batches(N, 3):
        sim.step(x, y, F.cross_entropy)
        assert not sim.in_consensus and not all_equal()
    rounds, params = sim.comm.rounds, sim.params()
    sim.synchronize()
    assert sim.comm.rounds == rounds + 1
    for name, p in sim.params().items():
        torch.testing.assert_close(p, params[name].mean(0, keepdim=True).expand_as(p), rtol=1e-6, atol=1e-7)
    assert sim.in_consensus == all_equal() == (sync != "params_only")
    sim.step(*batches(N, 1, seed=5)[0], F.cross_entropy)  # step 4: the scheduled round still comes
    assert sim.comm.rounds == rounds + 2 and sim.in_consensus == (
        sync in ("params_and_momentum", "params_clear_momentum")
    )


def test_period_one_params_and_momentum_equals_gradient_averaging():
    """The paper's remark: with I = 1, Algorithm 1 is parallel mini-batch momentum SGD."""
    model = mlp()
    a = prsgd.Simulator(model, num_workers=N, lr=0.1, momentum=0.9, period=1, sync="params_and_momentum")
    b = prsgd.Simulator(model, num_workers=N, lr=0.1, momentum=0.9, sync="gradients")
    for x, y in batches(N, 12):
        a.step(x, y, F.cross_entropy)
        b.step(x, y, F.cross_entropy)
    for name, p in a.params().items():
        torch.testing.assert_close(p, b.params()[name], rtol=1e-5, atol=1e-6)
    assert a.comm.rounds == b.comm.rounds == 12


def test_momentum_zero_is_local_sgd():
    """beta = 0: each worker runs plain SGD and parameters are averaged every I steps."""
    model = mlp()
    period = 4
    sim = prsgd.Simulator(model, num_workers=N, lr=0.2, momentum=0.0, period=period)
    assert sim.momentum() == {}
    params = {n: p.detach().unsqueeze(0).repeat(N, *[1] * p.dim()) for n, p in model.named_parameters()}
    for t, (x, y) in enumerate(batches(N, 9), start=1):
        sim.step(x, y, F.cross_entropy)
        for i in range(N):
            worker = mlp()
            worker.load_state_dict({n: p[i] for n, p in params.items()})
            grads = torch.autograd.grad(F.cross_entropy(worker(x[i]), y[i]), list(worker.parameters()))
            for (n, p), g in zip(worker.named_parameters(), grads, strict=True):
                params[n][i] = p.detach() - 0.2 * g
        if t % period == 0:
            params = {n: p.mean(0, keepdim=True).expand_as(p).clone() for n, p in params.items()}
        for n, p in params.items():
            torch.testing.assert_close(sim.params()[n], p, rtol=1e-5, atol=1e-6)


def test_nesterov_form_5_equals_form_14():
    """PyTorch's Nesterov (5) and the textbook form (14) give the same parameter sequence."""
    model = mlp()
    lr, beta = 0.1, 0.8
    sim = prsgd.Simulator(model, num_workers=1, lr=lr, momentum=beta, nesterov=True)
    x = {n: p.detach().clone() for n, p in model.named_parameters()}
    y_prev = {n: p.clone() for n, p in x.items()}
    for xb, yb in batches(1, 15):
        worker = mlp()
        worker.load_state_dict(x)
        grads = torch.autograd.grad(F.cross_entropy(worker(xb[0]), yb[0]), list(worker.parameters()))
        y_next = {n: x[n] - lr * g for n, g in zip(x, grads, strict=True)}
        x = {n: y_next[n] + beta * (y_next[n] - y_prev[n]) for n in x}
        y_prev = y_next
        sim.step(xb, yb, F.cross_entropy)
        for n, p in x.items():
            torch.testing.assert_close(sim.params()[n][0], p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True], ids=["polyak", "nesterov"])
def test_node_averages_follow_equation_10_at_every_step(nesterov):
    lr, beta = 0.1, 0.9
    sim = prsgd.Simulator(mlp(), num_workers=N, lr=lr, momentum=beta, nesterov=nesterov, period=3)
    for x, y in batches(N, 10):
        step_and_check_equation_10(sim, x, y, lr, beta, nesterov)


@pytest.mark.parametrize(
    ("sync", "expect"),
    [("params_and_momentum", "equal"), ("params_clear_momentum", "zero"), ("params_only", "different")],
)
def test_momentum_buffers_after_a_sync(sync, expect):
    sim = prsgd.Simulator(mlp(), num_workers=N, lr=0.1, momentum=0.9, period=4, sync=sync)
    for x, y in batches(N, 4):
        sim.step(x, y, F.cross_entropy)
    for p in sim.params().values():  # parameters are averaged by all three rules
        torch.testing.assert_close(p, p[:1].expand_as(p), rtol=0, atol=0)
    for m in sim.momentum().values():
        spread = (m - m.mean(0)).abs().max().item()
        if expect == "equal":
            assert spread == 0.0
        elif expect == "zero":
            assert m.abs().max().item() == 0.0
        else:
            assert spread > 1e-4 and m.abs().max().item() > 0


@pytest.mark.parametrize("sync", ALGORITHM_1_RULES)
@pytest.mark.parametrize("period", [1, 3, 5])
def test_comm_counts_rounds_and_exact_bytes(sync, period):
    model = mlp(batchnorm=True)
    n_params = sum(p.numel() for p in model.parameters())
    n_buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    steps = 11
    sim = prsgd.Simulator(model, num_workers=N, lr=0.05, momentum=0.9, period=period, sync=sync)
    for x, y in batches(N, steps):
        sim.step(x, y, F.cross_entropy)
    per_round = {
        "params_and_momentum": 2 * n_params + n_buffers,
        "params_clear_momentum": n_params + n_buffers,
        "params_only": n_params + n_buffers,
        "gradients": n_params + n_buffers,  # BatchNorm statistics travel with the gradients
        "none": 0,
    }[sync]
    rounds = {"gradients": steps, "none": 0}.get(sync, steps // period)
    assert sim.comm.rounds == rounds
    assert sim.comm.bytes == rounds * per_round * 4


def test_averaged_model_holds_node_averages():
    sim = prsgd.Simulator(mlp(batchnorm=True), num_workers=N, lr=0.1, momentum=0.9, period=100)
    for x, y in batches(N, 3):
        sim.step(x, y, F.cross_entropy)
    avg = sim.averaged_model()
    assert not avg.training
    for n, p in avg.named_parameters():
        torch.testing.assert_close(p.detach(), sim.params()[n].mean(0))
    torch.testing.assert_close(avg.get_buffer("1.running_var"), sim.buffers()["1.running_var"].mean(0))


@pytest.mark.parametrize(("compute", "threads"), [("vmap", 1), ("loop", 1), ("loop", 2), ("loop", 3)])
def test_conv_resnet_with_batchnorm_matches_the_reference(compute, threads):
    """A CIFAR ResNet-8 (convolutions, BatchNorm2d, parameter-free shortcuts) on both gradient paths; the loop
    path also with workers computed in 2 threads (3 workers: uneven parts) and one thread per worker."""
    from prsgd.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet8", (3, 8, 8), 5)
    kw = dict(lr=0.05, momentum=0.9, period=2)
    sim = prsgd.Simulator(model, num_workers=3, compute=compute, threads=threads, **kw)
    assert sim.threads == threads
    ref = ReferenceWorkers(model, 3, **kw)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(3, 4, 3, 8, 8, generator=g), torch.randint(0, 5, (3, 4), generator=g)
        torch.testing.assert_close(
            sim.step(x, y, F.cross_entropy), ref.step(x, y, F.cross_entropy), rtol=1e-4, atol=1e-5
        )
    for name, p in ref.params().items():
        torch.testing.assert_close(sim.params()[name], p, rtol=1e-4, atol=1e-5, msg=name)
    for name, b in ref.buffers().items():
        torch.testing.assert_close(sim.buffers()[name], b, rtol=1e-4, atol=1e-5, msg=name)


def test_auto_compute_picks_loop_for_convolutions_on_cpu():
    from prsgd.models import build_model

    cnn = prsgd.Simulator(build_model("cnn", (1, 28, 28), 10), num_workers=8, lr=0.1)
    assert cnn.compute == "loop"
    assert cnn.threads == min(8, torch.get_num_threads())
    dropout = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Dropout(0.5))
    assert prsgd.Simulator(dropout, num_workers=4, lr=0.1).threads == 1  # reproducible random draws
    assert prsgd.Simulator(mlp(), num_workers=8, lr=0.1).threads == 1  # vmap: one call
    with pytest.raises(ValueError, match=r"threads=0 .*>= 1"):
        prsgd.Simulator(cnn._template, num_workers=2, lr=0.1, threads=0)
    with pytest.raises(ValueError, match=r"threads=2 needs compute='loop'"):
        prsgd.Simulator(mlp(), num_workers=2, lr=0.1, compute="vmap", threads=2)
    assert prsgd.Simulator(mlp(), num_workers=2, lr=0.1).compute == "vmap"
    with pytest.raises(ValueError, match=r"compute='jit' is not known"):
        prsgd.Simulator(mlp(), num_workers=2, lr=0.1, compute="jit")
