"""Overlapped rounds (issue 18) against a per-worker reference written here: a round started on a snapshot s after
step t is applied after step t + delay as x <- avg(s) + (x - s); delay 0 is Algorithm 1 bit for bit; the node
averages still follow eq. (10); a round in flight survives a checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_bitwise_equal, assert_workers_close, batches, mlp, step_and_check_equation_10
from reference import round_tensors

import prsgd
from prsgd.algorithm.overlap import OverlappedRounds

N, STEPS = 4, 13


class OverlapReference:
    """N models, each with its own torch.optim.SGD. After every ``period``-th step each worker's parameters, float
    buffers and (Algorithm 1) momentum are copied (the snapshot) and their mean over workers is taken; ``delay``
    steps later every worker adds that mean minus its own snapshot to what it holds then."""

    def __init__(self, model, *, lr, momentum, period, delay, sync, nesterov=False):
        self.models = [copy.deepcopy(model) for _ in range(N)]
        self.opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum, nesterov=nesterov) for m in self.models]
        self.period, self.delay, self.sync, self.t = period, delay, sync, 0
        self.pending = None  # (due step, every worker's snapshot, the snapshots' mean)

    def _tensors(self, i):
        return round_tensors(self.models[i], self.opts[i], self.sync)

    def _apply(self):
        _, snapshots, mean = self.pending
        with torch.no_grad():
            for i in range(N):
                for k, x in enumerate(self._tensors(i)):
                    x.copy_(mean[k] + (x - snapshots[i][k]))
            if self.sync == "params_clear_momentum":
                for opt in self.opts:
                    for state in opt.state.values():
                        state["momentum_buffer"].zero_()
        self.pending = None

    def step(self, x, y):
        for i, (model, opt) in enumerate(zip(self.models, self.opts, strict=True)):
            opt.zero_grad()
            F.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
        self.t += 1
        if self.pending is not None and self.pending[0] == self.t:
            self._apply()
        if self.t % self.period == 0:
            with torch.no_grad():
                snapshots = [[t.detach().clone() for t in self._tensors(i)] for i in range(N)]
                mean = [sum(s[k] for s in snapshots) / N for k in range(len(snapshots[0]))]
            self.pending = (self.t + self.delay, snapshots, mean)
            if self.delay == 0:
                self._apply()

    def params(self):
        names = [n for n, _ in self.models[0].named_parameters()]
        return {n: torch.stack([dict(m.named_parameters())[n].detach() for m in self.models]) for n in names}

    def momentum(self):
        return {
            n: torch.stack(
                [
                    opt.state[dict(m.named_parameters())[n]]["momentum_buffer"]
                    for m, opt in zip(self.models, self.opts, strict=True)
                ]
            )
            for n, _ in self.models[0].named_parameters()
        }


@pytest.mark.parametrize(
    ("sync", "period", "delay"),
    [
        ("params_and_momentum", 3, 1),
        ("params_and_momentum", 3, 3),
        ("params_and_momentum", 1, 1),
        ("params_clear_momentum", 4, 2),
        ("params_only", 2, 1),
    ],
)
def test_overlapped_rounds_match_the_per_worker_reference(sync, period, delay):
    kw = dict(lr=0.1, momentum=0.9, period=period, sync=sync)
    model = mlp(batchnorm=True)
    sim = prsgd.Simulator(model, num_workers=N, overlap=delay, **kw)
    ref = OverlapReference(model, delay=delay, **kw)
    for t, (x, y) in enumerate(batches(N, STEPS)):
        sim.step(x, y, F.cross_entropy)
        ref.step(x, y)
        assert_workers_close(sim, ref, t)
        assert not sim.in_consensus  # each worker keeps its own progress
    params = sum(p[0].numel() for p in sim.params().values())
    buffers = sum(b[0].numel() for b in sim.buffers().values() if b.is_floating_point())
    per_round = 4 * (params + buffers + (params if sync == "params_and_momentum" else 0))
    applied = (STEPS - delay) // period  # a round is counted once its exchange is waited for (when applied)
    assert (sim.comm.rounds, sim.comm.bytes) == (applied, applied * per_round)


@pytest.mark.parametrize("compression", [None, "bf16"])
def test_delay_0_is_algorithm_1_bit_for_bit(compression):
    """x <- avg(s) + (x - s) with x = s: the overlapped rule itself (the library's code, delay 0) against plain
    rounds, compared with torch.equal at every step."""
    kw = dict(lr=0.1, momentum=0.9, period=2, compression=compression)
    plain = prsgd.Simulator(mlp(batchnorm=True), num_workers=N, **kw)
    overlapped = prsgd.Simulator(mlp(batchnorm=True), num_workers=N, **kw)
    overlapped.algorithm.overlap = OverlappedRounds(0)
    for x, y in batches(N, 9):
        plain.step(x, y, F.cross_entropy)
        overlapped.step(x, y, F.cross_entropy)
        assert_bitwise_equal(plain, overlapped)
    assert overlapped.comm == plain.comm


@pytest.mark.parametrize("nesterov", [False, True])
def test_node_averages_still_follow_equation_10(nesterov):
    """With exact averaging the mean over workers of avg(s) - s is zero: x_bar and u_bar follow eq. (10) at every
    step, those that start or apply a round included."""
    lr, beta = 0.1, 0.9
    sim = prsgd.Simulator(mlp(), num_workers=N, lr=lr, momentum=beta, nesterov=nesterov, period=3, overlap=2)
    for x, y in batches(N, 10):
        step_and_check_equation_10(sim, x, y, lr, beta, nesterov)


def test_a_round_in_flight_survives_a_checkpoint():
    kw = dict(num_workers=N, lr=0.1, momentum=0.9, period=4, overlap=3, compression="bf16")
    data = batches(N, 12)
    whole = prsgd.Simulator(mlp(), **kw)
    for x, y in data:
        whole.step(x, y, F.cross_entropy)
    first = prsgd.Simulator(mlp(), **kw)
    for x, y in data[:5]:  # the round started after step 4 is applied after step 7
        first.step(x, y, F.cross_entropy)
    state = first.state_dict()
    assert state["prsgd"]["overlap"]["due"] == 7
    second = prsgd.Simulator(mlp(), **kw)
    second.load_state_dict(state)
    for x, y in data[5:]:
        second.step(x, y, F.cross_entropy)
    for name, p in whole.params().items():
        assert torch.equal(second.params()[name], p), name
    assert second.comm == whole.comm
    with pytest.raises(prsgd.CheckpointError, match="an overlapped round in flight"):
        prsgd.Simulator(mlp(), **{**kw, "overlap": False}).load_state_dict(state)


def test_synchronize_applies_the_round_in_flight_then_averages():
    sim = prsgd.Simulator(mlp(), num_workers=N, lr=0.1, momentum=0.9, period=2, overlap=2)
    ref = OverlapReference(mlp(), lr=0.1, momentum=0.9, period=2, delay=2, sync="params_and_momentum")
    for x, y in batches(N, 3):  # a round started after step 2 is in flight
        sim.step(x, y, F.cross_entropy)
        ref.step(x, y)
    ref._apply()
    sim.synchronize()
    assert sim.in_consensus and not sim.algorithm.overlap.in_flight
    for name, p in ref.params().items():
        torch.testing.assert_close(sim.params()[name], p.mean(0, keepdim=True).expand_as(p), rtol=1e-5, atol=1e-6)
        assert torch.equal(sim.params()[name], sim.params()[name][:1].expand_as(p))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(period=2, overlap=3), r"overlap=3 is not allowed with period=2; .* \[0, 2\]"),
        (dict(period=2, overlap=-1), r"overlap=-1"),
        (dict(sync="gossip", topology="ring", overlap=True), r"overlap=True changes averaging rounds; sync='gossip'"),
        (dict(sync="gradients", overlap=1), r"overlap=1 changes averaging rounds; sync='gradients'"),
        (dict(period=4, overlap=1, inner_period=2, nodes=2), r"overlap=1 with inner_period=2 is not supported"),
    ],
)
def test_bad_overlap_is_refused(kwargs, message):
    with pytest.raises(prsgd.InvalidArgument, match=message):
        prsgd.Simulator(mlp(), num_workers=N, lr=0.1, **kwargs)
