"""``prsgd lighthouse`` (issue 29, first step): torchft's Lighthouse started on 127.0.0.1, reachable at the address it
prints, stopped by SIGTERM with exit status 0; bad input is one error line. Each test starts and stops its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta

import pytest

torchft = pytest.importorskip("torchft")

from prsgd.engines.lighthouse import lighthouse_address, start_lighthouse  # noqa: E402
from prsgd.errors import InvalidArgument  # noqa: E402


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "prsgd.cli", "lighthouse", *args]


def test_the_lighthouse_serves_at_the_address_it_prints_until_sigterm():
    process = subprocess.Popen(
        _command("--min-replicas", "1", "--port", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "RUST_LOG": "error"},
    )
    try:
        line = process.stdout.readline()
        address = line.split()[1]
        assert address.startswith("http://127.0.0.1:") and f"TORCHFT_LIGHTHOUSE={address}" in line
        client = torchft._torchft.LighthouseClient(address, connect_timeout=timedelta(seconds=10))
        client.heartbeat("group-0")  # reached: the server answers a replica group's heartbeat
        quorum = client.quorum("group-0", timeout=timedelta(seconds=10))  # min_replicas 1: this group alone
        assert [m.replica_id for m in quorum.participants] == ["group-0"]
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0 and "lighthouse: stopped" in out


def test_the_lighthouse_binds_this_machine_only_unless_told():
    server = start_lighthouse(2, port=0)
    try:
        assert lighthouse_address(server).startswith("http://127.0.0.1:")
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-replicas", "0"], "min_replicas=0 is not allowed; it must be an integer >= 1"),
        (["--min-replicas", "1", "--bind", "somewhere"], "--bind 'somewhere' is not an IP address"),
        (["--min-replicas", "1", "--port", "70000"], "port=70000 is not allowed"),
    ],
)
def test_bad_input_is_one_error_line(args, message):
    done = subprocess.run(_command(*args), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and done.stderr.strip().splitlines()[-1].startswith("prsgd lighthouse: error: ")
    assert message in done.stderr and "Traceback" not in done.stderr


def test_a_port_in_use_is_one_clear_error():
    server = start_lighthouse(1, port=0)
    try:
        port = int(lighthouse_address(server).rsplit(":", 1)[1])
        with pytest.raises(InvalidArgument, match=f"the lighthouse could not listen on 127.0.0.1:{port}"):
            start_lighthouse(1, port=port)
    finally:
        server.shutdown()
