"""Joining the process group torchrun describes, and knowing why it broke.

:class:`Torchrun` is one process's membership: it joins (gloo on CPU, NCCL on CUDA), agrees with every other rank
on which attempt of the job this is, owns this rank's :class:`Heartbeat` and turns a failed collective into an error
that names the rank that died, hung or stopped. Whoever joins closes it (the training run, or ``prsgd run`` once for
all its runs).

Attempts. torchrun's ``TORCHELASTIC_RESTART_COUNT`` is counted per host (per local worker group), so after one
host's workers are restarted the hosts disagree on it. prsgd instead counts, in the store torchrun's agents keep
across restarts, how many times each global rank has started (:func:`generation`): every rank of one attempt gets
the same number, which names the attempt's keys; and whether to resume is decided by all ranks together (one
all-reduce right after joining), never per host.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from prsgd.engines.distributed import (
    all_reduce_sum_,
    broadcast_object,
    group_rank,
    group_size,
    init_process_group,
    is_initialized,
)
from prsgd.errors import InvalidArgument, PrsgdError, WorkerFailure


def rendezvous_store(address: str, port: int, rank: int, timeout: datetime.timedelta) -> Any:
    """The run's rendezvous store without torchrun's agent: rank 0 hosts a ``TCPStore`` listening on ``address``
    (MASTER_ADDR) alone, not on every interface as ``init_process_group``'s own store does; the others connect.
    Port 0: a free one (``store.port`` says which)."""
    if rank != 0:
        return dist.TCPStore(address, port, is_master=False, timeout=timeout)
    family, kind, proto, _, where = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(where)
        listener.listen(1024)
    except OSError:
        listener.close()
        raise
    port = listener.getsockname()[1]
    # the store's server takes the socket over (detach: Python never closes it under the server)
    return dist.TCPStore(address, port, is_master=True, timeout=timeout, master_listen_fd=listener.detach())


def torchrun_attempt() -> int:
    """torchrun's restart count on this host (``--max-restarts``; 0 on the first attempt). Per host: see the module
    docstring; prsgd's decisions use :attr:`Torchrun.restarted`, agreed by all ranks."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def generation(store: Any, rank: int, run_id: str) -> int:
    """How many times global rank ``rank`` has started in this torchrun job (1 on the first attempt), counted in
    the store torchrun's agents keep across restarts. Every rank of an attempt gets the same number as long as every
    attempt starts every rank (a fixed world size); the attempt's keys are named by it."""
    return int(store.add(f"prsgd/{run_id}/starts/{rank}", 1))


T = TypeVar("T")


def within(seconds: float, work: Callable[[], T], what: str, started: list[threading.Thread] | None = None) -> T:
    """``work()`` in a daemon thread, given up after ``seconds``: store reads can block far past the store's own
    timeout when the network is cut (the rendezvous host unreachable). Raises :class:`TimeoutError` then. The thread
    is appended to ``started`` so that its owner can wait for it before the process exits (a daemon thread still
    inside a store call when the interpreter shuts down aborts the process)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as error:  # handed to the caller
            box["error"] = error

    thread = threading.Thread(target=run, name=f"prsgd-{what}", daemon=True)
    if started is not None:
        started.append(thread)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not finish within {seconds:.1f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def setup_hint(error: BaseException) -> str:
    """What usually causes a failed multi-host set-up, judged from this host's view of the network."""
    hints = []
    master = os.environ.get("MASTER_ADDR", "")
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    multi_host = local and world > local
    try:
        own = socket.gethostbyname(socket.gethostname())
    except OSError:
        own = ""
    if multi_host and not os.environ.get("GLOO_SOCKET_IFNAME") and own and ipaddress.ip_address(own).is_loopback:
        hints.append(
            f"this host's name resolves to {own}, so gloo offers peers a loopback address: set GLOO_SOCKET_IFNAME "
            "to the network interface the hosts share (e.g. eth0) on every host, and torchrun --local-addr"
        )
    if multi_host and master in ("localhost", "127.0.0.1", "::1"):
        hints.append(
            f"MASTER_ADDR={master} on a {world}-rank job spread over several hosts: the rendezvous host must be "
            "named by an address the others reach (torchrun --rdzv-endpoint HOST:PORT with --rdzv-conf is_host=1 "
            "on that host, or --master-addr)"
        )
    if not hints:
        hints.append(
            f"the rendezvous at {master}:{os.environ.get('MASTER_PORT', '?')} was not reached in time, or refused "
            "the connection"
        )
    return "; ".join(hints)


class Torchrun:
    """This process as a rank of the group torchrun described in the environment: its device and heartbeat, the
    attempt all ranks agreed on (:attr:`generation`) and whether this is a restart (:attr:`restarted`)."""

    def __init__(self, device: torch.device, heartbeat: Heartbeat | None, generation: int, restarted: bool) -> None:
        self.device = device
        self.heartbeat = heartbeat
        self.rank = group_rank()
        self.generation = generation
        self.restarted = restarted

    @classmethod
    def join(cls, device: str, timeout: float = 300.0) -> Torchrun:
        """Join the group (unless this process already has one), with collectives that give up after ``timeout``
        seconds, agree on the attempt and start this rank's :class:`Heartbeat`. The device is ``cuda:LOCAL_RANK``
        for CUDA. A set-up that fails raises :class:`prsgd.WorkerFailure` with the likely cause."""
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise InvalidArgument(
                f"engine='distributed' needs the environment torchrun sets up (missing {', '.join(missing)}); "
                "launch with: torchrun --nproc-per-node 4 -m prsgd.train --engine distributed ..."
            )
        if device.startswith("cuda"):
            local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(local)
            backend = "nccl"
        else:
            local = torch.device(device)
            backend = "gloo"
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "run")
        attempt = 1 + torchrun_attempt()
        try:
            if not is_initialized():
                wait = datetime.timedelta(seconds=timeout)
                if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                    # torchrun's store outlives a restart: each attempt gets its own keys, so that a restarted rank
                    # never reads the address a dead rank of an earlier attempt published
                    agent = dist.TCPStore(
                        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=wait
                    )
                    attempt = generation(agent, rank, run_id)
                    store = dist.PrefixStore(f"prsgd/{run_id}/attempt_{attempt}", agent)
                    init_process_group(backend, store=store, rank=rank, world_size=world, timeout=wait)
                else:  # a store of this attempt's own (rank 0 hosts it, on MASTER_ADDR only): nothing stale
                    store = rendezvous_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, wait)
                    init_process_group(backend, store=store, rank=rank, world_size=world, timeout=wait)
            # whether to resume, decided by all: any rank that knows of an earlier attempt makes it a restart
            flag = torch.tensor([float(attempt > 1)], device=local if backend == "nccl" else "cpu")
            restarted = bool(all_reduce_sum_(flag).item() > 0)
            # the heartbeat's keys live under a prefix only the group knows: the store lists no keys, so a process
            # that can reach it cannot read or plant them without guessing 64 random bits
            token, key = broadcast_object(
                (secrets.token_hex(8), secrets.token_bytes(32)) if group_rank() == 0 else None
            )
        except (RuntimeError, TimeoutError, ValueError) as error:
            if is_initialized():
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()
            cause = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            raise WorkerFailure(
                f"rank {rank} of {world} could not join the process group: {setup_hint(error)} (cause: {cause})"
            ) from None
        heartbeat = (
            Heartbeat(timeout, group_rank(), group_size(), f"{attempt}/{token}", key) if group_size() > 1 else None
        )
        return cls(local, heartbeat, attempt, restarted)

    def explain_failure(self, error: BaseException, doing: str) -> PrsgdError:
        """The error to raise on this rank after ``error`` stopped a collective (or this rank's own work)."""
        if isinstance(error, PrsgdError):  # this rank's own, e.g. non-finite values: tell the others why it stops
            if self.heartbeat is not None:
                self.heartbeat.say_stopping(f"{type(error).__name__}: {error}")
            return error
        me = group_rank()
        cause = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        if self.heartbeat is None:
            return WorkerFailure(f"rank {me}: a collective failed while {doing}: {cause}")
        try:
            silent, stopped = self.heartbeat.unresponsive()
        except Exception:  # nobody left to tell why this rank stops
            return WorkerFailure(
                f"rank {me}: lost the rendezvous store at {self.heartbeat.address} while {doing}: its host died or "
                "the network to it is cut (the store runs in torchrun's agent on the rendezvous host or, without "
                f"torchrun, in rank 0) (cause: {cause})"
            )
        else:
            parts = []
            if silent:
                listed = ", ".join(map(str, silent))
                parts.append(f"rank {listed} {'is' if len(silent) == 1 else 'are'} unresponsive (died or hung)")
            parts += [f"rank {r} stopped ({why})" for r, why in sorted(stopped.items())]
            if not parts:
                parts.append("every other rank still responds")
            failure = WorkerFailure(
                f"rank {me}: a collective failed while {doing}: {'; '.join(parts)} (cause: {cause})"
            )
        self.heartbeat.say_stopping(f"gave up after another rank's failure while {doing}")
        return failure

    def close(self) -> None:
        """Stop the heartbeat and leave the group (peers may be gone already; the run is ending anyway)."""
        if self.heartbeat is not None:
            self.heartbeat.close()
            self.heartbeat = None
        if is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


class Heartbeat:
    """Each rank bumps a counter in the rendezvous store (a TCPStore at MASTER_ADDR:MASTER_PORT: torchrun's agent,
    or rank 0 without torchrun) every ``interval`` seconds from a daemon thread. When a collective fails,
    :meth:`unresponsive` reads the counters twice, ``2.5 interval`` apart: a rank whose counter did not move is
    dead or hung. A rank that stops because of an error of its own says so under its key first.

    Every store operation on the failure path is bounded (:func:`within`). The beating thread and the failure path
    use separate store clients, both connected at start while the store is up: a new connection to a store that has
    gone keeps retrying for seconds, an open one fails at once when its host dies. A diagnosis that cannot reach the
    store within :attr:`diagnosis_s` reports the store as lost, so a rank cut off from the rendezvous host exits
    ``worker_timeout + diagnosis_s`` after its last collective began instead of waiting for the network to come
    back. :meth:`close` gives the threads still inside a store call a second to finish: one that returns while the
    interpreter shuts down aborts the process; one that stays blocked (a store that no longer answers: the client
    has no read timeout) ends with it."""

    def __init__(self, timeout: float, rank: int, world_size: int, attempt: str = "1", key: bytes = b"") -> None:
        self.key = key
        self.interval = min(5.0, max(0.1, timeout / 20))
        self.rank, self.world_size = rank, world_size
        self.prefix = f"prsgd/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{attempt}"
        self.address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        self.diagnosis_s = 4.5 * self.interval + 2.0
        self._beat_store = self._client()
        self._ask_store = self._client()
        self._helpers: list[threading.Thread] = []
        self._stop = threading.Event()
        self._beats = 0
        self._beat()
        self._thread = threading.Thread(target=self._run, name="prsgd-heartbeat", daemon=True)
        self._thread.start()

    def _client(self) -> Any:
        return dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=max(2.0, self.interval)),
        )

    def _beat(self) -> None:
        self._beats += 1
        self._beat_store.set(*self._signed("beat", str(self._beats)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception:  # the store is gone: the failure is reported by the collective that notices it
                return

    def _signed(self, kind: str, value: str, rank: int | None = None) -> tuple[str, str]:
        """The store key of this rank's ``kind`` and ``value`` signed with the run's secret key (HMAC-SHA256 of the
        key and the value): a process that reaches the store but is not a rank of this run cannot forge it."""
        key = f"{self.prefix}/{kind}/{self.rank if rank is None else rank}"
        mac = hmac.new(self.key, f"{key}\n{value}".encode(), hashlib.sha256).hexdigest()
        return key, f"{mac}:{value}"

    def _read(self, store: Any, kind: str) -> dict[int, str]:
        """Every rank's ``kind`` value whose signature holds; a value that does not verify is left out."""
        found = {}
        for rank in range(self.world_size):
            key = f"{self.prefix}/{kind}/{rank}"
            if store.check([key]):
                mac, _, value = store.get(key).decode(errors="replace").partition(":")
                if hmac.compare_digest(mac, self._signed(kind, value, rank)[1].partition(":")[0]):
                    found[rank] = value
        return found

    def say_stopping(self, reason: str) -> None:
        """Tell the other ranks why this one stops (best effort, at most ``2 interval + 1`` seconds)."""
        with contextlib.suppress(Exception):
            say = functools.partial(self._ask_store.set, *self._signed("stopped", reason[:500]))
            within(2 * self.interval + 1.0, say, "heartbeat-say", self._helpers)

    def unresponsive(self) -> tuple[list[int], dict[int, str]]:
        """(ranks that stopped beating, {rank: the reason a rank gave for stopping}); raises (:class:`TimeoutError`
        among others) when the store cannot be reached within :attr:`diagnosis_s`."""

        def diagnose() -> tuple[dict[int, str], dict[int, str], dict[int, str]]:
            first = self._read(self._ask_store, "beat")
            time.sleep(2.5 * self.interval)
            return first, self._read(self._ask_store, "beat"), self._read(self._ask_store, "stopped")

        first, second, stopped = within(self.diagnosis_s, diagnose, "heartbeat-diagnosis", self._helpers)
        silent = [r for r in range(self.world_size) if r != self.rank and first.get(r) == second.get(r)]
        return [r for r in silent if r not in stopped], {r: why for r, why in stopped.items() if r != self.rank}

    def close(self) -> None:
        self._stop.set()
        deadline = time.monotonic() + 1.0
        for thread in [self._thread, *self._helpers]:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))


def torchrun_nodes() -> int:
    """How many nodes torchrun started: ``WORLD_SIZE / LOCAL_WORLD_SIZE``; :class:`InvalidArgument` without them."""
    world, local = os.environ.get("WORLD_SIZE"), os.environ.get("LOCAL_WORLD_SIZE")
    if not world or not local or not world.isdigit() or not local.isdigit() or int(local) == 0:
        raise InvalidArgument(
            "inner_period= needs to know the nodes: pass nodes= (how many nodes the ranks form), or launch with "
            "torchrun (WORLD_SIZE and LOCAL_WORLD_SIZE)"
        )
    if int(world) % int(local):
        raise InvalidArgument(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}: pass nodes=")
    return int(world) // int(local)
