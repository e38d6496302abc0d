"""DiLoCo's outer optimizer at the round (issue 18, optional part) against a reference that is torch.optim.SGD
itself: a global copy of the model steps with Nesterov momentum on the outer gradient anchor - average; outer lr 1
and momentum 0 are Algorithm 1 bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_bitwise_equal, assert_workers_close, batches, mlp
from reference import ReferenceWorkers

import prsgd

N, STEPS = 4, 13


class DiLoCoReference(ReferenceWorkers):
    """Algorithm 1's per-worker loop (tests/reference.py); after each round the global model takes one
    torch.optim.SGD step (Nesterov when momentum > 0) with gradient = global parameters - the workers' average, and
    every worker continues from the global parameters."""

    def __init__(self, model, num_workers, *, outer_lr, outer_momentum, **kw):
        super().__init__(model, num_workers, **kw)
        self.global_model = copy.deepcopy(model)
        self.outer = torch.optim.SGD(
            self.global_model.parameters(), lr=outer_lr, momentum=outer_momentum, nesterov=outer_momentum > 0
        )

    def step(self, inputs, targets, loss_fn):
        losses = super().step(inputs, targets, loss_fn)
        if self.t % self.period == 0:
            with torch.no_grad():
                for g, averaged in zip(self.global_model.parameters(), self.models[0].parameters(), strict=True):
                    g.grad = g.detach() - averaged
                self.outer.step()
                for model in self.models:
                    for p, g in zip(model.parameters(), self.global_model.parameters(), strict=True):
                        p.copy_(g)
        return losses


@pytest.mark.parametrize(("outer_lr", "outer_momentum"), [(0.7, 0.9), (1.3, 0.0), (1.0, 0.5)])
def test_outer_step_matches_torch_sgd_on_the_averaged_change(outer_lr, outer_momentum):
    kw = dict(lr=0.1, momentum=0.9, period=3)
    model = mlp(batchnorm=True)
    sim = prsgd.Simulator(model, num_workers=N, outer_lr=outer_lr, outer_momentum=outer_momentum, **kw)
    ref = DiLoCoReference(model, N, outer_lr=outer_lr, outer_momentum=outer_momentum, **kw)
    for t, (x, y) in enumerate(batches(N, STEPS)):
        sim.step(x, y, F.cross_entropy)
        ref.step(x, y, F.cross_entropy)
        assert_workers_close(sim, ref, t)


@pytest.mark.parametrize("compression", [None, "bf16"])
def test_outer_lr_1_and_momentum_0_are_algorithm_1_bit_for_bit(compression):
    kw = dict(num_workers=N, lr=0.1, momentum=0.9, period=2, compression=compression)
    plain = prsgd.Simulator(mlp(batchnorm=True), **kw)
    outer = prsgd.Simulator(mlp(batchnorm=True), outer_lr=1.0, outer_momentum=0.0, **kw)
    assert outer.algorithm.outer is not None
    for x, y in batches(N, 9):
        plain.step(x, y, F.cross_entropy)
        outer.step(x, y, F.cross_entropy)
        assert_bitwise_equal(plain, outer)


def test_the_outer_state_survives_a_checkpoint():
    kw = dict(num_workers=N, lr=0.1, momentum=0.9, period=2, outer_lr=0.7, outer_momentum=0.9, compression="bf16")
    data = batches(N, 10)
    whole = prsgd.Simulator(mlp(), **kw)
    for x, y in data:
        whole.step(x, y, F.cross_entropy)
    first = prsgd.Simulator(mlp(), **kw)
    for x, y in data[:5]:
        first.step(x, y, F.cross_entropy)
    second = prsgd.Simulator(mlp(), **kw)
    second.load_state_dict(first.state_dict())
    for x, y in data[5:]:
        second.step(x, y, F.cross_entropy)
    for name, p in whole.params().items():
        assert torch.equal(second.params()[name], p), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(outer_lr=0.0), r"outer_lr=0.0 is not allowed; it must be > 0"),
        (dict(outer_momentum=1.0), r"outer_momentum=1.0 is not allowed; it must be in \[0, 1\)"),
        (dict(outer_lr=0.7, sync="gradients"), r"outer_lr=0.7 changes averaging rounds; sync='gradients'"),
        (dict(outer_lr=0.7, overlap=1), r"outer_lr/outer_momentum with overlap=1 is not supported"),
    ],
)
def test_bad_outer_settings_are_refused(kwargs, message):
    with pytest.raises(prsgd.InvalidArgument, match=message):
        prsgd.Simulator(mlp(), num_workers=N, lr=0.1, momentum=0.9, period=2, **kwargs)
