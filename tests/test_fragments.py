"""Streaming rounds (issue 28): ``fragments=F`` syncs fragment f of the round f*I/F steps into each period. The
trajectories are checked against tests/reference.py by the option table (tests/test_round_options.py) and on
LocalSGD in gloo (tests/test_distributed.py); here: what each step sends, consensus, checkpoints and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import batches, mlp

import prsgd
from prsgd.algorithm import RoundSpec

N = 4
FLOAT = 4
PARAMS = sum(p.numel() for p in mlp().parameters())


def _run(steps: int = 8, model=None, **options) -> prsgd.Simulator:
    sim = prsgd.Simulator(model or mlp(), num_workers=N, lr=0.1, momentum=0.9, **options)
    for x, y in batches(N, steps):
        sim.step(x, y, F.cross_entropy)
    return sim


def _fragment_values(length: int, fragments: int) -> list[int]:
    return [length * (f + 1) // fragments - length * f // fragments for f in range(fragments)]


@pytest.mark.parametrize("fragments", [2, 4])
def test_each_value_is_sent_once_a_period_and_a_step_sends_one_fragment(fragments):
    whole, streamed = _run(period=4), _run(period=4, fragments=fragments)
    assert streamed.comm.bytes == whole.comm.bytes  # params and momentum, every value once per period
    assert streamed.comm.rounds == whole.comm.rounds * fragments
    per_fragment = [2 * v * FLOAT for v in _fragment_values(PARAMS, fragments)]  # its params and their momentum
    assert streamed.comm.peak_step_bytes == max(per_fragment) <= whole.comm.peak_step_bytes / fragments + 2 * FLOAT


def test_a_fragment_syncs_at_its_offset_in_the_period_and_leaves_the_others_alone():
    """period 4, 2 fragments: after step 2 fragment 1 (the second half of every parameter vector) is averaged and
    the first half is not; after step 4 the reverse."""
    sim = prsgd.Simulator(mlp(), num_workers=N, lr=0.1, momentum=0.9, period=4, fragments=2)
    data = batches(N, 4)
    for x, y in data[:2]:
        sim.step(x, y, F.cross_entropy)
    flat = torch.cat([p.reshape(N, -1) for p in sim.params().values()], dim=1)
    half = PARAMS // 2
    assert torch.equal(flat[:, half:], flat[:1, half:].expand(N, -1))
    assert not torch.equal(flat[:, :half], flat[:1, :half].expand(N, -1))
    assert not sim.in_consensus
    for x, y in data[2:]:
        sim.step(x, y, F.cross_entropy)
    flat = torch.cat([p.reshape(N, -1) for p in sim.params().values()], dim=1)
    assert torch.equal(flat[:, :half], flat[:1, :half].expand(N, -1))
    assert not sim.in_consensus  # fragment 1 moved apart again during steps 3 and 4
    sim.synchronize()
    assert sim.in_consensus


def test_int4_fragments_cut_the_peak_fourfold():
    model = mlp(hidden=300)
    whole = _run(model=model, period=4, compression="int4")
    streamed = _run(model=model, period=4, compression="int4", fragments=4)
    ratio = streamed.comm.peak_step_bytes / whole.comm.peak_step_bytes
    assert ratio <= 0.3 and streamed.comm.bytes <= 1.01 * whole.comm.bytes, ratio


@pytest.mark.parametrize(
    "options",
    [
        dict(period=4, fragments=2, overlap=2, compression="int4"),
        dict(sync="params_only", period=4, fragments=4, overlap=1, compression="topk:0.2"),
        dict(period=4, fragments=2, outer_lr=0.7, outer_momentum=0.9, compression="int8"),
    ],
    ids=["alg1-int4-overlap", "params_only-topk-overlap", "diloco-int8"],
)
def test_a_simulator_resumes_bit_identically_with_a_fragment_in_flight(options):
    kw = dict(num_workers=N, lr=0.1, momentum=0.9, **options)
    data = batches(N, 12)
    whole = prsgd.Simulator(mlp(batchnorm=True), **kw)
    for x, y in data:
        whole.step(x, y, F.cross_entropy)
    for kill in (3, 5):
        first = prsgd.Simulator(mlp(batchnorm=True), **kw)
        for x, y in data[:kill]:
            first.step(x, y, F.cross_entropy)
        state = first.state_dict()
        second = prsgd.Simulator(mlp(seed=3, batchnorm=True), **kw)
        second.load_state_dict(state)
        for x, y in data[kill:]:
            second.step(x, y, F.cross_entropy)
        for name, p in whole.params().items():
            assert torch.equal(second.params()[name], p), (kill, name)
        for name, b in whole.buffers().items():
            assert torch.equal(second.buffers()[name], b), (kill, name)
        assert second.comm == whole.comm


def test_a_checkpoint_with_other_fragments_is_refused_unless_taken_in_consensus():
    sim = _run(steps=3, period=4, fragments=2)
    other = prsgd.Simulator(mlp(), num_workers=N, lr=0.1, momentum=0.9, period=4, fragments=4)
    with pytest.raises(prsgd.CheckpointError, match="saved with fragments=2; this run uses fragments=4"):
        other.load_state_dict(sim.state_dict())
    sim.synchronize()
    other.load_state_dict(sim.state_dict(), from_consensus=True)


def test_one_fragment_is_the_round_itself():
    assert RoundSpec(period=4, fragments=1) == RoundSpec(period=4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(period=4, fragments=3), r"fragments=3 is not allowed with period=4; .* fragments must divide period"),
        (dict(period=4, fragments=0), r"fragments=0"),
        (
            dict(period=4, fragments=2, overlap=3),
            r"overlap=3 is not allowed with fragments=2 and period=4; .* \[0, 2\]",
        ),
        (dict(sync="gradients", fragments=2), r"fragments=2 changes periodic rounds; sync='gradients' has none"),
        (dict(period=4, fragments=2, inner_period=2, nodes=2), r"fragments=2 with inner_period=2 is not supported"),
        (dict(period=4000, fragments=4000), rf"fragments=4000 is more than the {PARAMS} values of the model's"),
    ],
)
def test_bad_fragments_are_refused_with_one_clear_error(options, message):
    with pytest.raises(prsgd.InvalidArgument, match=message):
        prsgd.Simulator(mlp(), num_workers=N, lr=0.1, momentum=0.9, **options)


def test_adamw_refuses_fragments_of_a_state_that_rounds_clear():
    with pytest.raises(prsgd.InvalidArgument, match="restart the step counter"):
        prsgd.Simulator(
            mlp(), num_workers=N, lr=0.01, optimizer="adamw", sync="params_clear_momentum", period=4, fragments=2
        )


def test_prsgd_train_streams_fragments_and_reports_the_peak(tmp_path):
    from prsgd.train import main

    flags = ["--dataset", "digits", "--model", "mlp", "--hidden", "16", "--workers", "4", "--period", "4"]
    flags += ["--evals", "1", "--no-progress", "--epochs", "1"]
    main([*flags, "--out", str(tmp_path / "whole")])
    main([*flags, "--fragments", "4", "--compression", "int4", "--out", str(tmp_path / "streamed")])
    import json

    whole, streamed = (
        json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[-1]) for name in ("whole", "streamed")
    )
    assert streamed["comm_peak_step_bytes"] < 0.05 * whole["comm_peak_step_bytes"]
    assert streamed["comm_rounds"] >= 4 * whole["comm_rounds"] - 4


def test_a_fragment_in_flight_is_applied_to_the_fragment_it_started_on_after_the_period_changes():
    """Saved after step 5 with period 4 and 2 fragments: fragment 0's round (started after step 4) is in flight,
    due after step 6. Resumed with period 8, the schedule would put step 4 in fragment 1: the round must still land
    on fragment 0, so after step 6 (before any other round is applied) both runs hold the same parameters."""
    kw = dict(num_workers=N, lr=0.1, momentum=0.9, fragments=2, overlap=2)
    data = batches(N, 6)
    straight = prsgd.Simulator(mlp(), period=4, **kw)
    for x, y in data:
        straight.step(x, y, F.cross_entropy)
    first = prsgd.Simulator(mlp(), period=4, **kw)
    for x, y in data[:5]:
        first.step(x, y, F.cross_entropy)
    state = first.state_dict()
    assert state["prsgd"]["overlap"]["due"] == 6 and state["prsgd"]["overlap"]["fragment"] == 0
    resumed = prsgd.Simulator(mlp(seed=3), period=8, **kw)
    resumed.load_state_dict(state)
    resumed.step(*data[5], F.cross_entropy)
    for name, p in straight.params().items():
        assert torch.equal(resumed.params()[name], p), name
