"""How long a run takes on a given network: measured compute per step plus a cost model of the collectives the
run's rounds actually issue (their trace, :attr:`prsgd.algorithm.contract.CommStats.trace`).

Collectives, for ``n`` workers each holding ``S`` bytes, with ``B`` the payload bytes per second of the slowest
link a step crosses and ``L`` its latency per message (the alpha-beta model):

- all-reduce, as a ring (reduce-scatter then all-gather): ``2 (n - 1)`` steps of ``S / n`` bytes each;
- all-gather (a compressed round's sparse or low-bit rows), as a ring: ``n - 1`` steps of ``S`` bytes;
- point to point (gossip): the worker's sends share its link, ``S`` being their sum: ``S / B + L``.

A round within a node (hierarchical inner rounds) runs over the node's ``n = workers / nodes`` workers and the
intra-node links; a round over all workers crosses node links whenever there is more than one node. An overlapped
round runs behind the ``delay`` steps of compute before the step that waits for it: only what exceeds that compute
adds to the wait. A step's time is its compute plus what its rounds add; the run's is the mean step of the traced
cycle times the run's steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from prsgd.algorithm.contract import Collective
from prsgd.errors import InvalidArgument
from prsgd.planning.network import Network


@dataclass(frozen=True)
class Layout:
    """``workers`` in ``nodes`` nodes of consecutive workers (``nodes == workers``: one worker per node)."""

    workers: int
    nodes: int

    def __post_init__(self) -> None:
        if self.workers < 1 or self.nodes < 1 or self.workers % self.nodes:
            raise InvalidArgument(
                f"--nodes {self.nodes} does not divide the {self.workers} workers; allowed: a divisor of "
                f"{self.workers} (nodes of equally many workers)"
            )

    @property
    def per_node(self) -> int:
        return self.workers // self.nodes


def collective_seconds(collective: Collective, layout: Layout, network: Network, bare_s: float = 0.0) -> float:
    """The time one collective takes (see the module docstring), and at least ``bare_s``: what moving its bytes
    costs the machine itself (a bare collective over loopback), which a faster link does not remove."""
    within = collective.scope == "node" or layout.nodes == 1
    n = layout.per_node if collective.scope == "node" else layout.workers
    if n <= 1:
        return 0.0
    # a ring over several nodes moves at its slowest link: the node's
    crossing = within or layout.per_node == 1
    rate = network.bytes_per_s(within) if crossing else min(network.bytes_per_s(False), network.bytes_per_s(True))
    latency = network.message_latency(within)
    if not crossing:
        latency = max(network.message_latency(False), network.message_latency(True))
    size = collective.bytes
    if collective.kind == "all_reduce":
        wire = 2 * (n - 1) * (size / n / rate + latency)
    elif collective.kind == "all_gather":
        wire = (n - 1) * (size / rate + latency)
    else:  # point to point
        wire = size / rate + latency
    return max(wire, bare_s)


def step_seconds(
    collectives: Sequence[Collective],
    compute_s: float,
    delay: int,
    layout: Layout,
    network: Network,
    bare_s: Mapping[tuple, float] | None = None,
) -> tuple[float, float]:
    """(the step's wall-clock, the communication it waited for): its compute plus its rounds' time, an overlapped
    round's only beyond the ``delay`` steps of compute it ran behind; ``bare_s``: each collective's bare time on the
    machine, by (kind, bytes, scope)."""
    bare_s = bare_s or {}

    def seconds(c: Collective) -> float:
        return collective_seconds(c, layout, network, bare_s.get((c.kind, c.bytes, c.scope), 0.0))

    waited = sum(seconds(c) for c in collectives if not c.overlapped)
    behind = sum(seconds(c) for c in collectives if c.overlapped)
    waited += max(0.0, behind - delay * compute_s)
    return compute_s + waited, waited


@dataclass(frozen=True)
class Profile:
    """What a prediction knows of a run: its ``steps``, the compute of one worker's step (``compute_s``, measured
    or given), the collectives of each step over one cycle of its schedule (``cycle``), the overlap ``delay``, the
    ``period`` (1 for every-step rules), its layout, the bytes of one worker's whole state (parameters, buffers,
    optimizer state: what a recovering worker is sent), the steps between checkpoints and the rounds' own cost per
    step."""

    steps: int
    compute_s: float
    cycle: list[list[Collective]]
    delay: int
    period: int
    layout: Layout
    state_bytes: int
    checkpoint_steps: int
    overhead_s: float = 0.0
    """Per step on average, what the rounds cost besides moving bytes (their own work on the machine, measured)."""
    bare_s: dict = field(default_factory=dict)
    """Each collective's bare time on the machine by (kind, bytes, scope): a link faster than that does not help."""


@dataclass(frozen=True)
class Prediction:
    train_s: float
    seconds_per_step: float
    compute_utilization: float
    bytes_per_step: float
    peak_step_bytes: int
    communication_s: float
    rounds_per_step: float

    def as_dict(self) -> dict[str, float]:
        return {
            "train_s": self.train_s,
            "seconds_per_step": self.seconds_per_step,
            "compute_utilization": self.compute_utilization,
            "bytes_per_step": self.bytes_per_step,
            "peak_step_bytes": self.peak_step_bytes,
            "communication_s": self.communication_s,
            "rounds_per_step": self.rounds_per_step,
        }


def predict(profile: Profile, network: Network) -> Prediction:
    """The run's training time on ``network`` (what ``prsgd train`` logs as ``wall_clock``)."""
    times = [
        step_seconds(step, profile.compute_s, profile.delay, profile.layout, network, profile.bare_s)
        for step in profile.cycle
    ]
    length = len(profile.cycle)
    per_step = sum(t for t, _ in times) / length + profile.overhead_s
    communication = sum(w for _, w in times) / length
    sent = [sum(c.bytes for c in step) for step in profile.cycle]
    return Prediction(
        train_s=per_step * profile.steps,
        seconds_per_step=per_step,
        compute_utilization=profile.compute_s / per_step,
        bytes_per_step=sum(sent) / length,
        peak_step_bytes=max(sent),
        communication_s=communication * profile.steps,
        rounds_per_step=sum(map(len, profile.cycle)) / length,
    )


def failure_cost(
    profile: Profile, prediction: Prediction, network: Network, mtbf_s: float, restart_s: float
) -> dict[str, float]:
    """The expected seconds lost to failures when each worker fails on average every ``mtbf_s`` seconds:
    ``restart`` (every worker stops, restarts in ``restart_s`` and redoes the steps since the last checkpoint, half
    the checkpoint interval on average) and ``live_recovery`` (the others go on: the run loses the failed worker's
    share of ``restart_s``, the wait while a peer sends it the whole state, and half a period's work of one worker
    that a retried round redoes). ``failures``: the expected number."""
    failures = profile.layout.workers * prediction.train_s / mtbf_s
    redo = profile.checkpoint_steps / 2 * prediction.seconds_per_step
    transfer = profile.state_bytes / network.bytes_per_s(False) + network.message_latency(False)
    period_s = profile.period * prediction.seconds_per_step
    live = restart_s / profile.layout.workers + transfer + period_s / 2 / profile.layout.workers
    return {
        "failures": failures,
        "restart_s": failures * (restart_s + redo),
        "live_recovery_s": failures * live,
    }
