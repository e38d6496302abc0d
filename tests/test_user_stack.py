"""LocalSGD in 2 real gloo processes next to DDP, GradScaler with clipping, and synchronize(), each against plain
torch (tests/stack_worker.py)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port, mlp
from stack_worker import ADAMW_RESUME_CASES, AMP_CASES, CONSENSUS_CASES, INF_AT, KILL_AT, WRAPPED, WRAPPED_RULES, run

pytestmark = pytest.mark.slow

WORLD = 2


def spawn(scenario: str, tmp_path, steps: int = 6) -> list[dict]:
    mp.spawn(run, args=(WORLD, free_port(), str(tmp_path), scenario, steps), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{scenario}_rank{r}.pt") for r in range(WORLD)]


def test_ddp_wrapping_before_or_after_local_sgd_is_refused(tmp_path):
    for out in spawn("ddp_guards", tmp_path):
        assert "the model is a DistributedDataParallel (at construction)" in out["ddp_then_local_sgd"]
        assert "wrapped in DistributedDataParallel and runs through it" in out["ddp_forward_with_inner_parameters"]
        assert "wrapped in DistributedDataParallel and runs through it" in out["local_sgd_then_ddp"]
        for message in (out["ddp_then_local_sgd"], out["local_sgd_then_ddp"]):
            assert "give it the plain module" in message and "LocalSGDStrategy" in message
        assert out["steps_done_after"] == 1
        assert "wrapped in DistributedDataParallel and runs through it" in out["wrapped_after_three_steps"]


def test_gradient_averaging_equals_ddp_and_averages_batchnorm_statistics(tmp_path):
    """Parameters bit-identical to DDP + torch.optim.SGD at every step (BatchNorm uses batch statistics in
    training); buffers: the mean of what DDP's ranks hold, identical on both ranks (DDP's differ)."""
    ranks = spawn("gradients_vs_ddp", tmp_path)
    for out in ranks:
        for step in out["record"]:
            assert step["params_equal"] and step["in_consensus"]
            for name, b in step["buffers"].items():
                torch.testing.assert_close(b, step["ddp_buffers_mean"][name], rtol=1e-6, atol=1e-7, msg=name)
    for a, b in zip(ranks[0]["record"], ranks[1]["record"], strict=True):
        assert all(torch.equal(a["buffers"][n], b["buffers"][n]) for n in a["buffers"])
    assert ranks[0]["comm"][0] == 6


def test_in_consensus_is_true_exactly_when_all_ranks_are_equal_and_synchronize_averages(tmp_path):
    steps = 13  # period 4: steps 4, 8 and 12 are rounds; 13 is mid-period
    ranks = spawn("consensus", tmp_path, steps=steps)
    for case, outs in zip(CONSENSUS_CASES, zip(*(r["cases"] for r in ranks), strict=True), strict=True):
        for out in outs:
            for step, (claimed, true) in enumerate(out["claims"], start=1):
                assert not claimed or true, f"{case} step {step}: in_consensus but the ranks differ"
                if case["sync"] in ("params_and_momentum", "params_clear_momentum"):
                    assert claimed == (step % 4 == 0), f"{case} step {step}"
                if case["sync"] == "gradients":
                    assert claimed and true
            n_params, n_buffers = out["numels"]
            payload = {"params_and_momentum": 2 * n_params + n_buffers, "gossip": 2 * n_params + n_buffers}
            rounds, sent = out["comm_before"]
            assert out["comm_after"] == (rounds + 1, sent + 4 * payload.get(case["sync"], n_params + n_buffers))
            assert out["params_are_the_mean"]
            expected_equal = case["sync"] != "params_only"  # it keeps each rank's momentum
            assert out["synchronized_equal"] == expected_equal == out["in_consensus_after"], case


def test_grad_scaler_with_unscale_and_clipping_matches_plain_torch_and_keeps_ranks_in_step(tmp_path):
    steps = 7
    ranks = spawn("amp", tmp_path, steps=steps)
    inf_rank, inf_step = INF_AT
    for case, outs in zip(AMP_CASES, zip(*(r["cases"] for r in ranks), strict=True), strict=True):
        for rank, out in enumerate(outs):
            for t, (ours, ref) in enumerate(zip(out["trajectory"], out["ref_trajectory"], strict=True)):
                for p, q in zip(ours, ref, strict=True):
                    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{case} rank {rank} step {t}")
            assert out["steps_done"] == steps
            if case["sync"] == "gradients":  # the averaged gradient is inf on both: both skip that step
                assert out["applied"][inf_step] is False
                assert out["rounds"] == steps
            else:  # only the rank that overflowed skips its local step; rounds still at steps 3 and 6 on both
                assert out["applied"][inf_step] is (rank != inf_rank)
                assert out["rounds"] == steps // case["period"]
        if case["sync"] != "gradients":  # step 6 (index 5) ended with a round: all ranks equal again
            for p, q in zip(outs[0]["trajectory"][5], outs[1]["trajectory"][5], strict=True):
                assert torch.equal(p, q)


def test_adamw_params_only_is_post_local_sgd_and_gradients_is_ddp_bit_for_bit(tmp_path):
    for out in spawn("adamw_vs_pytorch", tmp_path, steps=8):
        assert out["post_local_sgd"] == [True] * 8  # PostLocalSGDOptimizer(AdamW), PeriodicModelAverager
        assert out["ranks_differ_before_a_round"]  # step 8: two steps into a period; the test can fail
        assert out["ddp"] == [True] * 8  # DDP + torch.optim.AdamW


def test_adamw_resumes_bit_for_bit_from_every_kill_point_inside_a_period(tmp_path):
    ranks = spawn("adamw_resume", tmp_path, steps=11)
    for out in ranks:
        assert [(case, kill) for case, kill, _, _ in out["cases"]] == [
            (case, kill) for case in ADAMW_RESUME_CASES for kill in KILL_AT
        ]
        for case, kill, equal, steps_done in out["cases"]:
            assert equal and steps_done == 11, (case, kill)


def test_any_torch_optimizer_instance_averages_all_its_state_in_one_collective_as_written_out_by_hand(tmp_path):
    steps = 8
    ranks = spawn("wrapped_optimizers", tmp_path, steps=steps)
    n_params = sum(p.numel() for p in mlp().parameters())
    kept = {"Adam": 2, "RMSprop": 3}  # exp_avg, exp_avg_sq; square_avg, momentum_buffer, grad_avg
    for out in ranks:
        for name in WRAPPED:
            for sync in WRAPPED_RULES:
                assert out[name, sync]["equal"] == [True] * steps, (name, sync)
                rounds, sent = out[name, sync]["comm"]
                if sync == "gradients":
                    assert rounds == steps and sent == steps * 4 * n_params
                else:  # rounds after steps 3 and 6, each one all-reduce of the parameters and (Alg. 1) the state
                    per_round = n_params * (1 + kept[name] if sync == "params_and_momentum" else 1)
                    assert (rounds, sent) == (2, 2 * 4 * per_round), (name, sync)
            state = out[name, "params_and_momentum"]["state"]  # under the optimizer's own names
            assert "prsgd" in state and len(state["state"]) == 4
            assert out[name, "resumed"], name
