"""The sync rules: what a round communicates, and what happens to the local rule's optimizer state at a round.

Algorithm 1 (``params_and_momentum``) and Algorithm 2 (``gossip``) of Yu, Jin & Yang (2019) and the paper's
baselines, each one :class:`SyncRule`. A rule says *what* travels as field names (:data:`Field`); an engine owns
where those tensors live and how they travel (:class:`prsgd.algorithm.contract.Communicator`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prsgd.errors import InvalidArgument

Field = Literal["params", "buffers", "grads", "state", "local_state"]
"""What a round communicates: all parameters, floating-point model buffers, this step's gradients, and the local
rule's optimizer state (every tensor it keeps per parameter, by name: momentum SGD's ``momentum_buffer``), but for
``local_state``: the state tensors a round never sends (those ``sync_state`` leaves out)."""

Round = Literal["gradients", "average", "mix", "nothing"]
Scope = Literal["all", "node"]
"""Who averages together: every worker, or the workers of each node (a hierarchical run's inner rounds)."""
StateAtRound = Literal["average", "clear", "keep"]


@dataclass(frozen=True)
class SyncRule:
    """What a round communicates and what happens to the optimizer state (momentum buffers) at a round.

    ``communicates``: ``"gradients"`` (every step, before the local update; ``period`` ignored), ``"average"``
    (parameters and float buffers over all workers every ``period`` steps, eq. 6), ``"mix"`` (with neighbours
    through W every ``period`` steps, eq. 18) or ``"nothing"``. ``state``: every named state tensor of the local
    rule averaged (or mixed) with the parameters, cleared, or kept per worker; only ``"keep"`` for rules that do not
    average or mix parameters.
    """

    name: str
    description: str
    communicates: Round
    state: StateAtRound = "keep"

    def __post_init__(self) -> None:
        if self.communicates not in ("gradients", "average", "mix", "nothing"):
            raise ValueError(f"SyncRule {self.name}: communicates={self.communicates!r} is not a kind of round")
        if self.state not in ("average", "clear", "keep"):
            raise ValueError(f"SyncRule {self.name}: state={self.state!r} is not average, clear or keep")
        if self.communicates in ("gradients", "nothing") and self.state != "keep":
            raise ValueError(f"SyncRule {self.name}: a rule without parameter rounds keeps momentum per worker")

    @property
    def momentum(self) -> StateAtRound:
        """What happens to momentum buffers at a round (momentum SGD's one state tensor): :attr:`state`."""
        return self.state

    @property
    def averages_gradients(self) -> bool:
        return self.communicates == "gradients"

    @property
    def averages_params(self) -> bool:
        return self.communicates == "average"

    @property
    def mixes(self) -> bool:
        return self.communicates == "mix"

    @property
    def periodic(self) -> bool:
        """Whether rounds happen every ``period`` steps (after the local update)."""
        return self.communicates in ("average", "mix")

    def round_fields(self) -> tuple[Field, ...]:
        """What a parameter round communicates: parameters, float buffers and, when averaged, the optimizer state."""
        return ("params", "buffers", "state") if self.state == "average" else ("params", "buffers")


SYNC_RULES: dict[str, SyncRule] = {
    rule.name: rule
    for rule in (
        SyncRule(
            "params_and_momentum",
            "Algorithm 1: average parameters AND momentum buffers every `period` steps",
            "average",
            "average",
        ),
        SyncRule(
            "params_clear_momentum",
            "model averaging with cleared momentum (CNTK; Wang & Joshi 2018): average parameters, zero buffers",
            "average",
            "clear",
        ),
        SyncRule(
            "params_only",
            "average parameters, keep local buffers (PyTorch's PostLocalSGDOptimizer)",
            "average",
            "keep",
        ),
        SyncRule(
            "gradients",
            "parallel mini-batch momentum SGD: all-reduce gradients every step (ignores `period`)",
            "gradients",
        ),
        SyncRule(
            "gossip",
            "Algorithm 2: mix parameters AND momentum buffers with neighbours through W (every `period` steps)",
            "mix",
            "average",
        ),
        SyncRule(
            "gossip_params_only",
            "mix parameters with neighbours through W, keep local momentum buffers",
            "mix",
            "keep",
        ),
        SyncRule("none", "independent workers, no communication", "nothing"),
    )
}


def sync_rule(name: str) -> SyncRule:
    """The :class:`SyncRule` called ``name``; :class:`prsgd.InvalidArgument` naming the allowed ones otherwise."""
    if not isinstance(name, str) or name not in SYNC_RULES:
        raise InvalidArgument(f"sync={name!r} is not a known sync rule; allowed: {', '.join(SYNC_RULES)}")
    return SYNC_RULES[name]
