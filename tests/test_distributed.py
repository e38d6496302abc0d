"""prsgd.LocalSGD in real gloo process groups (spawned here on 127.0.0.1) against the simulator."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from distributed_worker import run
from helpers import batches, free_port, mlp

import prsgd

STEPS = 9
CASES = [
    dict(lr=0.1, momentum=0.9, period=3, sync="params_and_momentum"),
    dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, period=2, sync="params_and_momentum"),
    dict(lr=0.1, momentum=0.9, period=4, sync="params_clear_momentum"),
    dict(lr=0.1, momentum=0.9, period=3, sync="params_only"),
    dict(lr=0.1, momentum=0.9, sync="gradients"),
    dict(lr=0.1, momentum=0.0, period=2, sync="params_and_momentum"),
    dict(lr=0.05, momentum=0.9, period=3, sync="params_and_momentum", batchnorm=True),
    dict(lr=0.1, momentum=0.9, sync="gossip", topology="ring"),
    dict(lr=0.1, momentum=0.9, nesterov=True, period=2, sync="gossip_params_only", topology="exponential"),
    dict(lr=0.05, momentum=0.9, sync="gossip", topology="one_peer_exponential", batchnorm=True),
    dict(lr=0.1, momentum=0.9, period=3, sync="params_and_momentum", compression="bf16"),
    dict(lr=0.05, momentum=0.9, period=2, sync="params_only", compression="fp16", batchnorm=True),
    dict(lr=0.1, momentum=0.9, period=3, sync="params_and_momentum", overlap=1, batchnorm=True),
    dict(lr=0.1, momentum=0.9, period=2, sync="params_and_momentum", overlap=2, compression="bf16"),
    dict(lr=0.1, momentum=0.9, period=4, sync="params_clear_momentum", overlap=True),
    dict(lr=0.1, momentum=0.9, period=3, sync="params_and_momentum", inner_period=1, nodes=2, batchnorm=True),
    dict(lr=0.1, momentum=0.9, period=4, sync="params_and_momentum", inner_period=2, nodes=2, compression="bf16"),
    dict(lr=0.1, momentum=0.9, period=3, sync="params_and_momentum", compression="int8", batchnorm=True),
    dict(lr=0.1, momentum=0.9, period=2, sync="params_only", overlap=1, compression="int8"),
    dict(lr=0.1, momentum=0.9, period=3, sync="params_and_momentum", outer_lr=0.7, outer_momentum=0.9),
    dict(lr=0.1, momentum=0.9, period=2, compression="bf16", outer_lr=0.7, outer_momentum=0.9, batchnorm=True),
    dict(lr=0.1, momentum=0.9, period=3, sync="params_and_momentum", compression="int4", batchnorm=True),
    dict(lr=0.1, momentum=0.9, period=3, sync="params_and_momentum", compression="topk:0.05", batchnorm=True),
    dict(lr=0.1, momentum=0.9, period=2, sync="params_only", overlap=1, compression="topk:0.1"),
    dict(lr=0.1, momentum=0.9, period=4, sync="params_and_momentum", fragments=4, batchnorm=True),
    dict(lr=0.1, momentum=0.9, period=4, sync="params_clear_momentum", fragments=2, compression="int4", overlap=2),
    dict(lr=0.1, momentum=0.9, period=4, fragments=2, outer_lr=0.7, outer_momentum=0.9, compression="topk:0.2"),
]


def spawn(world_size, cases, tmp_path, steps=STEPS):
    mp.spawn(run, args=(world_size, free_port(), str(tmp_path), cases, steps), nprocs=world_size, join=True)
    return [[torch.load(tmp_path / f"case{c}_rank{r}.pt") for r in range(world_size)] for c in range(len(cases))]


@pytest.mark.parametrize("world_size", [2, 4])
def test_local_sgd_in_gloo_processes_matches_the_simulator(world_size, tmp_path):
    results = spawn(world_size, CASES, tmp_path)
    for case, ranks in zip(CASES, results, strict=True):
        assert_ranks_match_the_simulator(case, ranks, world_size)


ATOLS = {None: 1e-6, "fp16": 2e-5, "bf16": 1e-4, "int8": 1e-3}


def assert_drift_matches_the_simulator(case, ranks, simulated):
    """LocalSGD measures the consensus distance (mean_i ||x_i||^2 - ||x_bar||^2 around the round) at the rounds that
    average exactly; the simulator (the variance over its stacked workers) at every round of every rule. Where
    LocalSGD measures, both give the same numbers at the same steps, on every rank."""
    exact = case.get("sync", "params_and_momentum") in ("params_and_momentum", "params_clear_momentum", "params_only")
    exact = exact and not any(case.get(k) for k in ("compression", "overlap", "fragments"))
    for saved in ranks:
        if not exact:
            assert saved["drift"] == [], case  # never an estimate where the round does not form x_bar
            continue
        assert [d[0] for d in saved["drift"]] == [d[0] for d in simulated] != [], case
        for (_, distance, spread), (_, expected, expected_spread) in zip(saved["drift"], simulated, strict=True):
            assert distance == pytest.approx(expected, rel=1e-3, abs=1e-7), case
            assert expected > 0
            # the state's spread: measured on one worker where the round averages all of the state
            has_state = case.get("momentum", 0) > 0 or case.get("optimizer") == "adamw"
            averages_state = case.get("sync", "params_and_momentum") == "params_and_momentum" and has_state
            if averages_state and not case.get("state_period") and not case.get("sync_state"):
                assert spread == pytest.approx(expected_spread, rel=1e-3, abs=1e-7), case
            elif not averages_state:
                assert spread is None, case
            else:  # state_period / sync_state: only at the rounds that send all of it
                assert spread is None or spread == pytest.approx(expected_spread, rel=1e-3, abs=1e-7), case
    if case.get("sync") == "gradients":
        assert simulated == []


def assert_ranks_match_the_simulator(case, ranks, world_size, steps=STEPS, atols=ATOLS):
    """Every rank's trajectory, buffers, momentum and counters are the simulator's worker of that rank."""
    case = dict(case)
    model = mlp(batchnorm=case.pop("batchnorm", False))
    sim = prsgd.Simulator(model, num_workers=world_size, **case)
    sim.comm.trace = [[]]
    # the engines' gradients agree to float noise (vmap vs per-process autograd); a compressed round can turn
    # that noise into one rounding step of the change it sends (an fp16 / bf16 ulp, an int8 step of ~1e-2 / 127)
    atol = atols.get(case.get("compression"), atols[None])
    drift = []
    for t, (x, y) in enumerate(batches(world_size, steps)):
        sim.step(x, y, F.cross_entropy)
        if sim.drift.latest is not None and sim.drift.latest.step == t + 1:
            drift.append(dataclasses.astuple(sim.drift.latest))
        for rank, saved in enumerate(ranks):
            for name, p in saved["trajectory"][t].items():
                torch.testing.assert_close(
                    p,
                    sim.params()[name][rank],
                    rtol=1e-5,
                    atol=atol,
                    msg=f"{case} step {t} rank {rank} {name}",
                )
    if case.get("compression") and not case.get("overlap") and not case.get("fragments"):  # all equal after a round
        for t in range(case["period"] - 1, steps, case["period"]):
            for name, p in ranks[0]["trajectory"][t].items():
                assert all(torch.equal(p, saved["trajectory"][t][name]) for saved in ranks), (t, name)
    assert_drift_matches_the_simulator(case, ranks, drift)
    for rank, saved in enumerate(ranks):
        assert saved["comm"] == dataclasses.astuple(sim.comm)
        # the same collectives (kind, bytes, scope, overlapped) in the same steps: the simulator's trace, which
        # prsgd predict times, is what a distributed run sends
        assert saved["trace"] == [[dataclasses.astuple(c) for c in step] for step in sim.comm.trace], case
        for name, b in saved["buffers"].items():
            torch.testing.assert_close(b, sim.buffers()[name][rank], rtol=1e-5, atol=atol)
        for m, sim_m in zip(saved["momentum"], sim.momentum().values(), strict=True):
            torch.testing.assert_close(m, sim_m[rank], rtol=1e-5, atol=atol)
        sim_state = sim.optimizer_state()
        assert set(saved["state"]) == set(sim_state)
        for kind, by_param in saved["state"].items():
            for name, t in by_param.items():
                theirs = sim_state[kind][name]
                theirs = theirs if theirs.dim() == 0 else theirs[rank]  # counters: one for all workers
                torch.testing.assert_close(t, theirs, rtol=1e-5, atol=atol, msg=f"{case} {kind} {name}")


def test_workers_start_from_the_first_workers_parameters(tmp_path):
    """x^0 is the same everywhere: LocalSGD broadcasts rank 0's model at construction."""
    case = dict(lr=0.1, momentum=0.9, period=100, sync="params_and_momentum", distinct_init=True)
    ranks = spawn(2, [case], tmp_path, steps=1)[0]
    sim = prsgd.Simulator(mlp(seed=0), num_workers=2, lr=0.1, momentum=0.9, period=100)
    sim.step(*batches(2, 1)[0], F.cross_entropy)
    for rank in range(2):
        for name, p in ranks[rank]["trajectory"][0].items():
            torch.testing.assert_close(p, sim.params()[name][rank], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sync", ["params_and_momentum", "gradients"])
def test_a_step_skipped_by_grad_scaler_keeps_workers_in_step(sync, tmp_path):
    """One worker's GradScaler skips step 1 (inf loss): every worker still syncs at the same steps, no hang."""
    case = dict(lr=0.1, momentum=0.9, period=3, sync=sync, inf_at=(1, 1))
    ranks = spawn(2, [case], tmp_path)[0]
    assert ranks[0]["steps_done"] == ranks[1]["steps_done"] == STEPS
    assert ranks[0]["rounds"] == ranks[1]["rounds"] == (STEPS if sync == "gradients" else STEPS // 3)
    if sync == "gradients":  # the averaged gradients are inf on both workers: both skip
        assert ranks[0]["applied"][1] is False and ranks[1]["applied"][1] is False
    else:
        assert ranks[0]["applied"][1] is True and ranks[1]["applied"][1] is False
    for name, p in ranks[0]["trajectory"][-1].items():  # step 9 is a sync: workers agree again
        torch.testing.assert_close(p, ranks[1]["trajectory"][-1][name], rtol=1e-6, atol=1e-7)
        assert torch.isfinite(p).all()


def test_a_parameter_without_gradient_on_one_rank_is_still_averaged(tmp_path):
    """Rank 1's last weight gets no gradient (it is not updated there) but every round still averages it."""
    case = dict(lr=0.1, momentum=0.9, period=3, sync="params_and_momentum", no_grad_on=1)
    ranks = spawn(2, [case], tmp_path, steps=4)[0]
    name = [n for n in ranks[0]["trajectory"][0] if n.endswith("weight")][-1]
    start = mlp().state_dict()[name]
    a, b = ([saved["trajectory"][t][name] for t in range(4)] for saved in ranks)
    assert torch.equal(b[0], start) and torch.equal(b[1], start)  # rank 1 never updates it ...
    assert not torch.equal(a[1], start)  # ... rank 0 does
    assert torch.equal(a[2], b[2]) and not torch.equal(b[2], start)  # step 3 is a round: both hold the average
    assert torch.equal(b[3], b[2]) and not torch.equal(a[3], a[2])  # then rank 1 again keeps it, rank 0 moves on
