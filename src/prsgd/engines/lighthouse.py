"""torchft's Lighthouse, the coordinator of fault-tolerant runs: ``prsgd lighthouse`` starts one and serves until
stopped (SIGINT or SIGTERM).

Each replica group (a torchrun job) asks the Lighthouse, at every round, which groups are alive; the quorum it answers
is the set that round averages over. prsgd does not write its own quorum: the server is torchft's (its ``ft`` extra,
``torchft==0.2.0``), started here with the address checked and printed, bound to 127.0.0.1 unless ``--bind`` says
otherwise.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import threading
from typing import Any

from prsgd.errors import InvalidArgument, check_int

FT_MISSING = (
    "torchft is not installed; fault tolerance needs the ft extra: "
    ".venv/bin/python -m pip install -c constraints.txt -e '.[ft]'"
)


def torchft_module() -> Any:
    """torchft's native module, or :class:`InvalidArgument` saying how to install the ``ft`` extra."""
    try:
        from torchft import _torchft
    except ImportError:
        raise InvalidArgument(FT_MISSING) from None
    return _torchft


def check_bind(bind: str) -> str:
    """``bind`` if it is an IP address (v4, or v6 in brackets or not); :class:`InvalidArgument` otherwise."""
    try:
        ipaddress.ip_address(bind.strip("[]"))
    except ValueError:
        raise InvalidArgument(
            f"--bind {bind!r} is not an IP address; give the address to listen on, e.g. 127.0.0.1 (this machine only, "
            "the default) or 0.0.0.0 (every interface)"
        ) from None
    return bind


def start_lighthouse(
    min_replicas: int,
    port: int = 0,
    bind: str = "127.0.0.1",
    join_timeout_ms: int = 60_000,
    heartbeat_timeout_ms: int = 5_000,
) -> Any:
    """A running torchft ``LighthouseServer`` on ``bind:port`` (port 0: a free one) that forms a quorum once
    ``min_replicas`` replica groups have joined (or after ``join_timeout_ms`` with at least that many); its
    ``address()`` is what each group's ``TORCHFT_LIGHTHOUSE`` names. Checked before it starts; a port in use is one
    clear error."""
    check_int("min_replicas", min_replicas, 1)
    check_int("port", port, 0, 65535)
    check_int("join_timeout_ms", join_timeout_ms, 1)
    check_int("heartbeat_timeout_ms", heartbeat_timeout_ms, 1)
    host = _url_host(check_bind(bind))
    ft = torchft_module()
    try:
        return ft.LighthouseServer(
            bind=f"{host}:{port}",
            min_replicas=min_replicas,
            join_timeout_ms=join_timeout_ms,
            heartbeat_timeout_ms=heartbeat_timeout_ms,
        )
    except RuntimeError as error:
        raise InvalidArgument(f"the lighthouse could not listen on {host}:{port}: {error}") from None


def lighthouse_address(server: Any, bind: str = "127.0.0.1") -> str:
    """The URL replica groups reach ``server`` at: the bound address and the port it got (torchft's own
    ``address()`` names the host by its hostname, which need not resolve to the bound address), or that name when
    bound to every interface."""
    if ipaddress.ip_address(bind.strip("[]")).is_unspecified:  # every interface: reached by this host's name
        return server.address()
    port = int(server.address().rsplit(":", 1)[1])
    return f"http://{_url_host(bind)}:{port}"


def _url_host(bind: str) -> str:
    """An address as a URL's host: an IPv6 one in brackets."""
    host = bind.strip("[]")
    return f"[{host}]" if ":" in host else host


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="prsgd lighthouse",
        description="Start torchft's Lighthouse for fault-tolerant runs and serve until SIGINT or SIGTERM.",
    )
    parser.add_argument("--min-replicas", type=int, required=True, help="replica groups a round needs at least")
    parser.add_argument("--port", type=int, default=29510, help="port to listen on (0: a free one; default 29510)")
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument(
        "--join-timeout-ms", type=int, default=60_000, help="how long a round waits for more groups to join"
    )
    parser.add_argument(
        "--heartbeat-timeout-ms", type=int, default=5_000, help="silence after which a group counts as dead"
    )
    args = parser.parse_args(argv)
    server = start_lighthouse(args.min_replicas, args.port, args.bind, args.join_timeout_ms, args.heartbeat_timeout_ms)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    address = lighthouse_address(server, args.bind)
    print(
        f"lighthouse: {address} (min replicas {args.min_replicas}); give each replica group "
        f"TORCHFT_LIGHTHOUSE={address}",
        flush=True,
    )
    try:
        stop.wait()
    finally:
        server.shutdown()
    print("lighthouse: stopped", flush=True)
