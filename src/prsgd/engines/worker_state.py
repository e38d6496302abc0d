"""A LocalSGD worker's whole state as one tensor and one dict, and loading them back: what a framework checkpoints per
rank (:mod:`prsgd.integrations.lightning`, :mod:`prsgd.integrations.accelerate`), what a fault-tolerant replica
group snapshots before a round and copies from a live peer (:mod:`prsgd.engines.replica_groups`)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from prsgd.errors import CheckpointError


class WorkerState:
    """Mixed into :class:`prsgd.LocalSGD`: its flat ``storage``, ``algorithm``, local-rule counters, a wrapped
    torch optimizer (if any) and forward check are read here."""

    storage: Any
    algorithm: Any
    _counters: list[Tensor]
    _wrapped: torch.optim.Optimizer | None
    _forward_check: Any
    param_groups: list[dict[str, Any]]
    state: Any

    def worker_state(self) -> Tensor:
        """Everything this worker trains with, as one 1-D tensor (a view of its flat storage, not a copy):
        parameters, float buffers, gradient copies and optimizer state. Between rounds it differs per worker, and so
        does :meth:`round_state`: a framework that checkpoints one rank's view saves both of every rank
        (:mod:`prsgd.integrations.lightning`, :mod:`prsgd.integrations.accelerate`)."""
        return self.storage.flat

    def round_state(self) -> dict[str, Any]:
        """This worker's algorithm state: counters and the round stages' state (compression's anchor and residuals,
        an overlapped round in flight, the outer step's), as ``state_dict()["prsgd"]``, and the local rule's own
        counters (AdamW's ``step`` per parameter, which live outside :meth:`worker_state`)."""
        self._forward_check.run_pending()
        state = self.algorithm.state_dict()
        if self._counters:
            state["local_counters"] = torch.stack(self._counters).clone()
        if self._wrapped is not None:  # its state lives in the instance, outside the flat storage
            state["optimizer"] = copy.deepcopy(self._wrapped.state_dict())
        return state

    @torch.no_grad()
    def load_worker_state(
        self,
        values: Tensor,
        round_state: dict[str, Any] | None = None,
        *,
        from_consensus: bool = False,
        defer: bool = False,
    ) -> None:
        """Restore a :meth:`worker_state` (and :meth:`round_state`) of the same model saved by this worker (or, with
        ``from_consensus``, by any worker of a run in consensus). ``defer``: apply them at the next forward pass (or
        step, :meth:`synchronize`, :meth:`state_dict`) instead of now, after whatever a framework restores in between
        (accelerate restores a registered model after its load hooks run)."""
        flat = self.storage.flat
        if values.dim() != 1 or values.numel() != flat.numel():
            raise CheckpointError(
                f"the saved LocalSGD state has {values.numel()} values per worker; this model has {flat.numel()}"
            )

        def apply() -> None:
            flat.copy_(values)
            if round_state is not None and self._counters:
                torch._foreach_copy_(self._counters, list(round_state["local_counters"].unbind()))
            if round_state is not None and self._wrapped is not None:
                self._load_wrapped(round_state["optimizer"])
            if round_state is not None:
                self.algorithm.load_state_dict(round_state, from_consensus=from_consensus)
                self.algorithm.take_x0()

        if defer:
            self._forward_check.before_next_forward(apply)
        else:
            apply()

    def _load_wrapped(self, state_dict: dict[str, Any]) -> None:
        """Load a wrapped optimizer's own state dict into it, and keep sharing its (new) param groups and state."""
        self._wrapped.load_state_dict(state_dict)
        self.param_groups, self.state = self._wrapped.param_groups, self._wrapped.state
