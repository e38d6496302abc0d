"""Live fault tolerance on torchft (issue 29): replica groups of one process each (tests/ft_worker.py) around a
Lighthouse on 127.0.0.1 that each test starts and stops.

- With no failure the run equals plain LocalSGD over gloo bit for bit.
- A group SIGKILLed at 20 points (inside a period, before and after a round's collective, while it or a peer is
  recovering, twice in a run) and restarted: every group exits 0, all end with the same parameters, and those equal
  :func:`reference.alive_set_reference`, a plain loop that averages over the groups of each committed round and
  copies a peer where a group recovered (both read from the groups' event logs).
- A group that dies and stays dead is left out; the others finish alone.
- Faults that must end in a clear error: no Lighthouse, another config, too few groups for the timeout."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RUST_LOG", "error")  # the in-process Lighthouse's log: its errors only
pytest.importorskip("torchft")

from helpers import free_port, mlp
from reference import alive_set_reference

import prsgd
from prsgd.engines.lighthouse import lighthouse_address, start_lighthouse
from prsgd.errors import InvalidArgument

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fault_tolerance import descendants

WORKER = str(Path(__file__).with_name("ft_worker.py"))
GROUPS, STEPS, PERIOD = 3, 24, 4
ENV = {**os.environ, "RUST_LOG": "error", "PYTHONWARNINGS": "ignore"}


def _start(group: int, tmp: Path, address: str, args: list[str]) -> subprocess.Popen:
    log = open(tmp / f"log-{group}.txt", "a")  # noqa: SIM115 (the process writes it)
    command = [sys.executable, WORKER, "--group", str(group), "--groups", str(GROUPS), "--steps", str(STEPS)]
    command += ["--out", str(tmp / f"result-{group}.pt"), "--events", str(tmp / f"events-{group}.jsonl")]
    command += ["--markers", str(tmp), *args]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**ENV, "TORCHFT_LIGHTHOUSE": address})


def run_groups(tmp: Path, *, min_replicas=GROUPS, kills=None, restart=True, args=(), deadline_s=150.0):
    """Every group's process, each restarted when SIGKILLed (if ``restart``); returns exit statuses by group (the
    last incarnation's) and how many times each was restarted."""
    kills = kills or {}
    server = start_lighthouse(min_replicas, 0, join_timeout_ms=10_000, heartbeat_timeout_ms=1000)
    address = lighthouse_address(server)
    try:
        running = {g: _start(g, tmp, address, [*args, *_kill_args(kills, g)]) for g in range(GROUPS)}
        statuses, restarts = {}, defaultdict(int)
        deadline = time.monotonic() + deadline_s
        while running:
            assert time.monotonic() < deadline, f"groups {sorted(running)} still running: {_logs(tmp)}"
            for g, process in list(running.items()):
                status = process.poll()
                if status is None:
                    continue
                if status == -signal.SIGKILL and restart:
                    restarts[g] += 1
                    running[g] = _start(g, tmp, address, [*args, *_kill_args(kills, g)])
                else:
                    statuses[g] = status
                    del running[g]
            time.sleep(0.05)
        return statuses, dict(restarts)
    finally:
        for process in locals().get("running", {}).values():
            process.kill()
        server.shutdown()


def _kill_args(kills, group: int) -> list[str]:
    return [arg for kill in kills.get(group, ()) for arg in ("--kill", kill)]


def _logs(tmp: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp.glob("log-*.txt")))


def _events(tmp: Path):
    """The committed rounds (step -> groups, the same in every group's log) and the recoveries (step -> [(group,
    source)]) of all incarnations of every group."""
    rounds, copies = {}, defaultdict(list)
    for g in range(GROUPS):
        path = tmp / f"events-{g}.jsonl"
        for line in path.read_text().splitlines() if path.exists() else ():
            event = json.loads(line)
            if event["kind"] == "round":
                assert rounds.setdefault(event["step"], event["members"]) == event["members"], event
            else:
                copies[event["step"]].append((g, event["source"]))
    return rounds, copies


def _results(tmp: Path):
    return [torch.load(tmp / f"result-{g}.pt") for g in range(GROUPS)]


def _plain_run(tmp: Path, args=()) -> list[dict]:
    """The same run on plain LocalSGD: 3 gloo ranks on 127.0.0.1."""
    plain_dir = tmp / "plain"
    plain_dir.mkdir()
    port = free_port()
    common = ["--plain", str(port), "--groups", str(GROUPS), "--steps", str(STEPS), *args]
    processes = [
        subprocess.Popen(
            [sys.executable, WORKER, *common, "--group", str(g), "--out", str(plain_dir / f"result-{g}.pt")], env=ENV
        )
        for g in range(GROUPS)
    ]
    assert [p.wait(timeout=120) for p in processes] == [0, 0, 0]
    return [torch.load(plain_dir / f"result-{g}.pt") for g in range(GROUPS)]


def test_without_failures_the_run_is_plain_localsgd_bit_for_bit(tmp_path):
    statuses, _ = run_groups(tmp_path)
    assert statuses == {0: 0, 1: 0, 2: 0}, _logs(tmp_path)
    tolerant = _results(tmp_path)
    plain = _plain_run(tmp_path)
    for g in range(GROUPS):
        assert torch.equal(tolerant[g]["values"], plain[g]["values"]), g
        assert tolerant[g]["comm"] == plain[g]["comm"] and tolerant[g]["rounds"] == STEPS // PERIOD
        assert tolerant[g]["record"] == {
            "participants": 3,
            "rounds_short": 0,
            "group_rounds": 3 * STEPS // PERIOD,
            "groups_joined": 0,
            "groups_lost": 0,
            "recoveries": 0,
            "rounds_retried": 0,
        }
        assert [s for s, _ in tolerant[g]["history"]] == list(range(PERIOD, STEPS + 1, PERIOD))


OPTIONS = {  # every rule and round option fault tolerance supports (the default is Algorithm 1 with momentum)
    "params_only": {"sync": "params_only"},
    "params_clear_momentum": {"sync": "params_clear_momentum"},
    "gradients": {"sync": "gradients"},
    "bf16": {"compression": "bf16"},
    "int8": {"compression": "int8"},
    "int4": {"compression": "int4"},
    "topk": {"compression": "topk:0.1"},
    "fragments": {"fragments": 2},
    "outer": {"outer_lr": 0.7, "outer_momentum": 0.5},
    "state_period": {"state_period": 2},
    "adamw": {"optimizer": "adamw", "lr": 0.01},
    "adamw-params_only-int8-fragments-outer": {
        "sync": "params_only",
        "optimizer": "adamw",
        "lr": 0.01,
        "compression": "int8",
        "fragments": 2,
        "outer_lr": 0.7,
    },
}


IDENTICAL = ("gradients", "int8", "topk", "adamw-params_only-int8-fragments-outer")
"""Options whose rounds take other collectives (every step; all-to-all and all-gather; all-gather) or every stage."""


@pytest.mark.slow
@pytest.mark.parametrize("name", IDENTICAL)
def test_other_collectives_and_stages_are_plain_localsgd_bit_for_bit_without_failures(tmp_path, name):
    args = ["--round", json.dumps(OPTIONS[name]), "--synchronize"]
    statuses, _ = run_groups(tmp_path, args=args)
    assert statuses == {0: 0, 1: 0, 2: 0}, _logs(tmp_path)
    tolerant, plain = _results(tmp_path), _plain_run(tmp_path, args)
    for g in range(GROUPS):
        assert torch.equal(tolerant[g]["values"], plain[g]["values"]), g
        assert tolerant[g]["comm"] == plain[g]["comm"]


@pytest.mark.slow
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_every_supported_option_ends_equal_after_a_group_is_killed(tmp_path, options):
    args = ["--round", json.dumps(options), "--synchronize"]  # so that every option ends in consensus
    statuses, restarts = run_groups(tmp_path, args=args, kills={1: ["before_step:10"]})
    assert statuses == {0: 0, 1: 0, 2: 0} and restarts, _logs(tmp_path)
    results = _results(tmp_path)
    for g in range(GROUPS):
        assert results[g]["steps"] == STEPS
        assert torch.equal(results[g]["params"], results[0]["params"]), g  # the last round's average


KILLS = {  # group -> kill points (WHERE:STEP; each happens once per run): 20 runs
    "inside-period-2": {1: ["before_step:2"]},
    "inside-period-6": {1: ["before_step:6"]},
    "inside-period-11": {2: ["before_step:11"]},
    "inside-period-first-step": {0: ["before_step:1"]},
    "before-the-round-step-8": {1: ["before_step:8"]},
    "before-the-round-step-12": {0: ["before_step:12"]},
    "before-the-collective-4": {1: ["before_collective:4"]},
    "before-the-collective-12": {2: ["before_collective:12"]},
    "before-the-collective-16": {0: ["before_collective:16"]},
    "after-the-collective-4": {1: ["after_collective:4"]},
    "after-the-collective-8": {2: ["after_collective:8"]},
    "after-the-collective-16": {0: ["after_collective:16"]},
    "after-the-collective-20": {1: ["after_collective:20"]},
    "donor-dies-during-recovery": {1: ["before_step:6"], 0: ["offer:any"], 2: ["offer:any"]},
    "donor-dies-during-late-recovery": {2: ["before_step:14"], 0: ["offer:any"], 1: ["offer:any"]},
    "dies-during-its-own-recovery": {1: ["before_step:9", "recover:any"]},
    "dies-while-recovering-x0": {2: ["recover:any"]},
    "two-groups-one-after-the-other": {1: ["before_step:5"], 2: ["before_step:14"]},
    "two-groups-at-one-round": {1: ["before_collective:8"], 2: ["after_collective:8"]},
    "the-same-group-twice": {1: ["before_step:3", "after_collective:12"]},
}


@pytest.mark.slow
@pytest.mark.parametrize("kills", list(KILLS.values()), ids=list(KILLS))
def test_a_group_killed_and_restarted_rejoins_and_all_end_equal_to_the_alive_set_reference(tmp_path, kills):
    statuses, restarts = run_groups(tmp_path, kills=kills)
    assert statuses == {0: 0, 1: 0, 2: 0}, _logs(tmp_path)
    assert restarts, "no group was killed: the kill point was never reached"
    results = _results(tmp_path)
    for g in range(1, GROUPS):
        assert torch.equal(results[g]["values"], results[0]["values"]), g
        assert results[g]["steps"] == STEPS
    rounds, copies = _events(tmp_path)
    assert sorted(rounds) == list(range(PERIOD, STEPS + 1, PERIOD))
    expected = alive_set_reference(mlp(), _batch, GROUPS, STEPS, lr=0.05, momentum=0.9, rounds=rounds, copies=copies)
    half = results[0]["values"].numel() // 2  # parameters | momentum
    for g in range(GROUPS):
        torch.testing.assert_close(results[g]["values"][: 2 * half], expected[g], rtol=1e-5, atol=1e-6)


def _batch(group, step):
    from ft_worker import batch

    return batch(group, step)


@pytest.mark.slow
def test_a_group_that_stays_dead_is_left_out_and_the_others_finish(tmp_path):
    slow = ["--step-seconds", "0.1"]  # so that a group starting late still joins before the others finish
    statuses, restarts = run_groups(tmp_path, min_replicas=2, kills={2: ["before_step:14"]}, restart=False, args=slow)
    assert statuses == {0: 0, 1: 0, 2: -signal.SIGKILL} and not restarts, _logs(tmp_path)
    results = [torch.load(tmp_path / f"result-{g}.pt") for g in (0, 1)]
    assert torch.equal(results[0]["values"], results[1]["values"])
    rounds, copies = _events(tmp_path)
    assert any(2 in members for members in rounds.values())  # it trained with the others before it died
    assert all(rounds[s] == [0, 1] for s in range(16, STEPS + 1, PERIOD))  # and was left out from the next round
    for result in results:
        record = result["record"]
        assert record["participants"] == 2 and record["groups_lost"] == 1 and record["rounds_short"] >= 3
    expected = alive_set_reference(mlp(), _batch, GROUPS, STEPS, lr=0.05, momentum=0.9, rounds=rounds, copies=copies)
    for g in (0, 1):
        torch.testing.assert_close(results[g]["values"][: expected[g].numel()], expected[g], rtol=1e-5, atol=1e-6)


def test_groups_started_with_another_config_end_in_an_error_naming_the_difference(tmp_path):
    server = start_lighthouse(2, 0, join_timeout_ms=300, heartbeat_timeout_ms=1000)
    try:
        address = lighthouse_address(server)
        a = _start(0, tmp_path, address, ["--round", '{"period": 4}', "--timeout", "10"])
        b = _start(1, tmp_path, address, ["--round", '{"period": 8}', "--timeout", "10"])
        statuses = sorted([a.wait(timeout=120), b.wait(timeout=120)])
    finally:
        server.shutdown()
    logs = _logs(tmp_path)
    assert statuses[1] != 0, logs
    assert re.search(
        r"replica group \d was started with another config than replica group \d \(.*period: (4 here, 8 there|8 here, "
        r"4 there)",
        logs,
    ), logs


def test_no_lighthouse_at_the_address_is_a_clear_error():
    port = free_port()
    settings = prsgd.FaultTolerance(lighthouse=f"http://127.0.0.1:{port}", replica_group=0, timeout=3)
    started = time.monotonic()
    with pytest.raises(prsgd.WorkerFailure, match=f"no Lighthouse answered at http://127.0.0.1:{port} within 3 s"):
        prsgd.LocalSGD(mlp(), lr=0.1, period=2, fault_tolerant=settings)
    assert time.monotonic() - started < 30


def test_too_few_groups_alive_for_the_timeout_is_a_clear_error():
    server = start_lighthouse(2, 0, join_timeout_ms=300, heartbeat_timeout_ms=1000)
    try:
        settings = prsgd.FaultTolerance(lighthouse=lighthouse_address(server), replica_group=0, timeout=3)
        with pytest.raises(prsgd.WorkerFailure, match="fewer replica groups alive than the Lighthouse's --min-"):
            prsgd.LocalSGD(mlp(), lr=0.1, period=2, fault_tolerant=settings)
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(sync="gossip", topology="ring"), "fault tolerance does not support sync='gossip'"),
        (dict(overlap=True), "fault tolerance does not support overlap="),
        (dict(inner_period=2, nodes=1), "fault tolerance does not support inner_period="),
        (dict(sync="none"), "fault tolerance does not support sync='none'"),
        (dict(fault_tolerant="yes"), "fault_tolerant='yes' is not allowed"),
    ],
)
def test_what_fault_tolerance_cannot_do_is_refused_before_any_work(kwargs, message):
    kwargs = {"fault_tolerant": prsgd.FaultTolerance(lighthouse="http://127.0.0.1:1", replica_group=0)} | kwargs
    with pytest.raises(InvalidArgument, match=message):
        prsgd.LocalSGD(mlp(), lr=0.1, period=4, **kwargs)


@pytest.mark.parametrize(
    ("settings", "env", "message"),
    [
        (dict(replica_group=0), {}, "fault tolerance needs the Lighthouse's address: set TORCHFT_LIGHTHOUSE"),
        (dict(lighthouse="127.0.0.1:29510", replica_group=0), {}, "is not a Lighthouse address"),
        (dict(lighthouse="http://127.0.0.1:29510"), {"REPLICA_GROUP_ID": "x"}, "set REPLICA_GROUP_ID=0, 1, ..."),
        (dict(lighthouse="http://127.0.0.1:29510", replica_group=3, groups=3), {}, "replica_group=3 is not allowed"),
        (dict(lighthouse="http://127.0.0.1:29510", replica_group=0, timeout=0), {}, "timeout=0 is not allowed"),
    ],
)
def test_bad_fault_tolerance_settings_are_one_clear_error(monkeypatch, settings, env, message):
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    monkeypatch.delenv("REPLICA_GROUP_ID", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(InvalidArgument, match=message):
        prsgd.FaultTolerance(**settings).resolved()


CLI = ["--epochs", "20", "--evals", "4", "--period", "3", "--no-progress", "--workers", str(GROUPS)]
CLI += ["--worker-timeout", "60"]  # how long a group waits for a quorum before it gives up


def _group_job(group: int, address: str, out: Path, log: Path) -> subprocess.Popen:
    """``prsgd train --fault-tolerant`` as one replica group: a torchrun job of one process, as the README says."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m"]
    command += ["prsgd.train", "--engine", "distributed", "--fault-tolerant", *CLI, "--out", str(out)]
    env = {**ENV, "TORCHFT_LIGHTHOUSE": address, "REPLICA_GROUP_ID": str(group), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env)


def _read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_prsgd_train_fault_tolerant_matches_the_simulator_and_a_killed_group_rejoins(tmp_path):
    from prsgd.train import main

    main([*CLI, "--out", str(tmp_path / "sim")])
    simulated = _read_log(tmp_path / "sim")
    server = start_lighthouse(GROUPS, 0, join_timeout_ms=10_000, heartbeat_timeout_ms=1000)
    try:
        address = lighthouse_address(server)
        jobs = {g: _group_job(g, address, tmp_path / "ft", tmp_path / f"job-{g}.txt") for g in range(GROUPS)}
        assert [jobs[g].wait(timeout=300) for g in range(GROUPS)] == [0, 0, 0], _logs_of(tmp_path)
        for g in range(GROUPS):
            records = _read_log(tmp_path / "ft" / f"group-{g}")
            assert [r["step"] for r in records] == [r["step"] for r in simulated]
            for a, b in zip(records, simulated, strict=True):
                assert (a["comm_rounds"], a["comm_bytes"]) == (b["comm_rounds"], b["comm_bytes"])
                assert a["participants"] == GROUPS and a["groups_lost"] == 0
                # a round over a quorum may fail and run again: drift is not measured, never guessed
                assert a["consensus_distance"] is None and (b["step"] == 0 or b["consensus_distance"] > 0)
            assert records[-1]["train_loss"] == pytest.approx(simulated[-1]["train_loss"], rel=1e-5)  # after a round
            summary = (tmp_path / f"job-{g}.txt").read_text()
            assert "fault tolerance: 3 groups in the last round, 0 rounds over fewer groups" in summary
            assert f"log: {tmp_path / 'ft' / f'group-{g}' / 'log.jsonl'}" in summary

        # group 1 SIGKILLed once it has logged two records (step 150 of 600), and started again: it recovers from a
        # live peer (the others wait for it: the Lighthouse needs all three groups)
        jobs = {g: _group_job(g, address, tmp_path / "killed", tmp_path / f"killed-{g}.txt") for g in range(GROUPS)}
        first = tmp_path / "killed" / "group-1" / "log.jsonl"
        deadline = time.monotonic() + 120
        while not (first.exists() and len(first.read_text().splitlines()) >= 2):
            assert time.monotonic() < deadline and jobs[1].poll() is None, _logs_of(tmp_path)
            time.sleep(0.01)
        for pid in [*descendants(jobs[1].pid), jobs[1].pid]:  # torchrun's worker runs in a session of its own
            os.kill(pid, signal.SIGKILL)
        jobs[1].wait()
        jobs[1] = _group_job(1, address, tmp_path / "killed", tmp_path / "killed-1.txt")
        assert [jobs[g].wait(timeout=300) for g in range(GROUPS)] == [0, 0, 0], _logs_of(tmp_path)
    finally:
        server.shutdown()
    finals = [_read_log(tmp_path / "killed" / f"group-{g}")[-1] for g in range(GROUPS)]
    assert all(f["step"] == simulated[-1]["step"] for f in finals)
    assert len({f["train_loss"] for f in finals}) == 1  # the same model in every group after the last round
    assert finals[1]["recoveries"] == 1 and "1 recoveries of this group" in (tmp_path / "killed-1.txt").read_text()
    steps = [r["step"] for r in _read_log(tmp_path / "killed" / "group-1")]
    assert steps == sorted(set(steps)) and steps[0] == 0  # the dead process's records kept, none twice


def _logs_of(tmp: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp.glob("*.txt")))
