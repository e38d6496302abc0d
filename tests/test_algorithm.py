"""PeriodicSync against the engine contract: what it asks a communicator for, when, and its one state format."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import batches, mlp

import prsgd
from prsgd.algorithm import SYNC_RULES, CommStats, Hyperparameters, PeriodicSync, RoundSpec, SyncRule, UpdateGroup


class Recorder:
    """A communicator that does nothing but write down what it was asked (one worker of ``num_workers``)."""

    holds_every_worker = False

    def __init__(self, num_workers: int = 4) -> None:
        self.num_workers = num_workers
        self.comm = CommStats()
        self.calls: list[tuple] = []
        self.momentum = [torch.ones(3)]
        self.counters: list = []

    def tensors(self, field):
        return {"state": self.momentum, "grads": [torch.zeros(3)]}.get(field, [])

    def elementwise(self, fields):
        return [t for field in fields for t in self.tensors(field)]

    def average(self, fields):
        self.calls.append(("average", tuple(fields)))
        self.comm.record(1)

    def mix(self, fields, step):
        self.calls.append(("mix", tuple(fields), step))
        self.comm.record(1)


def drive(sync: str, period: int, steps: int) -> tuple[PeriodicSync, Recorder, list[list[tuple]]]:
    engine = Recorder()
    algorithm = PeriodicSync(RoundSpec(sync, period, topology="ring" if "gossip" in sync else None), has_state=True)
    algorithm.engine = engine
    x, g = torch.zeros(3), torch.ones(3)
    per_step = []
    for _ in range(steps):
        before = len(engine.calls)
        algorithm.step(
            [UpdateGroup([x], [g], {"momentum_buffer": [torch.zeros(3)]}, Hyperparameters(0.1, momentum=0.9))]
        )
        per_step.append(engine.calls[before:])
    return algorithm, engine, per_step


ALL = ("params", "buffers", "state")
PARAMS = ("params", "buffers")


@pytest.mark.parametrize(
    ("sync", "expected"),
    [
        ("params_and_momentum", {3: [("average", ALL)], 6: [("average", ALL)]}),
        ("params_clear_momentum", {3: [("average", PARAMS)], 6: [("average", PARAMS)]}),
        ("params_only", {3: [("average", PARAMS)], 6: [("average", PARAMS)]}),
        ("gossip", {3: [("mix", ALL, 2)], 6: [("mix", ALL, 5)]}),
        ("gossip_params_only", {3: [("mix", PARAMS, 2)], 6: [("mix", PARAMS, 5)]}),
        ("gradients", {t: [("average", ("buffers", "grads"))] for t in range(1, 8)}),
        ("none", {}),
    ],
)
def test_each_rule_asks_the_engine_for_its_fields_at_its_steps(sync, expected):
    algorithm, engine, per_step = drive(sync, period=3, steps=7)
    assert {t: calls for t, calls in enumerate(per_step, start=1) if calls} == expected
    assert algorithm.steps_done == 7 and algorithm.comm.rounds == len(engine.calls)
    assert bool(engine.momentum[0].abs().sum()) == (sync != "params_clear_momentum")  # only that rule clears
    algorithm.synchronize()  # the exact average over all workers, gossip rules included
    assert engine.calls[-1] == ("average", SYNC_RULES[sync].round_fields())
    assert algorithm.synchronized_at == 7


def test_state_dict_is_one_format_and_loading_checks_the_rule_and_the_worker_count():
    algorithm, _, _ = drive("params_and_momentum", period=3, steps=7)
    state = algorithm.state_dict()
    counts = {"rounds": 2, "bytes": 2, "peak_step_bytes": 1}  # the recorder counts 1 byte a round, one round a step
    assert state == {"sync": "params_and_momentum", "workers": 4, "period": 3, "steps_done": 7, **counts}
    same = PeriodicSync(RoundSpec("params_and_momentum", 3), has_state=True, engine=Recorder())
    same.load_state_dict(state)
    assert (same.steps_done, same.comm) == (7, CommStats(2, 2, peak_step_bytes=1))
    with pytest.raises(
        prsgd.CheckpointError, match="saved with sync='params_and_momentum'; this run uses sync='params_only'"
    ):
        PeriodicSync(RoundSpec("params_only", 3), has_state=True, engine=Recorder()).load_state_dict(state)
    two = PeriodicSync(RoundSpec("params_and_momentum", 3), has_state=True, engine=Recorder(num_workers=2))
    with pytest.raises(prsgd.CheckpointError, match="saved by 4 workers; this run has 2"):
        two.load_state_dict(state)
    two.load_state_dict(dict(state, steps_done=6), from_consensus=True)
    assert two.steps_done == 12  # 4 workers x 6 steps = 2 workers x 12 steps


def test_a_sync_rule_that_describes_nothing_valid_is_refused():
    with pytest.raises(ValueError, match="keeps momentum per worker"):
        SyncRule("bad", "gradients with cleared momentum", "gradients", "clear")
    with pytest.raises(ValueError, match="not a kind of round"):
        SyncRule("bad", "", "broadcast")


def test_simulator_loads_a_checkpoint_written_before_the_common_format():
    sim = prsgd.Simulator(mlp(), num_workers=2, lr=0.1, momentum=0.9, period=2)
    for x, y in batches(2, 3):
        sim.step(x, y, F.cross_entropy)
    state = sim.state_dict()
    old = {k: v for k, v in state.items() if k != "prsgd"}
    old |= {"steps_done": 3, "comm": [state["prsgd"]["rounds"], state["prsgd"]["bytes"]]}
    again = prsgd.Simulator(mlp(seed=3), num_workers=2, lr=0.1, momentum=0.9, period=2)
    again.load_state_dict(old)
    kept_then = {k: v for k, v in state["prsgd"].items() if k != "drift"}  # drift was not measured then
    assert again.state_dict()["prsgd"] == kept_then | {"peak_step_bytes": 0}  # not counted then: from 0
    for name, p in again.params().items():
        assert torch.equal(p, state["params"][name])


def test_simulator_loads_a_checkpoint_written_before_state_was_kept_by_name():
    """States saved before architecture v2 hold momentum under "momentum"; they resume bit-identically."""
    sim = prsgd.Simulator(mlp(), num_workers=2, lr=0.1, momentum=0.9, period=2)
    data = batches(2, 5)
    for x, y in data[:3]:
        sim.step(x, y, F.cross_entropy)
    state = sim.state_dict()
    old = {k: v for k, v in state.items() if k != "state"} | {"momentum": state["state"]["momentum_buffer"]}
    again = prsgd.Simulator(mlp(seed=3), num_workers=2, lr=0.1, momentum=0.9, period=2)
    again.load_state_dict(old)
    for x, y in data[3:]:
        sim.step(x, y, F.cross_entropy)
        again.step(x, y, F.cross_entropy)
    for name, p in again.params().items():
        assert torch.equal(p, sim.params()[name])
    with pytest.raises(
        prsgd.CheckpointError, match=r"keeps optimizer state \['momentum_buffer'\]; this simulator keeps \[\]"
    ):
        prsgd.Simulator(mlp(), num_workers=2, lr=0.1, period=2).load_state_dict(old)


def test_a_simulator_state_keeps_every_hyperparameter_a_scheduler_may_change_and_when_it_last_synchronized():
    sim = prsgd.Simulator(mlp(), num_workers=2, lr=0.1, momentum=0.9, period=4)
    for x, y in batches(2, 3):
        sim.step(x, y, F.cross_entropy)
    sim.param_groups[0].update(lr=0.02, momentum=0.5, weight_decay=1e-4)  # what a scheduler may do
    sim.synchronize()  # mid-period: every worker equal now
    again = prsgd.Simulator(mlp(seed=3), num_workers=2, lr=0.1, momentum=0.9, period=4)
    again.load_state_dict(sim.state_dict())
    group = again.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.02, 0.5, 1e-4)
    assert again.synchronized_at == 3 and again.in_consensus


def test_the_command_line_says_none_for_no_compression():
    from prsgd.training.config import ConfigError, RunConfig

    assert RunConfig().with_overrides({"compression": "none"}).algorithm.round_spec().compression is None
    with pytest.raises(ConfigError, match=r"compression='int3' is not known; allowed: none, bf16, fp16, int8"):
        RunConfig().with_overrides({"compression": "int3"})
