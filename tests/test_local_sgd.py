"""prsgd.LocalSGD in one process: flat storage, the torch.optim.SGD update, state_dict round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import batches, mlp

import prsgd


def train(model, opt, steps, seed=1):
    for x, y in batches(1, steps, seed=seed):
        opt.zero_grad()
        F.cross_entropy(model(x[0]), y[0]).backward()
        opt.step()


@pytest.mark.parametrize("nesterov", [False, True])
def test_single_worker_equals_torch_sgd(nesterov):
    a, b = mlp(), mlp()
    train(a, prsgd.LocalSGD(a, lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=1e-3, period=2), 10)
    train(b, torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=1e-3), 10)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def in_flat_order(opt, tensors):
    """Whether ``tensors`` lie back to back from the start of the optimizer's flat storage, in order."""
    flat, offset = opt.storage.flat, 0
    for t in tensors:
        if t.data_ptr() != flat[offset:].data_ptr() or not t.is_contiguous():
            return False
        offset += t.numel()
    return offset == flat.numel()


def test_parameters_buffers_and_momentum_live_in_one_flat_tensor():
    model = mlp(batchnorm=True)
    opt = prsgd.LocalSGD(model, lr=0.1, momentum=0.9, period=2)
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    momentum = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    everything = [*model.parameters(), *buffers, *momentum]
    assert in_flat_order(opt, everything)
    assert opt.storage.span(("params", "buffers", "state")).data_ptr() == opt.storage.flat.data_ptr()
    train(model, opt, 3)  # the views survive training (no rebinding by autograd or the update)
    assert in_flat_order(opt, everything)
    with pytest.raises(ValueError, match="not one span"):  # a round over fields that are not neighbours
        prsgd.LocalSGD(mlp(), lr=0.1, momentum=0.9, sync="gradients").storage.span(("params", "state"))


def test_momentum_buffers_exist_as_zeros_before_the_first_step():
    model = mlp()
    opt = prsgd.LocalSGD(model, lr=0.1, momentum=0.9)
    for p in model.parameters():
        buf = opt.state[p]["momentum_buffer"]
        assert buf.shape == p.shape and buf.abs().max().item() == 0.0


def test_a_parameter_without_gradient_is_not_updated_and_a_lone_worker_counts_no_traffic():
    model = mlp()
    opt = prsgd.LocalSGD(model, lr=0.1, momentum=0.9, period=1)
    frozen = model[2].weight.detach().clone()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    opt.step()
    opt.synchronize()
    assert torch.equal(model[2].weight, frozen)
    assert not torch.equal(model[0].weight, mlp()[0].weight)
    assert (opt.comm.rounds, opt.comm.bytes) == (0, 0)  # no process group: nothing was sent


def test_state_dict_round_trip_resumes_exactly():
    a = mlp()
    opt_a = prsgd.LocalSGD(a, lr=0.1, momentum=0.9, period=3)
    train(a, opt_a, 4)
    state = {"model": {k: v.clone() for k, v in a.state_dict().items()}, "opt": opt_a.state_dict()}
    train(a, opt_a, 5, seed=7)

    b = mlp(seed=5)
    b.load_state_dict(state["model"])
    opt_b = prsgd.LocalSGD(b, lr=0.1, momentum=0.9, period=3)
    opt_b.load_state_dict(state["opt"])
    assert opt_b.steps_done == 4
    momentum = [opt_b.state[p]["momentum_buffer"] for p in b.parameters()]
    assert in_flat_order(opt_b, [*b.parameters(), *momentum])
    train(b, opt_b, 5, seed=7)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert (opt_a.steps_done, opt_a.comm) == (opt_b.steps_done, opt_b.comm)


def test_add_param_group_after_construction_is_refused():
    model = mlp()
    opt = prsgd.LocalSGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match="add_param_group after construction"):
        opt.add_param_group({"params": model[2].parameters()})
