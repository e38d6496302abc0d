"""prsgd.LocalSGD's guard rails and public operations in one process (no process group): every misuse that would
train silently wrong raises or warns, naming what was found and what to do."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import batches, mlp

import prsgd


def global_hooks() -> int:
    return len(torch.nn.modules.module._global_forward_pre_hooks)


def one_step(model, opt, seed=1):
    x, y = batches(1, 1, seed=seed)[0]
    opt.zero_grad()
    F.cross_entropy(model(x[0]), y[0]).backward()
    opt.step()


def test_world_size_without_a_process_group_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(prsgd.InvalidArgument, match=r"WORLD_SIZE=2 .* no initialized process group"):
        prsgd.LocalSGD(mlp(), 0.1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    prsgd.LocalSGD(mlp(), 0.1)


@pytest.mark.parametrize("move", ["double", "half", "reassign"])
def test_parameters_moved_out_of_flat_storage_are_refused_before_the_step(move):
    model = mlp(batchnorm=True)
    opt = prsgd.LocalSGD(model, 0.1, momentum=0.9, period=2)
    one_step(model, opt)
    if move == "double":
        model.double()
    elif move == "half":
        model.half()
    else:
        model[0].weight.data = model[0].weight.data.clone()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1, 1)[0]
    opt.zero_grad()
    F.cross_entropy(model(x[0].to(before[0].dtype)), y[0]).backward()
    with pytest.raises(prsgd.InvalidArgument, match=r"no longer lives in its flat storage .*model\.to"):
        opt.step()  # step 2 ends in a round: it would average stale copies
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_parameters_of_a_model_with_buffers_warn_once_and_model_makes_them_seen():
    model = mlp(batchnorm=True)
    opt = prsgd.LocalSGD(model.parameters(), 0.1, momentum=0.9)
    assert opt.model_buffers == []
    with pytest.warns(UserWarning, match=r"float buffers \(1\.running_mean, 1\.running_var\) .* never averaged"):
        one_step(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_step(model, opt, seed=2)  # once only

    model = mlp(batchnorm=True)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    groups = [{"params": decay, "weight_decay": 1e-2}, {"params": no_decay, "weight_decay": 0.0}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = prsgd.LocalSGD(groups, 0.1, momentum=0.9, model=model)
        one_step(model, opt)
    assert [b.data_ptr() for b in opt.model_buffers] == [
        b.data_ptr() for n, b in model.named_buffers() if "running" in n
    ]
    flat = opt.storage.flat
    assert opt.storage.tensors("buffers")[0].data_ptr() == flat[sum(p.numel() for p in model.parameters()) :].data_ptr()


def test_param_groups_with_model_train_like_torch_sgd_with_the_same_groups():
    a, b = mlp(), mlp()

    def groups(model):
        return [
            {"params": [model[0].weight, model[2].weight], "weight_decay": 1e-2},
            {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0, "lr": 0.05},
        ]

    opt_a = prsgd.LocalSGD(groups(a), 0.1, momentum=0.9, model=a, period=3)
    opt_b = torch.optim.SGD(groups(b), 0.1, momentum=0.9)
    for seed in range(5):
        one_step(a, opt_a, seed)
        one_step(b, opt_b, seed)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_model_argument_misuse_is_refused():
    model, other = mlp(), mlp()
    with pytest.raises(prsgd.InvalidArgument, match="pass the model once"):
        prsgd.LocalSGD(model, 0.1, model=model)
    with pytest.raises(prsgd.InvalidArgument, match=r"4 of the 4 parameters .* are not parameters of model="):
        prsgd.LocalSGD(other.parameters(), 0.1, model=model)
    with pytest.raises(prsgd.InvalidArgument, match=r"must be a torch\.nn\.Module"):
        prsgd.LocalSGD(model.parameters(), 0.1, model="model")


def test_lr_is_positional_like_torch_sgd_and_repr_shows_the_algorithm():
    model = mlp()
    opt = prsgd.LocalSGD(model, 0.1, momentum=0.9, period=8)
    assert opt.param_groups[0]["lr"] == 0.1
    text = repr(opt)
    for part in ("sync='params_and_momentum'", "period=8", "topology=None", "workers=1", "rank=0", "lr=0.1"):
        assert part in text
    ring = prsgd.LocalSGD(mlp(), 0.1, momentum=0.9, sync="gossip", topology="ring")
    assert "topology='ring" in repr(ring)


def test_the_forward_check_lives_as_long_as_the_optimizer():
    """It stays after the first step (a model wrapped in DDP later is still refused) and goes with the optimizer."""
    before = global_hooks()
    model = mlp()
    opt = prsgd.LocalSGD(model, 0.1)
    assert global_hooks() == before + 1
    one_step(model, opt)
    assert global_hooks() == before + 1
    del opt
    gc.collect()
    assert global_hooks() == before
    prsgd.LocalSGD(mlp(), 0.1)  # never stepped, dropped at once
    assert global_hooks() == before
