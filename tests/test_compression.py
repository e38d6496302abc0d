"""Compressed averaging rounds (issues 18, 28) against a per-worker reference written here: the change since the last
round sent in bf16/fp16/int8 with error feedback; exact consensus after every round; bytes counted exactly; the
drift from exact rounds over 1000 rounds for every codec (int4 and top-k: also tests/test_low_bit.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import batches, mlp
from reference import low, round_tensors

import prsgd
from prsgd.algorithm.compression import CompressedRounds
from prsgd.engines.stacked import StackedCommunicator

N, STEPS = 4, 17


class CompressedReference:
    """N models, each with its own torch.optim.SGD; every ``period`` steps each worker lays out what the round
    sends as one vector (its tensors flattened, in order), sends low(x_i - anchor + r_i), keeps what rounding left
    out in r_i, and all set x = anchor = anchor + low(mean + e), e keeping what rounding the mean left out."""

    def __init__(self, model, codec, *, lr, momentum, period, sync):
        self.models = [copy.deepcopy(model) for _ in range(N)]
        self.opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum) for m in self.models]
        self.codec, self.period, self.sync, self.t = codec, period, sync, 0
        start = [p.detach().clone() for p in model.parameters()]  # x^0; momentum starts at 0 (the MLP has no buffers)
        anchor = start + ([torch.zeros_like(p) for p in start] if sync == "params_and_momentum" else [])
        self.shapes = [a.shape for a in anchor]
        self.anchor = torch.cat([a.reshape(-1) for a in anchor])
        self.residual = [torch.zeros_like(self.anchor) for _ in range(N)]
        self.mean_residual = torch.zeros(-(-self.anchor.numel() // 256) * 256 if codec == "int8" else len(self.anchor))

    def _tensors(self, i):
        return round_tensors(self.models[i], self.opts[i], self.sync)

    def step(self, x, y):
        for i, (model, opt) in enumerate(zip(self.models, self.opts, strict=True)):
            opt.zero_grad()
            F.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
        self.t += 1
        if self.t % self.period:
            return
        with torch.no_grad():
            sent = []
            for i in range(N):
                delta = torch.cat([t.reshape(-1) for t in self._tensors(i)]) - self.anchor + self.residual[i]
                sent.append(low(self.codec, delta))
                self.residual[i] = delta - sent[-1]
            n = self.anchor.numel()
            exact = torch.zeros_like(self.mean_residual)
            for i in range(N):  # summed in worker order, in fp32
                exact[:n] += sent[i]
            exact = exact / N + self.mean_residual
            mean = low(self.codec, exact)
            self.mean_residual = exact - mean
            self.anchor = self.anchor + mean[:n]
            for i in range(N):
                for t, piece in zip(self._tensors(i), self.anchor.split([s.numel() for s in self.shapes]), strict=True):
                    t.copy_(piece.view_as(t))
            if self.sync == "params_clear_momentum":
                for opt in self.opts:
                    for state in opt.state.values():
                        state["momentum_buffer"].zero_()

    def params(self):
        names = [n for n, _ in self.models[0].named_parameters()]
        return {n: torch.stack([dict(m.named_parameters())[n].detach() for m in self.models]) for n in names}


@pytest.mark.parametrize("codec", ["bf16", "fp16", "int8"])
@pytest.mark.parametrize("sync", ["params_and_momentum", "params_clear_momentum", "params_only"])
def test_compressed_rounds_match_the_per_worker_reference_and_end_in_exact_consensus(codec, sync):
    kw = dict(lr=0.1, momentum=0.9, period=3, sync=sync)
    model = mlp()
    sim = prsgd.Simulator(model, num_workers=N, compression=codec, **kw)
    ref = CompressedReference(model, codec, **kw)
    for t, (x, y) in enumerate(batches(N, STEPS)):
        sim.step(x, y, F.cross_entropy)
        ref.step(x, y)
        for name, p in ref.params().items():
            torch.testing.assert_close(sim.params()[name], p, rtol=1e-5, atol=1e-6, msg=f"step {t} {name}")
        if (t + 1) % 3 == 0:  # right after a round every worker holds bitwise the same values
            state = [*sim.params().values(), *(sim.momentum().values() if sync == "params_and_momentum" else [])]
            assert all(torch.equal(s, s[:1].expand_as(s)) for s in state)
    values = sum(p[0].numel() for p in sim.params().values()) * (2 if sync == "params_and_momentum" else 1)
    per_round = 2 * values if codec != "int8" else -(-values // 256) * 260  # int8: 256 bytes + a 4-byte scale
    assert (sim.comm.rounds, sim.comm.bytes) == (STEPS // 3, STEPS // 3 * per_round)


def test_bf16_round_of_params_and_momentum_sends_one_fp32_gradients_bytes():
    kw = dict(lr=0.1, momentum=0.9, period=1, sync="params_and_momentum")
    exact, compressed = (prsgd.Simulator(mlp(), num_workers=N, compression=c, **kw) for c in (None, "bf16"))
    for x, y in batches(N, 2):
        exact.step(x, y, F.cross_entropy)
        compressed.step(x, y, F.cross_entropy)
    gradient_bytes = sum(p[0].numel() * 4 for p in exact.params().values())
    assert compressed.comm.bytes == 2 * gradient_bytes == exact.comm.bytes // 2


def without_feedback(codec, change):
    """What sending each worker's change in ``codec`` without error feedback applies: the mean of what is sent,
    rounded again as the exchange does (top-k: the mean of the selections, exact)."""
    mean = torch.stack([low(codec, row) for row in change]).mean(0)
    return mean if codec.startswith("topk") else low(codec, mean)


@pytest.mark.parametrize(
    ("codec", "bound"), [("bf16", 2.0**-8), ("int8", 1 / 127), ("int4", 1 / 7), ("topk:0.01", 8.0)]
)
def test_error_feedback_keeps_the_drift_from_exact_rounds_bounded_over_1000_rounds(codec, bound):
    """1000 rounds of random changes with a common drift: with error feedback the compressed anchor stays within
    ``bound`` times the largest change of the exact fp32 average (one rounding step: a bf16 ulp, an int8 or int4
    group's scale; top-k 1%: what is not sent waits a few rounds, measured about 4), while without it the drift
    grows as a random walk (rounding) or by the 99% of the common drift that top-k drops."""
    g = torch.Generator().manual_seed(0)
    x = torch.ones(N, 512)
    engine = StackedCommunicator(N, params=[x], buffers=[], state=[])
    rounds = CompressedRounds(codec)
    rounds.restart([x])
    exact, without = x[0].clone(), x[0].clone()
    largest = 0.0
    for _ in range(1000):
        change = 1e-3 * (torch.randn(N, 512, generator=g) + 0.3)
        largest = max(largest, change.abs().max().item())
        x.add_(change)
        exact += change.mean(0)
        without += without_feedback(codec, change)
        rounds.round([x], engine)
        assert torch.equal(x, x[:1].expand_as(x))  # exact consensus after every round
    drift, drift_without = (x[0] - exact).abs().max().item(), (without - exact).abs().max().item()
    print(
        f"\n1000 {codec} rounds: |compressed - exact| = {drift / largest:.3f} x the largest change, "
        f"{drift_without / largest:.3f} without feedback"
    )
    assert drift <= bound * largest < drift_without


@pytest.mark.parametrize(
    ("codec", "group", "group_bytes", "low", "high"),
    [("int8", 256, 256 + 4, 0.25, 0.255), ("int4", 128, 64 + 4, 0.0, 1 / 7)],
    ids=["int8: a quarter of fp32 and a scale per 256", "int4: an eighth of fp32 and a scale per 128"],
)
def test_integer_codecs_send_their_bits_plus_a_scale_per_group(codec, group, group_bytes, low, high):
    kw = dict(lr=0.1, momentum=0.9, period=1)
    exact, coded = (prsgd.Simulator(mlp(hidden=1000), num_workers=N, compression=c, **kw) for c in (None, codec))
    for x, y in batches(N, 2):
        exact.step(x, y, F.cross_entropy)
        coded.step(x, y, F.cross_entropy)
    values = exact.comm.bytes // exact.comm.rounds // 4
    assert coded.comm.bytes // coded.comm.rounds == -(-values // group) * group_bytes
    assert low < coded.comm.bytes / exact.comm.bytes < high


def test_compression_is_refused_where_there_is_no_averaging_round():
    with pytest.raises(
        prsgd.InvalidArgument, match=r"compression='bf16' changes averaging rounds; sync='gossip' has none"
    ):
        prsgd.Simulator(mlp(), num_workers=N, lr=0.1, sync="gossip", topology="ring", compression="bf16")
    with pytest.raises(prsgd.InvalidArgument, match=r"compression='int3' is not known; allowed: None, bf16, fp16, i"):
        prsgd.LocalSGD(mlp(), lr=0.1, compression="int3")


def test_a_compressed_simulator_resumes_bit_identically():
    kw = dict(lr=0.1, momentum=0.9, period=3, compression="bf16")
    steps = batches(N, 12)
    straight = prsgd.Simulator(mlp(), num_workers=N, **kw)
    for x, y in steps:
        straight.step(x, y, F.cross_entropy)
    first = prsgd.Simulator(mlp(), num_workers=N, **kw)
    for x, y in steps[:7]:
        first.step(x, y, F.cross_entropy)
    resumed = prsgd.Simulator(mlp(seed=5), num_workers=N, **kw)
    resumed.load_state_dict(first.state_dict())
    for x, y in steps[7:]:
        resumed.step(x, y, F.cross_entropy)
    for name, p in straight.params().items():
        assert torch.equal(p, resumed.params()[name]), name


def test_prsgd_train_with_compression_sends_half_the_bytes_and_resumes(tmp_path):
    from prsgd.train import main

    flags = ["--dataset", "digits", "--model", "mlp", "--hidden", "16", "--workers", "4", "--period", "4"]
    flags += ["--evals", "2", "--no-progress"]
    main([*flags, "--epochs", "1", "--out", str(tmp_path / "exact")])
    main([*flags, "--epochs", "1", "--compression", "bf16", "--out", str(tmp_path / "bf16")])
    main([*flags, "--epochs", "2", "--compression", "bf16", "--out", str(tmp_path / "bf16"), "--resume"])
    main([*flags, "--epochs", "2", "--compression", "bf16", "--out", str(tmp_path / "straight")])

    def final(name):
        return json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[-1])

    exact, resumed, straight = final("exact"), final("bf16"), final("straight")
    per_round = exact["comm_bytes"] // exact["comm_rounds"]
    assert resumed["comm_bytes"] == straight["comm_bytes"] == straight["comm_rounds"] * per_round // 2
    assert resumed["train_loss"] == straight["train_loss"] and resumed["test_loss"] == straight["test_loss"]


@pytest.mark.parametrize("from_consensus", [False, True])
def test_local_sgd_resumes_compressed_rounds_the_same_whichever_is_loaded_first(from_consensus):
    """The compressed rounds' anchor restarts from the loaded values at the next forward pass, so loading the
    optimizer before the model (from_consensus, or a state saved without compression) is no different."""
    data = batches(1, 8)

    def train(model, opt, steps):
        for x, y in steps:
            opt.zero_grad()
            F.cross_entropy(model(x[0]), y[0]).backward()
            opt.step()

    model = mlp(batchnorm=True)
    opt = prsgd.LocalSGD(model, 0.1, momentum=0.9, period=2, compression="bf16")
    train(model, opt, data[:4])  # a round after step 4: in consensus
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    if not from_consensus:
        saved_opt["prsgd"].pop("compression")  # a state of a run without compression: the rounds start afresh
    finals = []
    for model_first in (True, False):
        model = mlp(seed=7, batchnorm=True)  # other values until loaded
        opt = prsgd.LocalSGD(model, 0.1, momentum=0.9, period=2, compression="bf16")
        if model_first:
            model.load_state_dict(saved_model)
        opt.load_state_dict(saved_opt, from_consensus=from_consensus)
        if not model_first:
            model.load_state_dict(saved_model)
        train(model, opt, data[4:])
        finals.append([t.detach().clone() for t in (*model.parameters(), *model.buffers())])
    assert all(torch.equal(a, b) for a, b in zip(*finals, strict=True))
