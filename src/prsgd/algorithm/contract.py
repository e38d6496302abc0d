"""The engine contract: what the algorithm asks of an engine, and the communication it counts.

An engine owns where each :data:`~prsgd.algorithm.rules.Field`'s tensors live and how they travel; the algorithm
(:class:`prsgd.algorithm.periodic.PeriodicSync` and its round stages) only asks for these operations. The simulator's
:class:`prsgd.engines.stacked.StackedCommunicator` averages over a leading worker dimension; :class:`prsgd.LocalSGD`'s
:class:`prsgd.engines.distributed.ProcessGroupCommunicator` reduces one span of its flat storage with one collective.
Engines move bytes: they know nothing of compression, overlap or the outer step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from torch import Tensor

from prsgd.algorithm.rules import Field, Scope

Kind = Literal["all_reduce", "all_gather", "p2p"]
"""How a round's bytes travel: an all-reduce (each worker's ``bytes`` reduced; a reduce-scatter and all-gather of
shards is one too), an all-gather (each worker's ``bytes`` to every other), or point to point (``bytes``: the sum
over the out-neighbours)."""


@dataclass(frozen=True)
class Collective:
    """One counted round as a trace keeps it (:attr:`CommStats.trace`): what a cost model needs to time it."""

    kind: Kind
    bytes: int
    scope: Scope = "all"
    overlapped: bool = False
    """Exchanged by an overlapped round, in the background of the steps before the one that waits for it."""


@dataclass
class CommStats:
    """Communication so far, per worker: ``rounds`` (collectives) and ``bytes`` (payload sent), of which
    ``node_rounds`` and ``node_bytes`` within a node (hierarchical runs' inner rounds), and ``peak_step_bytes``: the
    most bytes any one step sent (what the link must carry at once; a round outside the schedule, ``synchronize()``,
    counts as a step of its own; an overlapped round counts in the step that waits for it)."""

    rounds: int = 0
    bytes: int = 0
    node_rounds: int = 0
    node_bytes: int = 0
    peak_step_bytes: int = 0
    step_bytes: int = field(default=0, repr=False, compare=False)
    """Bytes sent so far in the step under way."""
    trace: list[list[Collective]] | None = field(default=None, repr=False, compare=False)
    """None, or (``CommStats(trace=[[]])``, as ``prsgd predict`` calibrates) every counted round, step by step: the
    last list is the step under way."""

    def record(self, nbytes: int, scope: Scope = "all", kind: Kind = "all_reduce") -> None:
        """Count one round that sent ``nbytes``; a round that sent nothing (a single worker) is not counted."""
        if nbytes > 0:
            if self.trace is not None:
                self.trace[-1].append(Collective(kind, nbytes, scope))
            self.rounds += 1
            self.bytes += nbytes
            self.step_bytes += nbytes
            if scope == "node":
                self.node_rounds += 1
                self.node_bytes += nbytes

    def add(self, other: CommStats) -> None:
        """Count ``other``'s rounds too (an overlapped round's, once it has been waited for), in this step."""
        self.rounds += other.rounds
        self.bytes += other.bytes
        self.step_bytes += other.bytes
        self.node_rounds += other.node_rounds
        self.node_bytes += other.node_bytes
        if self.trace is not None and other.trace is not None:
            self.trace[-1].extend(replace(c, overlapped=True) for step in other.trace for c in step)

    def background(self) -> CommStats:
        """A fresh count for a round run in the background (traced if this one is), :meth:`add`-ed once waited."""
        return CommStats(trace=[[]] if self.trace is not None else None)

    def end_step(self) -> None:
        """Close the step under way: its bytes count towards ``peak_step_bytes``."""
        self.peak_step_bytes = max(self.peak_step_bytes, self.step_bytes)
        self.step_bytes = 0
        if self.trace is not None:
            self.trace.append([])


Reduce = Callable[[Tensor], Tensor]
"""Every worker's rows of one shard, shape (N, S) in worker order -> the shard's result, shape (S,)."""


class Communicator(Protocol):
    """The engine contract: where each field's tensors live, and how they are averaged or mixed across workers.

    ``average(fields)`` replaces the listed fields' tensors, in place, by their mean over all workers;
    ``mix(fields, step)`` replaces each worker's by sum_j W_ij x_j with the step's mixing matrix W (eq. 18). Both
    count in ``comm`` what one worker sent (nothing when it sent nothing). ``tensors(field)`` lists the field's
    tensors (one worker's, or stacked ``(N, ...)``), in the order the optimizer's param groups give them."""

    num_workers: int
    comm: CommStats
    counters: list[Tensor]
    """The local rule's per-parameter counters (AdamW's ``step``): never sent, restarted with a cleared state."""
    holds_every_worker: bool
    """Whether ``tensors(field)`` are every worker's, stacked ``(N, ...)`` (the simulator), or this worker's."""

    def tensors(self, field: Field) -> list[Tensor]: ...

    def average(self, fields: Sequence[Field], scope: Scope = "all") -> None:
        """Replace the fields' tensors by their mean over all workers (``scope="all"``) or over the workers of each
        node (``"node"``), in place, and count it."""
        ...

    def average_tensors(self, tensors: list[Tensor]) -> None:
        """As :meth:`average` over all workers, of tensors that are not fields (an overlapped round's snapshot)."""
        ...

    def mix(self, fields: Sequence[Field], step: int) -> None: ...

    def worker_mean(self, values: Tensor) -> Tensor | None:
        """The mean over all workers of a few float64 numbers each holds (``values``: ``(N, k)`` stacked, or this
        worker's ``(k,)``), for measurements (:mod:`prsgd.algorithm.drift`): not counted in ``comm``, which is the
        algorithm's traffic. None where it cannot be had (a fault-tolerant run's quorum changes between rounds)."""
        ...

    def mix_tensors(self, tensors: list[Tensor], step: int) -> None:
        """As :meth:`mix`, of tensors that are not whole fields (a fragment's views), written back in place."""
        ...

    def elementwise(self, fields: Sequence[Field]) -> list[Tensor]:
        """The fields' tensors for elementwise work over all of them (compressed and overlapped rounds), with the
        workers as leading dimension: the stacked tensors, or one row (1, n) of a flat span where the engine keeps
        them contiguous."""
        ...

    def reduce_rows(self, payload: Tensor, reduce: Reduce, unit: int) -> None:
        """Replace each worker's row of ``payload`` (rows, P) by ``reduce`` of every worker's, shard by shard, in
        place, and count the payload's bytes. Shards are whole multiples of ``unit`` elements: the simulator reduces
        the whole row at once, LocalSGD has each rank reduce one shard (an all-to-all, then an all-gather), so
        ``reduce`` sees the same rows in the same worker order on both engines."""
        ...

    def gather_rows(self, payload: Tensor) -> Tensor:
        """Every worker's row of ``payload`` (rows, P), in worker order: (N, P); counts the row's bytes (an
        all-gather: each worker's row reaches every other, so what each receives grows with N)."""
        ...

    def start(self, work: Callable[[Communicator], None]) -> Callable[[], None]:
        """Run ``work`` (an overlapped round's exchange) with a communicator for exchanges that overlap training,
        and return how to wait for it: at once on the simulator, on a background thread and a process group of
        its own under ``torch.distributed``. What it sends is counted in ``comm`` when it is waited for, on both
        engines alike."""
        ...
