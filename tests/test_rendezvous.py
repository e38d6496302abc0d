"""The rendezvous store and the heartbeat in it, in one process on 127.0.0.1: the store prsgd hosts without torchrun
listens on MASTER_ADDR alone, and a heartbeat value planted by a process that is not a rank of the run is refused."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch.distributed as dist
from helpers import free_port

from prsgd.engines.torchrun import Heartbeat, rendezvous_store


def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp writes them) that listen on ``port``."""
    found = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_the_store_without_torchrun_listens_on_master_addr_only():
    port = free_port()
    store = rendezvous_store("127.0.0.1", port, 0, datetime.timedelta(seconds=10))
    assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0 (every interface)
    client = rendezvous_store("127.0.0.1", port, 1, datetime.timedelta(seconds=10))
    client.set("k", "v")
    assert store.get("k") == b"v"


def test_a_planted_heartbeat_value_is_refused_and_a_signed_one_is_read(monkeypatch):
    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    store = rendezvous_store("127.0.0.1", port, 0, datetime.timedelta(seconds=10))
    key = bytes(range(32))
    me = Heartbeat(2.0, 0, 2, "1/secretprefix", key)
    try:
        outsider = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=5))
        outsider.set(f"{me.prefix}/stopped/1", "a false reason")  # unsigned
        outsider.set(f"{me.prefix}/stopped/1", "0" * 64 + ":a false reason")  # a guessed signature
        silent, stopped = me.unresponsive()
        assert (silent, stopped) == ([1], {})  # rank 1 never beat; the planted reason is not believed
        other = Heartbeat(2.0, 1, 2, "1/secretprefix", key)  # rank 1 of the run: it knows the key
        other.say_stopping("out of memory")
        other.close()
        assert me.unresponsive()[1] == {1: "out of memory"}
        wrong_key = Heartbeat(2.0, 1, 2, "1/secretprefix", bytes(32))
        wrong_key.say_stopping("a false reason")
        wrong_key.close()
        assert me.unresponsive()[1] == {}
    finally:
        me.close()
    del store
