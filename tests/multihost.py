"""Two simulated hosts for multi-node torchrun tests: network namespaces ``prsgd-mh-h0`` and ``-h1``, each with one
interface ``eth0`` (10.78.0.1 and .2) on a bridge in a third namespace. Made and removed by the test; traffic stays
inside them. Needs root and iproute2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

NS = "prsgd-mh"
ADDRESSES = ("10.78.0.1", "10.78.0.2")
RDZV_PORT = 29400


def available() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("ip") is not None


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def host(k: int) -> str:
    return f"{NS}-h{k}"


def make() -> None:
    remove()
    _sh("ip", "netns", "add", f"{NS}-hub")
    _sh("ip", "netns", "exec", f"{NS}-hub", "ip", "link", "add", "br0", "type", "bridge")
    _sh("ip", "netns", "exec", f"{NS}-hub", "ip", "link", "set", "br0", "up")
    for k, address in enumerate(ADDRESSES):
        _sh("ip", "netns", "add", host(k))
        _sh(
            "ip", "link", "add", "eth0", "netns", host(k), "type", "veth", "peer", "name", f"h{k}", "netns", f"{NS}-hub"
        )
        _sh("ip", "netns", "exec", host(k), "ip", "addr", "add", f"{address}/24", "dev", "eth0")
        _sh("ip", "netns", "exec", host(k), "ip", "link", "set", "eth0", "up")
        _sh("ip", "netns", "exec", host(k), "ip", "link", "set", "lo", "up")
        _sh("ip", "netns", "exec", f"{NS}-hub", "ip", "link", "set", f"h{k}", "master", "br0")
        _sh("ip", "netns", "exec", f"{NS}-hub", "ip", "link", "set", f"h{k}", "up")


def remove() -> None:
    for name in (host(0), host(1), f"{NS}-hub"):
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def cut(k: int, down: bool = True) -> None:
    """Take host ``k``'s link to the bridge down (a silent partition: no reset, packets just stop), or up again."""
    _sh("ip", "netns", "exec", f"{NS}-hub", "ip", "link", "set", f"h{k}", "down" if down else "up")


def torchrun(k: int, train_args: list[str], *, nproc: int = 2, max_restarts: int = 0) -> list[str]:
    """The README's two-host command for host ``k`` (c10d rendezvous hosted by host 0), inside its namespace."""
    return [
        "ip",
        "netns",
        "exec",
        host(k),
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"{ADDRESSES[0]}:{RDZV_PORT}",
        "--rdzv-id",
        "prsgd-test",
        "--local-addr",
        ADDRESSES[k],
        *(["--rdzv-conf", "is_host=1"] if k == 0 else ["--rdzv-conf", "is_host=0"]),
        "--max-restarts",
        str(max_restarts),
        "-m",
        "prsgd.train",
        *train_args,
    ]


def environment() -> dict[str, str]:
    return dict(
        os.environ,
        GLOO_SOCKET_IFNAME="eth0",
        OMP_NUM_THREADS="1",
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
        PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"),
    )
