"""Checkpoints, resume, non-finite detection and worker failure: a run is never lost, never hangs, never trains on
garbage. Resumed runs are compared with uninterrupted ones for exact (bit) equality."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import batches, free_port, mlp, torchrun_command

import prsgd
from prsgd import train
from prsgd.training import batches as run_batches
from prsgd.training import checkpoint, workers
from prsgd.training.config import RunConfig, from_dict

# 8 workers x 16 = 128 examples per step on digits' 1437 training images: 12 steps per joint epoch.
# Period 4 with a checkpoint every 3 steps: most checkpoints fall in the middle of a period.
BASE = {
    "progress": False,
    "algorithm": {"sync": "params_and_momentum", "period": 4, "momentum": 0.9},
    "training": {"workers": 8, "batch_size": 16, "epochs": 3, "evals": 5, "checkpoint_every": 3, "lr": 0.05},
}


def config(out: Path, **changes) -> RunConfig:
    values = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (values.setdefault(section, {}) if section else values)[name] = value
    return from_dict({**values, "out": str(out)})


def final_state(out: Path) -> list[dict]:
    found = checkpoint.latest(out / "checkpoints")
    return [found.load(entry["rank"]) for entry in found.manifest["shards"]]


def assert_same_state(a, b) -> None:
    """Exact equality of nested dicts/lists of tensors and numbers (wall clock excluded)."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            if key != "wall_clock" and key != "wall":
                assert_same_state(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    else:
        assert a == b


def records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "wall_clock"} for r in rows]


class Interrupt(Exception):
    pass


def run_until(cfg: RunConfig, stop_at: int, monkeypatch) -> None:
    """Run ``cfg`` in this process and break off (as a kill would) just before step ``stop_at``."""
    real = workers.SimulatedWorkers.step

    def step(self, sampler, step):
        if step == stop_at:
            raise Interrupt
        real(self, sampler, step)

    monkeypatch.setattr(workers.SimulatedWorkers, "step", step)
    with pytest.raises(Interrupt):
        train.run(cfg)
    monkeypatch.setattr(workers.SimulatedWorkers, "step", real)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train.run(config(out))
    return out


@pytest.mark.parametrize("stop_at", [11, 13, 32], ids=["mid-period", "right-after-a-sync", "last-period"])
def test_simulator_resume_is_bit_identical_to_an_uninterrupted_run(uninterrupted, stop_at, tmp_path, monkeypatch):
    run_until(config(tmp_path), stop_at, monkeypatch)
    found = checkpoint.latest(tmp_path / "checkpoints")
    assert found.step == stop_at // 3 * 3 and found.manifest["consensus"] == (found.step % 4 == 0)
    train.run(config(tmp_path, resume=True))
    assert_same_state(final_state(uninterrupted), final_state(tmp_path))
    assert records(uninterrupted) == records(tmp_path)


def test_checkpoint_holds_mid_period_state_and_only_the_newest_are_kept(tmp_path, monkeypatch):
    run_until(config(tmp_path, **{"training.keep_checkpoints": 2}), 11, monkeypatch)
    folders = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert folders == ["step-000000006", "step-000000009"]
    found = checkpoint.latest(tmp_path / "checkpoints")
    state = found.load(0)
    assert found.manifest["consensus"] is False and found.manifest["workers"] == 8
    sim = state["engine"]
    algorithm = sim["prsgd"]
    assert algorithm["steps_done"] == 9 and algorithm["rounds"] == 2  # rounds after steps 4 and 8
    assert (algorithm["sync"], algorithm["period"], algorithm["workers"]) == ("params_and_momentum", 4, 8)
    weights = sim["params"][next(iter(sim["params"]))]
    assert not torch.equal(weights[0], weights[1])  # one step into the period, workers differ
    assert [r["step"] for r in state["records"]] == [0, 7]
    assert set(state["rng"]) == {"torch"}


def test_a_corrupted_or_truncated_checkpoint_is_detected_and_the_previous_one_is_used(
    uninterrupted, tmp_path, monkeypatch
):
    run_until(config(tmp_path), 14, monkeypatch)
    newest = checkpoint.latest(tmp_path / "checkpoints")
    assert newest.step == 12
    shard = newest.folder / "rank-00000.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"step-000000012/rank-00000.pt: SHA-256 does not match"):
        assert checkpoint.latest(tmp_path / "checkpoints").step == 9
    shard.write_bytes(bytes(data[:100]))
    with pytest.warns(UserWarning, match=r"truncated"):
        train.run(config(tmp_path, resume=True))
    assert_same_state(final_state(uninterrupted), final_state(tmp_path))


def test_resume_refuses_another_config_and_mid_period_worker_count_changes(tmp_path, monkeypatch):
    run_until(config(tmp_path), 11, monkeypatch)
    with pytest.raises(prsgd.CheckpointError, match=r"another config \(algorithm.period: 4 -> 2\)"):
        train.run(config(tmp_path, resume=True, **{"algorithm.period": 2}))
    with pytest.raises(prsgd.CheckpointError, match=r"taken with 8 workers in the middle of a period.*not 4"):
        train.run(config(tmp_path, resume=True, **{"training.workers": 4}))


def test_a_consensus_checkpoint_resumes_with_another_number_of_workers(tmp_path, monkeypatch, capsys):
    run_until(config(tmp_path, **{"training.checkpoint_every": 4}), 10, monkeypatch)
    found = checkpoint.latest(tmp_path / "checkpoints")
    assert found.step == 8 and found.manifest["consensus"] is True
    got = train.run(config(tmp_path, resume=True, **{"training.workers": 4, "training.checkpoint_every": 4}))
    assert "all 4 workers start from its common state at joint epoch 0.712 (step 16)" in capsys.readouterr().out
    # 8 workers x 8 steps = 4 workers x 16 steps; 4 workers x 16 examples take ceil(3 x 1437 / 64) = 68 steps for
    # 3 joint epochs; the 2 rounds saved at step 8 go on counting: 2 + (68 - 16) / 4
    assert got[-1]["step"] == 68 and got[-1]["comm_rounds"] == 15
    assert [r["step"] for r in got[:2]] == [0, 7]  # the records written before the checkpoint are kept


def test_resume_without_a_checkpoint_starts_from_step_zero(tmp_path, capsys):
    cfg = config(tmp_path, resume=True, **{"training.epochs": 1})
    assert train.run(cfg)[0]["step"] == 0
    assert "no complete checkpoint" in capsys.readouterr().out


def test_same_config_and_seed_give_bit_identical_simulator_runs(uninterrupted, tmp_path):
    train.run(config(tmp_path))
    assert_same_state(final_state(uninterrupted), final_state(tmp_path))
    assert records(uninterrupted) == records(tmp_path)


# ---- non-finite values ------------------------------------------------------------------------------------------


def test_simulator_names_the_step_and_worker_of_a_nan_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real = run_batches.worker_batches

    def poisoned(data, indices, workers, step, cfg):
        x, y = real(data, indices, workers, step, cfg)
        if step == 13:
            x[5, 0, 0] = float("nan")
        return x, y

    monkeypatch.setattr(run_batches, "worker_batches", poisoned)
    with pytest.raises(prsgd.NonFiniteError) as error:
        train.run(config(tmp_path))
    message = str(error.value)
    assert message.startswith("non-finite loss (NaN or inf) at step 13 on worker 5 of 8")
    assert message.endswith(f"the last good checkpoint is kept: {tmp_path / 'checkpoints' / 'step-000000012'}")
    kept = checkpoint.latest(tmp_path / "checkpoints")
    assert kept.step == 12
    assert all(torch.isfinite(t).all() for t in kept.load(0)["engine"]["params"].values())


def test_simulator_finds_a_nan_gradient_on_its_worker_before_it_is_averaged():
    def loss_fn(out, target):  # finite loss everywhere; NaN gradient (sqrt'(0) x 0) where all targets are 0
        return F.cross_entropy(out, target) + torch.sqrt(out.sum() * 0 + (target.sum() != 0).float())

    x, y = batches(4, 1)[0]
    y[2] = 0
    sim = prsgd.Simulator(mlp(), num_workers=4, lr=0.1, sync="gradients", check_finite=True)
    before = sim.params()
    with pytest.raises(prsgd.NonFiniteError, match=r"non-finite gradient \(NaN or inf\) at step 0 on worker 2 of 4$"):
        sim.step(x, y, loss_fn)
    assert_same_state(before, sim.params())  # nothing was applied or averaged
    y[2] = 1
    assert torch.isfinite(sim.step(x, y, loss_fn)).all()


def test_local_sgd_names_its_rank_on_a_nan_gradient():
    model = mlp()
    opt = prsgd.LocalSGD(model, lr=0.1, momentum=0.9, period=2, check_finite=True)
    x, y = batches(1, 2)[0]
    F.cross_entropy(model(x[0]), y[0]).backward()
    opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x[0]), y[0]).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    with pytest.raises(prsgd.NonFiniteError, match=r"non-finite gradient \(NaN or inf\) at step 1 on rank 0 of 1"):
        opt.step()


# ---- multi-process: kill, resume, fail fast ---------------------------------------------------------------------

DIST_FLAGS = [
    "--engine",
    "distributed",
    "--workers",
    "2",
    "--batch-size",
    "8",
    "--epochs",
    "12",
    "--evals",
    "4",
    "--period",
    "4",
    "--checkpoint-every",
    "5",
    "--no-progress",
]


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK", "WORLD_SIZE", "MASTER"))}
    return dict(env, OMP_NUM_THREADS="1", **extra)


def torchrun(out: Path, *extra: str) -> subprocess.Popen:
    command = torchrun_command(2, *DIST_FLAGS, "--out", str(out), torchrun_args=extra)
    return subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list((out / "checkpoints").glob("step-*/manifest.json")):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


def kill_tree(proc: subprocess.Popen) -> None:
    """Make sure a launcher and the workers it started are gone (also when a test fails half-way)."""
    for pid in children_by_rank(proc.pid).values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait()


def children_by_rank(parent: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes torchrun started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == parent:
            for item in environ:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(entry.name)
    return found


@pytest.fixture(scope="module")
def torchrun_uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_full")
    proc = torchrun(out)
    try:
        output = proc.communicate(timeout=300)[0]
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, output
    return out


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_resumes_bit_identically(torchrun_uninterrupted, tmp_path):
    # a restarted attempt must not read the gloo addresses the dead attempt left in torchrun's store (it then waits
    # on a dead peer): prsgd.engines.distributed gives each attempt its own key prefix
    proc = torchrun(tmp_path, "--standalone", "--max-restarts", "1")
    try:
        wait_for_checkpoint(tmp_path, proc)
        ranks = children_by_rank(proc.pid)
        assert set(ranks) == {0, 1}
        os.kill(ranks[1], signal.SIGKILL)
        output = proc.communicate(timeout=300)[0]
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, output
    assert "resume: continuing from" in output
    a, b = final_state(torchrun_uninterrupted), final_state(tmp_path)
    assert len(a) == len(b) == 2
    assert_same_state(a, b)
    assert records(torchrun_uninterrupted) == records(tmp_path)


LONG = ("--epochs", "200", "--worker-timeout", "5")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("victim", "how"),
    [(1, signal.SIGKILL), (0, signal.SIGKILL), (1, signal.SIGSTOP)],
    ids=["rank-1-killed", "rank-0-killed", "rank-1-hung"],
)
def test_a_dead_or_hung_worker_makes_the_other_fail_naming_it_within_the_timeout(tmp_path, victim, how):
    """Two ranks started without torchrun (rank 0 hosts the store); kill (or freeze) one after the first
    checkpoint. The timeout is 5 s: a killed peer is noticed at once (its sockets close), a frozen one when the
    collective times out."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "prsgd.train", *DIST_FLAGS, *LONG, "--out", str(tmp_path)],
            env=_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        wait_for_checkpoint(tmp_path, procs[0])
        os.kill(procs[victim].pid, how)
        killed = time.monotonic()
        survivor = procs[1 - victim]
        output = survivor.communicate(timeout=60)[0]
        took = time.monotonic() - killed
    finally:
        for proc in procs:
            kill_tree(proc)
    assert survivor.returncode == 1
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"prsgd train: error: rank {1 - victim}: ")
    if victim == 1:
        assert "rank 1 is unresponsive (died or hung)" in last
    else:
        assert "lost the rendezvous store" in last and "rank 0" in last
    assert took < 5 + 5, f"the survivor took {took:.1f} s to fail"
    print(f"\n{how.name} rank {victim}: the survivor failed after {took:.2f} s: {last}")


SHUTDOWN_SCRIPT = """
import os, sys, time
import torch
from prsgd.engines import distributed
from prsgd.engines.torchrun import Torchrun
os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
def threads():
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
before = threads()
torchrun = Torchrun.join("cpu", 30.0)
assert "torch._dynamo" in sys.modules
torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)  # what the training loop does after the group exists
distributed.all_gather_objects({"rank": 0})
torchrun.close()
for _ in range(20):  # a thread may still be on its way out for a moment; a kept one never leaves
    if len(threads()) <= len(before):
        break
    time.sleep(0.05)
print(before, threads())
print(len(threads()) - len(before))
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads in /proc")
def test_shutdown_frees_the_process_group_and_its_threads_before_python_exits():
    """In a fresh interpreter (torch._dynamo not imported yet): after shutdown no gloo thread is left, so none can
    drop a collective's tensors while Python finalizes (that aborted about 1 torchrun run in 50 before the fix)."""
    env = dict(os.environ, TORCHELASTIC_USE_AGENT_STORE="False")
    out = subprocess.run(
        [sys.executable, "-c", SHUTDOWN_SCRIPT, str(free_port())], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == 0, out.stdout  # the thread names before and after


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
@pytest.mark.parametrize("where", [0, 2])
def test_all_finite_finds_any_non_finite_value_and_leaves_values_unchanged(bad, where):
    from prsgd.algorithm.functional import all_finite

    tensors = [torch.randn(5, 3), torch.randn(7, dtype=torch.float64), torch.randn(4).to(torch.bfloat16)]
    tensors[0][1, 2] = 1e-40  # a denormal and a negative zero must come back bit for bit
    tensors[1][3] = -0.0
    if bad is not None:
        tensors[where].view(-1)[-1] = bad
    before = [t.clone() for t in tensors]
    assert all_finite([*tensors, torch.arange(3)]) is (bad is None)
    bits = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}
    for a, b in zip(tensors, before, strict=True):
        assert torch.equal(a.view(bits[a.dtype]), b.view(bits[b.dtype]))


def test_a_failed_join_is_one_error_with_the_likely_cause(monkeypatch):
    from prsgd.engines import torchrun

    port = free_port()  # nothing listens there: rank 1 never reaches a store
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    for key, value in dict(RANK="1", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setattr(torchrun.socket, "gethostbyname", lambda name: "127.0.1.1")  # as on a default Debian host
    began = time.time()
    with pytest.raises(prsgd.WorkerFailure) as error:
        torchrun.Torchrun.join("cpu", timeout=2.0)
    message = str(error.value)
    assert message.startswith("rank 1 of 4 could not join the process group: ")
    assert "resolves to 127.0.1.1" in message and "GLOO_SOCKET_IFNAME" in message
    assert "MASTER_ADDR=127.0.0.1 on a 4-rank job spread over several hosts" in message  # 4 ranks, 2 per host
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # one host: nothing about interfaces, just where it went
    assert (
        torchrun.setup_hint(RuntimeError())
        == f"the rendezvous at 127.0.0.1:{port} was not reached in time, or refused the connection"
    )
    assert time.time() - began < 30
