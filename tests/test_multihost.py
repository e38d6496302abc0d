"""torchrun --nnodes 2 for real: two hosts as network namespaces (tests/multihost.py), the README's command.

Root only (network namespaces); skipped otherwise. CI runs as root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import multihost as mh
import pytest
from helpers import torchrun_command

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not mh.available(), reason="needs root and iproute2")]

TRAIN = [
    "--engine",
    "distributed",
    "--dataset",
    "digits",
    "--model",
    "mlp",
    "--workers",
    "4",
    "--batch-size",
    "16",
    "--epochs",
    "4",
    "--period",
    "4",
    "--evals",
    "4",
    "--checkpoint-every",
    "12",
    "--no-progress",
]
TIMEOUT = 10  # --worker-timeout of the partition scenario
MARGIN = 10  # README "Multi-node": diagnosis (4.5 x 0.5 s heartbeat intervals + 2 s) and exiting


@pytest.fixture(scope="module")
def hosts():
    mh.make()
    yield
    mh.remove()


def log(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "wall_clock"} for line in (out / "log.jsonl").open()]


def start(out: Path, extra: tuple[str, ...] = (), outs: tuple[Path, Path] | None = None, **kw) -> list:
    """Both hosts' torchrun, stdout and stderr to files in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for k in (0, 1):
        folder = outs[k] if outs else out
        command = mh.torchrun(k, [*TRAIN, "--out", str(folder), *extra], **kw)
        procs.append(
            subprocess.Popen(
                command,
                env=mh.environment(),
                stdout=(out / f"h{k}.out").open("w"),
                stderr=(out / f"h{k}.err").open("w"),
            )
        )
    return procs


def first_checkpoint(root: Path, deadline: float = 120) -> None:
    began = time.time()
    while not list((root / "checkpoints").glob("step-*/manifest.json")):
        assert time.time() - began < deadline, "no checkpoint was written"
        time.sleep(0.2)


def workers_of(agent: subprocess.Popen) -> list[int]:
    listed = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in listed]


def running(pid: int) -> bool:
    """Alive and not a zombie (a worker that exited but whose agent has not reaped it yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def one_host(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_host")
    done = subprocess.run(
        torchrun_command(4, *TRAIN, "--out", str(out)),
        capture_output=True,
        text=True,
        timeout=300,
        env=mh.environment(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return log(out)


def test_two_hosts_train_exactly_like_one_host(hosts, one_host, tmp_path):
    began = time.time()
    codes = [p.wait(timeout=300) for p in start(tmp_path)]
    assert codes == [0, 0], (tmp_path / "h0.err").read_text()[-3000:]
    assert log(tmp_path) == one_host
    print(f"\ntwo hosts: exit codes {codes} after {time.time() - began:.1f} s")


def test_each_host_its_own_out_folder_is_a_clear_error_on_both(hosts, tmp_path):
    began = time.time()
    procs = start(tmp_path, outs=(tmp_path / "host0", tmp_path / "host1"))
    codes = [p.wait(timeout=300) for p in procs]
    took = time.time() - began
    assert codes[0] != 0 and codes[1] != 0
    for k in (0, 1):
        errors = [line for line in (tmp_path / f"h{k}.err").read_text().splitlines() if "prsgd train: error" in line]
        assert errors and "rank 0 cannot see the checkpoint shards of rank 2, 3" in errors[0], errors
        assert "shared filesystem" in errors[0]
    print(f"\nseparate --out: exit codes {codes} after {took:.1f} s")


def test_killing_one_hosts_workers_resumes_across_hosts_bit_identically(hosts, one_host, tmp_path):
    began = time.time()
    procs = start(tmp_path, max_restarts=1)
    first_checkpoint(tmp_path)
    victims = workers_of(procs[1])
    assert len(victims) == 2
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], (tmp_path / "h0.err").read_text()[-3000:]
    assert "resume: continuing from" in (tmp_path / "h0.out").read_text()  # not a silent restart from step 0
    assert log(tmp_path) == one_host
    print(f"\nhost 1's workers killed: exit codes {codes} after {time.time() - began:.1f} s")


def test_a_silent_partition_stops_the_workers_on_both_sides_within_the_timeout(hosts, tmp_path):
    procs = start(tmp_path, extra=("--epochs", "400", "--worker-timeout", str(TIMEOUT)))
    try:
        first_checkpoint(tmp_path)
        workers = [workers_of(p) for p in procs]
        mh.cut(1)
        cut_at = time.time()
        stopped: dict[int, float] = {}
        while len(stopped) < 2 and time.time() - cut_at < TIMEOUT + MARGIN + 20:
            for k in (0, 1):
                if k not in stopped and not any(running(pid) for pid in workers[k]):
                    stopped[k] = time.time() - cut_at
            time.sleep(0.2)
        assert set(stopped) == {0, 1}, f"workers still running {time.time() - cut_at:.0f} s after the cut: {stopped}"
        assert max(stopped.values()) < TIMEOUT + MARGIN, stopped
        agent_code = procs[0].wait(timeout=30)  # host 0 holds the rendezvous: its torchrun ends too
        assert agent_code != 0
    finally:
        mh.cut(1, down=False)
        for p in procs:  # host 1's torchrun agent waits in torch's own rendezvous for the link (README)
            if p.poll() is None:
                p.kill()
            p.wait()
    near = (tmp_path / "h0.err").read_text()
    far = (tmp_path / "h1.err").read_text()
    assert "rank 2, 3 are unresponsive (died or hung)" in near
    assert "lost the rendezvous store" in far and "network to it is cut" in far
    print(f"\npartition: host 0 exit code {agent_code}; workers stopped after {stopped} s (timeout {TIMEOUT} s)")
