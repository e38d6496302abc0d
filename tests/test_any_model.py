"""The simulator for models beyond one-tensor MLPs and CNNs, against the independent per-worker loop: tied
(shared) parameters, tuple and dict inputs, torch's learning-rate schedulers, and the errors a user meets first."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from reference import ReferenceWorkers
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

import prsgd

N, STEPS, VOCAB = 3, 9, 13
KW = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, period=3, sync="params_and_momentum")


class TiedLanguageModel(nn.Module):
    """Predicts the next token from a window: an embedding tied to the output layer, as most language models."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.mid = nn.Linear(d, d)
        self.out = nn.Linear(d, VOCAB, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mid(self.emb(tokens))).mean(1))


class MaskedPool(nn.Module):
    """Two tensor inputs (features and a mask) and a plain-number keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 4)

    def forward(self, x, mask, scale=1.0):
        h = torch.tanh(self.proj(x)) * mask.unsqueeze(-1)
        return scale * h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


def tokens(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (N, 6, 5), generator=g), torch.randint(0, VOCAB, (N, 6), generator=g)


def assert_same(sim, ref, rtol=1e-5, atol=1e-6):
    for name, p in ref.params().items():
        torch.testing.assert_close(sim.params()[name], p, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("compute", ["vmap", "loop"])
def test_tied_embedding_and_output_weights_match_the_per_worker_loop(compute):
    torch.manual_seed(0)
    model = TiedLanguageModel()
    sim = prsgd.Simulator(model, num_workers=N, compute=compute, **KW)
    ref = ReferenceWorkers(model, N, **KW)
    assert set(sim.params()) == {"emb.weight", "mid.weight", "mid.bias"}  # the shared tensor is stacked once
    for step in range(STEPS):
        x, y = tokens(step)
        torch.testing.assert_close(
            sim.step(x, y, F.cross_entropy), ref.step(x, y, F.cross_entropy), rtol=1e-5, atol=1e-6
        )
        assert_same(sim, ref)
    averaged = sim.averaged_model()
    assert averaged.out.weight is averaged.emb.weight  # the tie survives
    torch.testing.assert_close(averaged.emb.weight, ref.params()["emb.weight"].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compute", ["vmap", "loop"])
@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_tuple_and_dict_inputs_match_the_per_worker_loop(compute, form):
    torch.manual_seed(0)
    model = MaskedPool()
    sim = prsgd.Simulator(model, num_workers=N, compute=compute, **KW)
    ref = ReferenceWorkers(model, N, **KW)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, mask = torch.randn(N, 6, 7, 5, generator=g), (torch.rand(N, 6, 7, generator=g) > 0.3).float()
        y = torch.randint(0, 4, (N, 6), generator=g)
        inputs = (x, mask, 2.0) if form == "tuple" else {"x": x, "mask": mask, "scale": 2.0}
        torch.testing.assert_close(
            sim.step(inputs, y, F.cross_entropy), ref.step(inputs, y, F.cross_entropy), rtol=1e-5, atol=1e-6
        )
        assert_same(sim, ref)


def schedulers(opt, kind: str):
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=STEPS)  # cycles momentum too


@pytest.mark.parametrize("kind", ["step", "cosine", "one_cycle"])
def test_torch_lr_schedulers_drive_the_simulator_as_they_drive_sgd(kind):
    torch.manual_seed(0)
    model = TiedLanguageModel()
    sim = prsgd.Simulator(model, num_workers=N, **KW)
    ref = ReferenceWorkers(model, N, **KW)
    ours = schedulers(sim, kind)
    theirs = [schedulers(opt, kind) for opt in ref.opts]
    momenta = set()
    for step in range(STEPS):
        x, y = tokens(step)
        sim.step(x, y, F.cross_entropy)
        ref.step(x, y, F.cross_entropy)
        ours.step()
        for s in theirs:
            s.step()
        assert sim.param_groups[0]["lr"] == ref.opts[0].param_groups[0]["lr"]
        momenta.add(sim.hyper.momentum)
        assert_same(sim, ref)
    assert sim.param_groups[0]["lr"] != KW["lr"]  # the schedule did change it
    assert (len(momenta) > 1) == (kind == "one_cycle")


def test_momentum_turned_on_after_construction_is_refused():
    sim = prsgd.Simulator(MaskedPool(), num_workers=N, lr=0.1)
    sim.param_groups[0]["momentum"] = 0.9
    x = torch.randn(N, 2, 3, 5)
    with pytest.raises(prsgd.InvalidArgument, match=r"momentum=0.9 was set after Simulator was built with momentum 0"):
        sim.step((x, torch.ones(N, 2, 3)), torch.zeros(N, 2, dtype=torch.long), F.cross_entropy)
    with pytest.raises(prsgd.InvalidArgument, match="one param group"):
        sim.add_param_group({"params": [torch.zeros(2)]})


def test_inputs_without_the_worker_dimension_are_named():
    sim = prsgd.Simulator(MaskedPool(), num_workers=N, lr=0.1)
    y = torch.zeros(N, 2, dtype=torch.long)
    with pytest.raises(prsgd.InvalidArgument, match=r"inputs\['mask'\] has shape \(2, 3\); its leading dimension"):
        sim.step({"x": torch.randn(N, 2, 3, 5), "mask": torch.ones(2, 3)}, y, F.cross_entropy)
    with pytest.raises(prsgd.InvalidArgument, match=r"inputs is a tuple holding no tensor"):
        sim.step((1.0, 2.0), y, F.cross_entropy)


@pytest.mark.parametrize("compute", ["vmap", "loop"])
def test_inputs_the_model_cannot_take_name_the_shape_it_expects(compute):
    sim = prsgd.Simulator(nn.Sequential(nn.Linear(6, 4)), num_workers=N, lr=0.1, compute=compute)
    with pytest.raises(
        prsgd.InvalidArgument,
        match=r"fails on one worker's batch \(inputs \(8, 5\), targets \(8,\)\); its first layer 0 \(Linear\) takes "
        r"inputs whose last dimension is 6: mat1 and mat2",
    ):
        sim.step(torch.randn(N, 8, 5), torch.zeros(N, 8, dtype=torch.long), F.cross_entropy)
    assert sim.steps_done == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_an_unavailable_device_is_a_clear_error():
    with pytest.raises(prsgd.InvalidArgument, match=r"device='cuda' but this machine has 0 usable CUDA GPU"):
        prsgd.Simulator(MaskedPool(), num_workers=N, lr=0.1, device="cuda")
    with pytest.raises(prsgd.InvalidArgument, match=r"device='gpu' is not a device"):
        prsgd.Simulator(MaskedPool(), num_workers=N, lr=0.1, device="gpu")


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 5, batch_first=True)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


def test_recurrent_nets_loop_by_default_and_vmap_fallback_notices_stay_quiet():
    assert prsgd.Simulator(Recurrent(), num_workers=N, lr=0.1).compute == "loop"
    sim = prsgd.Simulator(Recurrent(), num_workers=N, lr=0.1, compute="vmap")
    x, y = torch.randn(N, 2, 6, 4), torch.zeros(N, 2, dtype=torch.long)
    model = Recurrent()
    params = {k: v.detach().unsqueeze(0).repeat(N, *[1] * v.dim()) for k, v in model.named_parameters()}
    raw = vmap(grad_and_value(lambda p, x: functional_call(model, p, (x,)).sum()))

    def notices(run) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
        return sum("performance drop" in str(w.message) for w in caught)

    assert notices(lambda: raw(params, x)) > 0  # what torch prints for the LSTM under vmap
    assert notices(lambda: sim.step(x, y, F.cross_entropy)) == 0
