"""Fault tolerance's settings and what a replica group records: where the Lighthouse is, which group this process
is, what a fault-tolerant LocalSGD supports, what must agree between groups, and what the quorums were.

The protocol itself (torchft's Manager, the rounds over the quorum, recovery from a live peer) is
:mod:`prsgd.engines.replica_groups`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor

from prsgd.algorithm.round import RoundSpec
from prsgd.errors import InvalidArgument, WorkerFailure, check_int, check_number

LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"
GROUP_ENV = "REPLICA_GROUP_ID"


@dataclass(frozen=True)
class FaultTolerance:
    """Where a fault-tolerant LocalSGD finds its quorum, and how long it waits.

    Args:
        lighthouse: the Lighthouse's URL (``prsgd lighthouse`` prints it); default ``$TORCHFT_LIGHTHOUSE``.
        replica_group: this group's number, 0 .. ``groups``-1 (its data shard); default ``$REPLICA_GROUP_ID``.
        groups: how many replica groups the run is meant to have (rounds over fewer are counted short); default:
            as many as the first quorum has.
        timeout: seconds a collective, a transfer of a peer's state, or the wait for a quorum may take before the
            group gives up with a clear error (fewer groups alive than the Lighthouse's ``--min-replicas`` for that
            long, no Lighthouse at the address).
    """

    lighthouse: str | None = None
    replica_group: int | None = None
    groups: int | None = None
    timeout: float = 60.0

    def resolved(self) -> FaultTolerance:
        """These settings with the environment's defaults filled in, checked."""
        lighthouse = self.lighthouse or os.environ.get(LIGHTHOUSE_ENV)
        if not lighthouse:
            raise InvalidArgument(
                f"fault tolerance needs the Lighthouse's address: set {LIGHTHOUSE_ENV} (prsgd lighthouse prints it) "
                "or pass FaultTolerance(lighthouse=...)"
            )
        parsed = urlparse(lighthouse)
        if parsed.scheme != "http" or not parsed.hostname or parsed.port is None:
            raise InvalidArgument(
                f"lighthouse={lighthouse!r} is not a Lighthouse address; it must look like http://HOST:PORT "
                "(as prsgd lighthouse prints it)"
            )
        group = self.replica_group
        if group is None:
            raw = os.environ.get(GROUP_ENV)
            if raw is None or not raw.isdigit():
                raise InvalidArgument(
                    f"fault tolerance needs this replica group's number: set {GROUP_ENV}=0, 1, ... (got {raw!r}) "
                    "or pass FaultTolerance(replica_group=...)"
                )
            group = int(raw)
        check_int("replica_group", group, 0)
        if self.groups is not None:
            check_int("groups", self.groups, 1)
            if group >= self.groups:
                raise InvalidArgument(
                    f"replica_group={group} is not allowed with groups={self.groups}; it must be in "
                    f"[0, {self.groups - 1}]"
                )
        check_number("timeout", self.timeout, positive=True)
        return FaultTolerance(lighthouse, group, self.groups, float(self.timeout))


def local_address(lighthouse: str) -> str:
    """The address this machine reaches ``lighthouse`` from: 127.0.0.1 for a Lighthouse on this machine's loopback
    (so nothing listens beyond it), else the interface that routes to it. A group's servers listen on it and
    advertise it to the others."""
    parsed = urlparse(lighthouse)
    try:
        infos = socket.getaddrinfo(parsed.hostname, parsed.port, type=socket.SOCK_DGRAM)
    except OSError as error:
        raise WorkerFailure(f"the Lighthouse's host {parsed.hostname!r} does not resolve: {error}") from None
    family, _, _, _, address = infos[0]
    if ipaddress.ip_address(address[0]).is_loopback:
        return "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.socket(family, socket.SOCK_DGRAM) as probe:  # no packet is sent: the route's source address
        probe.connect(address)
        return probe.getsockname()[0]


@dataclass
class Membership:
    """What this group saw of the quorums: the groups of the last round, the rounds averaged over fewer than the
    run's groups, the groups that joined or were lost between rounds, and how often this group recovered from a
    peer (or ran a round again after a failure)."""

    groups: int | None = None
    members: tuple[int, ...] = ()
    rounds_short: int = 0
    group_rounds: int = 0
    """Groups x committed rounds: how many groups' periods of work the rounds so far averaged (goodput)."""
    joins: int = 0
    losses: int = 0
    recoveries: int = 0
    retries: int = 0
    history: list[tuple[int, tuple[int, ...]]] = field(default_factory=list, repr=False)
    """(step, members) of every committed round, in order."""
    recovered_from: list[tuple[int, int]] = field(default_factory=list, repr=False)
    """(step, replica group) of every state this group loaded from a peer (at the start: x^0, at step 0)."""

    @property
    def participants(self) -> int:
        return len(self.members)

    def quorum(self, members: Sequence[int]) -> None:
        members = tuple(sorted(members))
        if self.members:
            self.joins += len(set(members) - set(self.members))
            self.losses += len(set(self.members) - set(members))
        self.members = members
        if self.groups is None:
            self.groups = len(members)

    def recovered(self, step: int, source: int) -> None:
        self.recovered_from.append((step, source))
        self.recoveries += step > 0  # not the copy of x^0 every group but one makes at the start

    def round(self, step: int) -> None:
        self.history.append((step, self.members))
        self.group_rounds += len(self.members)
        if self.groups is not None and len(self.members) < self.groups:
            self.rounds_short += 1

    def record(self) -> dict[str, Any]:
        """What a log record carries."""
        return {
            "participants": self.participants,
            "rounds_short": self.rounds_short,
            "group_rounds": self.group_rounds,
            "groups_joined": self.joins,
            "groups_lost": self.losses,
            "recoveries": self.recoveries,
            "rounds_retried": self.retries,
        }


def settings_for(
    fault_tolerant: object, spec: RoundSpec, process_group: Any, wrapped: torch.optim.Optimizer | None
) -> FaultTolerance | None:
    """The checked settings of a fault-tolerant LocalSGD (None for ``fault_tolerant=False``); what it cannot do is
    refused, one error line naming it."""
    if fault_tolerant is False:
        return None
    if fault_tolerant is True:
        fault_tolerant = FaultTolerance()
    if not isinstance(fault_tolerant, FaultTolerance):
        raise InvalidArgument(
            f"fault_tolerant={fault_tolerant!r} is not allowed; it must be True, False or a prsgd.FaultTolerance"
        )
    refused = [
        (spec.topology is not None, f"sync={spec.sync!r} (gossip mixes with fixed neighbours)"),
        (spec.sync == "none", "sync='none' (no round: a group that starts again has nothing to join)"),
        (bool(spec.overlap), "overlap= (a round in flight across a change of quorum)"),
        (spec.inner_period is not None, "inner_period= (hierarchical rounds)"),
        (wrapped is not None, "a wrapped torch optimizer"),
        (process_group is not None, "process_group= (each replica group averages over the quorum)"),
        (int(os.environ.get("WORLD_SIZE", "1")) > 1, "more than one rank per replica group (WORLD_SIZE > 1)"),
    ]
    for bad, what in refused:
        if bad:
            raise InvalidArgument(
                f"fault tolerance does not support {what}; allowed: the periodic rules (params_and_momentum, "
                "params_clear_momentum, params_only) and gradients, with compression, fragments, the outer step and "
                "state_period, one process per replica group"
            )
    return fault_tolerant.resolved()


def identity(
    spec: RoundSpec, rule: str, param_groups: list[dict[str, Any]], params: list[Tensor], buffers: list[Tensor]
) -> dict[str, str]:
    """What must agree between replica groups for their rounds to mean anything, by name, as text: the model's
    tensors, the local rule and its settings (the learning rate aside: a schedule may have moved it), the round."""
    settings = {k: v for k, v in param_groups[0].items() if k not in ("params", "lr", "initial_lr")}
    tensors = (*params, *buffers)
    shapes = hashlib.sha1(repr([tuple(t.shape) for t in tensors]).encode()).hexdigest()[:8]
    values = sum(t.numel() for t in tensors)
    return {
        "model": f"{len(tensors)} tensors of {values} values, {params[0].dtype}, shapes {shapes}",
        "optimizer": rule,
        **{f"optimizer.{k}": repr(v) for k, v in sorted(settings.items())},
        **{f.name: repr(getattr(spec, f.name)) for f in dataclasses.fields(spec)},
    }
