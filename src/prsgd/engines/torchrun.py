"""Joining the process group torchrun describes, and knowing why it broke.

:class:`Torchrun` is one process's membership: it joins (gloo on CPU, NCCL on CUDA), owns this rank's
:class:`Heartbeat` and turns a failed collective into an error that names the rank that died, hung or stopped. Whoever
joins closes it (the training run, or ``prsgd run`` once for all its runs).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
import time

import torch
import torch.distributed as dist

from prsgd.engines.distributed import group_rank, group_size, init_process_group, is_initialized
from prsgd.errors import InvalidArgument, PrsgdError, WorkerFailure


def torchrun_attempt() -> int:
    """How many times torchrun (``--max-restarts``) restarted this job after a failure (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def restarted_by_torchrun() -> bool:
    """Whether torchrun restarted this job after a failure: then it resumes by itself."""
    return torchrun_attempt() > 0


class Torchrun:
    """This process as a rank of the group torchrun described in the environment: its device and heartbeat."""

    def __init__(self, device: torch.device, heartbeat: Heartbeat | None) -> None:
        self.device = device
        self.heartbeat = heartbeat
        self.rank = group_rank()

    @classmethod
    def join(cls, device: str, timeout: float = 300.0) -> Torchrun:
        """Join the group (unless this process already has one), with collectives that give up after ``timeout``
        seconds, and start this rank's :class:`Heartbeat`. The device is ``cuda:LOCAL_RANK`` for CUDA."""
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
        if not is_initialized():
            wait = datetime.timedelta(seconds=timeout)
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                # torchrun's store outlives a restart: give each attempt its own keys, so that a restarted rank never
                # reads the address a dead rank of the previous attempt published (gloo then waits on it until timeout)
                agent = dist.TCPStore(
                    os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=wait
                )
                store = dist.PrefixStore(f"prsgd/attempt_{torchrun_attempt()}", agent)
                rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
                init_process_group(backend, store=store, rank=rank, world_size=world, timeout=wait)
            else:
                init_process_group(backend, timeout=wait)
        heartbeat = Heartbeat(timeout, group_rank(), group_size()) if group_size() > 1 else None
        return cls(local, heartbeat)

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
        except Exception:
            failure = WorkerFailure(
                f"rank {me}: lost the rendezvous store at {self.heartbeat.address} while {doing}; it runs in "
                f"torchrun's agent or, without torchrun, in rank 0, which is then unresponsive (cause: {cause})"
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
    dead or hung. A rank that stops because of an error of its own says so under its key first."""

    def __init__(self, timeout: float, rank: int, world_size: int) -> None:
        self.interval = min(5.0, max(0.1, timeout / 20))
        self.rank, self.world_size = rank, world_size
        self.prefix = f"prsgd/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{torchrun_attempt()}"
        self.address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        self._store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=max(5.0, 4 * self.interval)),
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beats = 0
        self._beat()
        self._thread = threading.Thread(target=self._run, name="prsgd-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self._beats += 1
        with self._lock:
            self._store.set(f"{self.prefix}/beat/{self.rank}", str(self._beats))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception:  # the store is gone: the failure is reported by the collective that notices it
                return

    def _read(self, kind: str) -> dict[int, str]:
        keys = [f"{self.prefix}/{kind}/{r}" for r in range(self.world_size)]
        with self._lock:
            return {r: self._store.get(k).decode() for r, k in enumerate(keys) if self._store.check([k])}

    def say_stopping(self, reason: str) -> None:
        with contextlib.suppress(Exception), self._lock:
            self._store.set(f"{self.prefix}/stopped/{self.rank}", reason[:500])

    def unresponsive(self) -> tuple[list[int], dict[int, str]]:
        """(ranks that stopped beating, {rank: the reason a rank gave for stopping}); raises if no store."""
        first = self._read("beat")
        time.sleep(2.5 * self.interval)
        second = self._read("beat")
        stopped = self._read("stopped")
        silent = [r for r in range(self.world_size) if r != self.rank and first.get(r) == second.get(r)]
        return [r for r in silent if r not in stopped], {r: why for r, why in stopped.items() if r != self.rank}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
