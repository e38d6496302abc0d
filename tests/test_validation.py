"""Bad input raises ValueError naming the value and what is allowed, before any work is done."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import mlp

import prsgd

BAD = [
    (dict(period=0), r"period=0 .*integer >= 1"),
    (dict(period=2.5), r"period=2\.5 .*integer >= 1"),
    (dict(lr=0.0), r"lr=0\.0 .*> 0"),
    (dict(lr=-1.0), r"lr=-1\.0 .*> 0"),
    (dict(lr=float("nan")), r"lr=nan .*finite"),
    (dict(momentum=1.0), r"momentum=1\.0 .*\[0, 1\)"),
    (dict(momentum=-0.1), r"momentum=-0\.1 .*\[0, 1\)"),
    (dict(momentum=0.0, nesterov=True), r"nesterov=True needs momentum > 0"),
    (dict(weight_decay=-1e-4), r"weight_decay=-0\.0001 .*>= 0"),
    (dict(sync="average"), r"sync='average' .*allowed: params_and_momentum, params_clear_momentum"),
]


@pytest.mark.parametrize(("bad", "message"), BAD)
@pytest.mark.parametrize("engine", ["simulator", "local_sgd"])
def test_bad_hyperparameters_are_rejected_with_a_clear_message(engine, bad, message):
    kw = dict(lr=0.1, momentum=0.9) | bad
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        if engine == "simulator":
            prsgd.Simulator(model, num_workers=2, **kw)
        else:
            prsgd.LocalSGD(model, **kw)
    for b, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(b, p)


@pytest.mark.parametrize("num_workers", [0, -3, 2.0, True])
def test_bad_num_workers(num_workers):
    with pytest.raises(ValueError, match=rf"num_workers={num_workers!r} .*integer >= 1"):
        prsgd.Simulator(mlp(), num_workers=num_workers, lr=0.1)


def test_inputs_whose_leading_dimension_is_not_num_workers():
    sim = prsgd.Simulator(mlp(), num_workers=4, lr=0.1, momentum=0.9)
    before = sim.params()
    with pytest.raises(ValueError, match=r"inputs has shape \(3, 8, 6\); .*num_workers=4"):
        sim.step(torch.randn(3, 8, 6), torch.zeros(3, 8, dtype=torch.long), F.cross_entropy)
    with pytest.raises(ValueError, match=r"targets has shape \(8,\); .*num_workers=4"):
        sim.step(torch.randn(4, 8, 6), torch.zeros(8, dtype=torch.long), F.cross_entropy)
    assert sim.steps_done == 0 and sim.comm.rounds == 0
    for n, p in sim.params().items():
        assert torch.equal(p, before[n])


def test_param_groups_with_a_bad_lr_are_rejected():
    model = mlp()
    with pytest.raises(ValueError, match=r"lr=-0\.5"):
        prsgd.LocalSGD([{"params": model[0].parameters(), "lr": -0.5}, {"params": model[2].parameters()}], lr=0.1)


def test_mixed_dtypes_cannot_share_one_flat_buffer():
    model = mlp()
    model[2].double()
    with pytest.raises(ValueError, match=r"one dtype and device.*float32.*float64"):
        prsgd.LocalSGD(model, lr=0.1)


def test_lr_scheduler_changes_are_validated_at_step():
    model = mlp()
    opt = prsgd.LocalSGD(model, lr=0.1, momentum=0.9)
    opt.param_groups[0]["lr"] = -1.0
    F.cross_entropy(model(torch.randn(2, 6)), torch.tensor([0, 1])).backward()
    with pytest.raises(ValueError, match=r"lr=-1\.0 is not allowed; the learning rate must be >= 0"):
        opt.step()
    # 0 is where cosine annealing ends (torch.optim.SGD takes it too): the step leaves the parameters alone
    opt.param_groups[0]["lr"] = 0.0
    before = [p.clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
