"""Live fault tolerance on torchft: each round averages over the replica groups alive at that round, a group that
dies is left out, and its replacement (or the group itself, restarted) recovers from a live peer and joins.

Every replica group is one process (a torchrun job of one rank) with a torchft ``Manager``: torchft's Lighthouse
(``prsgd lighthouse``) forms a quorum of the groups alive, its process group (gloo, reconfigured when the quorum
changes) carries the rounds, and its checkpoint transport (point to point over that process group, no HTTP server)
carries a live peer's state to a group that recovers. prsgd writes no quorum of its own; it decides *when* torchft
acts, so that the algorithm's rounds stay exact:

- **A quorum after each committed round** (and one at construction): a group whose torchft step is behind (a fresh
  or restarted one, or every group but the first at the very start, so all begin at the same x^0) loads a live
  peer's whole state there: parameters, buffers, optimizer state, the round stages' state (residuals, anchors,
  outer momentum) and the step counter. Every group is then at the same step boundary, holding the round's
  result: a group that recovers copies a peer exactly and trains the next period as a full member.
- **A step that communicates runs on a snapshot** of this group's state. Its collectives go over the quorum's
  process group; torchft's ``should_commit`` then says whether every collective of the round succeeded. If not (a
  group died during the period or the round), the snapshot is restored, a new quorum forms without the dead group,
  and the step runs again from the same gradients, so the round averages exactly the groups alive. If the new
  quorum says this group is behind (the others committed the round it failed), it loads their result instead.

A group's data position is its step (``steps_done``): after recovering, a group continues at its peer's step, as
:class:`prsgd.data.WorkerSampler` draws batches by step. Traffic is counted for committed rounds only; a round run
again counts once.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.distributed.distributed_c10d import AllgatherOptions, AllreduceOptions, AllToAllOptions, ReduceOp

from prsgd.algorithm.rules import Field, Scope
from prsgd.engines.distributed import ProcessGroupCommunicator
from prsgd.engines.fault_tolerance import FaultTolerance, Membership, local_address
from prsgd.engines.lighthouse import torchft_module
from prsgd.engines.torchrun import rendezvous_store
from prsgd.errors import InvalidArgument, WorkerFailure


class GroupState(Protocol):
    """What a replica group's optimizer (:class:`prsgd.LocalSGD`) gives and takes: its whole state."""

    @property
    def steps_done(self) -> int: ...

    def worker_state(self) -> Tensor: ...

    def round_state(self) -> dict[str, Any]: ...

    def load_worker_state(self, values: Tensor, round_state: dict[str, Any] | None = None) -> None: ...


class ReplicaGroups:
    """This group's torchft ``Manager`` and the protocol above: :meth:`join` at construction, :meth:`step` around
    each step that communicates. ``state`` is the group's optimizer, whose whole state a peer that recovers copies;
    ``identity`` (the settings that must agree between groups: model, rule, period, ...) travels with it, and a
    peer that differs is named, not loaded."""

    def __init__(self, settings: FaultTolerance, state: GroupState, identity: dict[str, str], device: torch.device):
        self.settings = settings = settings.resolved()
        os.environ.setdefault("RUST_LOG", "warn")  # torchft's servers log every quorum at INFO otherwise
        torchft_module()  # the ft extra, or how to install it
        logging.getLogger("torchft").setLevel(logging.ERROR)  # e.g. "Unable to reset NCCL flight recorder" per quorum
        for noise in ("The given buffer is not writable", r"`isinstance\(treespec, LeafSpec\)` is deprecated"):
            warnings.filterwarnings("ignore", message=noise)  # torchft's checkpoint transport, on every recovery
        from torchft import manager as ft_manager
        from torchft.checkpointing.pg_transport import PGTransport
        from torchft.process_group import ProcessGroupGloo

        class QuorumGroup(ProcessGroupGloo):
            """torchft's gloo group, noting the replica groups of each quorum it is configured for."""

            members: list[int] = []  # noqa: RUF012 (set per instance at each quorum)

            def configure(self, *args: Any, **kwargs: Any) -> None:
                ranks = kwargs.get("global_ranks", args[7] if len(args) > 7 else None)
                self.members = list(ranks or [])  # replica group numbers (one rank each)
                super().configure(*args, **kwargs)

        self.state, self.identity = state, identity
        self._failure: BaseException | None = None  # what recovering from a peer raised (on torchft's thread)
        self.membership = Membership(groups=settings.groups)
        self.recovered = False
        host = local_address(settings.lighthouse)
        timeout = timedelta(seconds=settings.timeout)
        self._store = rendezvous_store(host, 0, 0, timeout)  # this group's own (one rank), listening on `host` only
        self.pg = QuorumGroup(timeout=timeout)
        server = ft_manager.ManagerServer

        def listening_on_host(**kwargs: Any) -> Any:  # torchft binds its manager server to [::]; we bind `host`
            kwargs["bind"] = kwargs["bind"].replace("[::]", f"[{host}]" if ":" in host else host)
            return server(**kwargs)

        ft_manager.ManagerServer = listening_on_host
        try:
            self.manager = ft_manager.Manager(
                pg=self.pg,
                load_state_dict=None,
                state_dict=None,
                min_replica_size=1,  # the Lighthouse's --min-replicas decides when a quorum forms
                use_async_quorum=False,  # recovery completes inside start_quorum, at a step boundary
                timeout=timeout,
                quorum_timeout=timeout,
                connect_timeout=timeout,
                rank=0,
                world_size=1,
                store_addr=host,
                store_port=self._store.port,
                lighthouse_addr=settings.lighthouse,
                replica_id=str(settings.replica_group),
                hostname=host,
                checkpoint_transport=PGTransport(self.pg, timeout, device),
                init_sync=True,  # at the start every group but one copies that one's x^0
            )
        except RuntimeError as error:
            first = (str(error).strip().splitlines() or [""])[0][:300]
            raise WorkerFailure(
                f"replica group {settings.replica_group}: no Lighthouse answered at {settings.lighthouse} within "
                f"{settings.timeout:g} s; start one with prsgd lighthouse --min-replicas K ({first})"
            ) from None
        finally:
            ft_manager.ManagerServer = server
        self.manager.register_state_dict_fn("prsgd", self._recover, self._offer)

    # the state a peer recovers from
    def _offer(self) -> dict[str, Any]:
        state = {"values": self.state.worker_state().clone(), "round": self.state.round_state()}
        return {"identity": self.identity, "group": self.settings.replica_group, "state": state}

    def _recover(self, offered: dict[str, Any]) -> None:
        try:
            self._recover_from(offered)
        except BaseException as error:  # raised from _quorum, whichever thread torchft called this on
            self._failure = error
            raise

    def _recover_from(self, offered: dict[str, Any]) -> None:
        theirs = offered["identity"]
        differ = [k for k in sorted(set(theirs) | set(self.identity)) if theirs.get(k) != self.identity.get(k)]
        if differ:
            named = "; ".join(f"{k}: {self.identity.get(k)} here, {theirs.get(k)} there" for k in differ)
            raise InvalidArgument(
                f"replica group {self.settings.replica_group} was started with another config than replica group "
                f"{offered['group']} ({named}); start every group with the same settings"
            )
        self.state.load_worker_state(offered["state"]["values"], offered["state"]["round"])
        self.recovered = True
        self.membership.recovered(int(offered["state"]["round"]["steps_done"]), int(offered["group"]))

    # the protocol
    def join(self) -> None:
        """The first quorum: wait for one to form, and recover from a peer if this group is behind. A fresh start
        (torchft's step 0 everywhere) waits, up to the timeout, until the run's ``groups`` have all joined (a group
        slower to start would otherwise miss the first rounds), and then every group commits once, so that a group
        joining before the first round finds the others ahead and copies them, not the other way round."""
        self._quorum()
        deadline = time.monotonic() + self.settings.timeout
        expected = self.settings.groups or 0
        while self.manager.current_step() == 0 and self.size < expected and time.monotonic() < deadline:
            time.sleep(0.05)  # the Lighthouse answers at once while no other group is starting
            self._quorum()
        if self.manager.current_step() == 0:
            self._commit()
        self.membership.joins = self.membership.losses = 0  # counted from here on, between this group's rounds

    def step(self, run: Callable[[], bool]) -> bool:
        """``run()`` (a step or round that communicates) until torchft commits its collectives on every group,
        restoring the state from before it for each new try; or, if a new quorum finds this group behind, the
        peer's result. Then the next quorum. Returns what ``run`` returned (True after a recovery)."""
        values, round_state = self.state.worker_state().clone(), copy.deepcopy(self.state.round_state())
        while True:
            result = run()
            if self._commit():
                self.membership.round(self.state.steps_done)
                self._quorum()
                return result
            self.membership.retries += 1
            self.state.load_worker_state(values, round_state)
            if self._quorum():
                return True

    def _commit(self) -> bool:
        try:
            return self.manager.should_commit()
        except Exception as error:  # the group's own manager server: it does not fail unless the process does
            group = self.settings.replica_group
            raise WorkerFailure(f"replica group {group}: torchft's commit failed: {error}") from None

    def _quorum(self) -> bool:
        """A quorum (retried while forming one fails, e.g. a peer died while sending its state); whether this group
        recovered from a peer in it."""
        self.recovered = False
        deadline = time.monotonic() + self.settings.timeout
        while True:
            self._failure = None
            try:
                self.manager.start_quorum()
            except Exception as error:
                if self._failure is not None:
                    raise self._failure from None
                raise self._no_quorum(error) from None
            if self._failure is not None:
                raise self._failure
            if self.manager.errored() is None:
                break
            if time.monotonic() > deadline:
                raise WorkerFailure(
                    f"replica group {self.settings.replica_group}: no quorum could be used for "
                    f"{self.settings.timeout:g} s ({str(self.manager.errored()).splitlines()[0][:200]})"
                )
        self.membership.quorum(self.pg.members)
        return self.recovered

    def _no_quorum(self, error: BaseException) -> WorkerFailure:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        return WorkerFailure(
            f"replica group {self.settings.replica_group}: no quorum formed within {self.settings.timeout:g} s: "
            f"fewer replica groups alive than the Lighthouse's --min-replicas, or no Lighthouse at "
            f"{self.settings.lighthouse} ({first})"
        )

    # collectives on the quorum's process group; after a failure the rest of the round is skipped (not committed)
    def _run(self, work: Callable[[], Any]) -> bool:
        if self.manager.errored() is not None:
            return False
        try:
            work().wait()
        except Exception as error:
            self.manager.report_error(error)
            return False
        return True

    def all_reduce_sum(self, tensor: Tensor) -> bool:
        opts = AllreduceOptions()
        opts.reduceOp = ReduceOp.SUM
        return self._run(lambda: self.pg.allreduce([tensor], opts))

    def all_gather(self, rows: list[Tensor], row: Tensor) -> bool:
        return self._run(lambda: self.pg.allgather([rows], [row], AllgatherOptions()))

    def all_to_all(self, received: Tensor, sent: Tensor) -> bool:
        return self._run(lambda: self.pg.alltoall_base(received, sent, [], [], AllToAllOptions()))

    @property
    def size(self) -> int:
        return self.membership.participants

    def close(self) -> None:
        self.manager.shutdown(wait=False)


class FaultTolerantCommunicator(ProcessGroupCommunicator):
    """:class:`~prsgd.engines.distributed.ProcessGroupCommunicator` over the quorum of replica groups alive: the same
    rounds (one all-reduce of a span, the compressed exchanges' all-to-all and all-gather), each divided by the
    groups in the quorum, their collectives on its process group; gossip, overlapped and hierarchical rounds are
    refused at construction."""

    def __init__(self, storage: Any, groups: ReplicaGroups, **kwargs: Any) -> None:
        super().__init__(storage, None, None, **kwargs)
        self.groups = groups
        self.num_workers = groups.settings.groups or 1

    @property
    def world_size(self) -> int:  # the quorum's
        return self.groups.size

    def _all_reduce_sum(self, tensor: Tensor, group: Any) -> bool:
        return self.groups.all_reduce_sum(tensor)

    def _all_to_all(self, received: Tensor, sent: Tensor) -> bool:
        return self.groups.all_to_all(received, sent)

    def _all_gather(self, gathered: Tensor, row: Tensor) -> bool:
        return self.groups.all_gather(list(gathered.split(row.numel())), row)

    def worker_mean(self, values: Tensor) -> None:
        """Not measured: a round may fail and run again, over a quorum that changes (see prsgd.algorithm.drift)."""
        return None

    def _mix(self, flat: Tensor, step: int) -> None:
        raise RuntimeError("gossip rounds are refused with fault tolerance at construction")

    def average(self, fields: Sequence[Field], scope: Scope = "all") -> None:
        if scope == "node":
            raise RuntimeError("hierarchical rounds are refused with fault tolerance at construction")
        super().average(fields, scope)
