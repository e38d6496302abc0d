"""Compressed averaging rounds: send the change since the last round in low precision, with error feedback.

Beyond the paper (its analysis covers exact averaging). At a round, each worker forms the change of what the round
communicates since the previous round, plus what rounding left out last time (error feedback),

    delta_i = x_i - anchor + r_i,     p_i = low(delta_i),     r_i = delta_i - p_i,

and the workers exchange the payloads p_i in the low-precision dtype. Their mean is taken exactly (fp32, summed in
worker order), the rounding error of the rounded mean is kept too (``e``, one per value, the same for everyone),

    m = low(sum_i p_i / N + e),     e = sum_i p_i / N + e - m,

and every worker sets ``x_i = anchor = anchor + m``. ``anchor`` is the value after the last round, the same on
every worker, so after a round every worker holds bitwise the same values: consensus is exact, only the average is
approximate, and neither rounding accumulates (what a round leaves out goes with the next): the anchor stays within
about one rounding step of the exact average. Local state stays in its own dtype (fp32). This is DiLoCo's
pseudo-gradient exchange with an outer step of plain averaging.

Under ``torch.distributed`` the exchange is a reduce-scatter done as an all-to-all of the low-precision payload
(each rank owns a shard, sums it exactly and rounds it) and an all-gather of the rounded shards: each rank sends
(N-1)/N of the payload twice, half the traffic of an fp32 ring all-reduce, and the arithmetic is the simulator's
exactly, whatever N. ``"bf16"`` keeps fp32's range with 8 bits of mantissa; ``"fp16"`` has 11 bits but a range of
+-65504 (deltas beyond it are clipped, the clipped part carried in the residual). With either, Algorithm 1's round
(parameters and momentum) sends the bytes of one fp32 gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from prsgd.errors import CheckpointError, InvalidArgument

CODECS: dict[str, tuple[torch.dtype, float | None]] = {"bf16": (torch.bfloat16, None), "fp16": (torch.float16, 65504.0)}


def check_compression(compression: str | None) -> str | None:
    """``compression`` if it is None or a known codec, else :class:`InvalidArgument` naming the allowed ones."""
    if compression is not None and compression not in CODECS:
        allowed = ", ".join(["None", *CODECS])
        raise InvalidArgument(f"compression={compression!r} is not known; allowed: {allowed}")
    return compression


def rounded_mean(payloads: Tensor, residual: Tensor, dtype: torch.dtype) -> Tensor:
    """The mean of every worker's payload (``payloads``: shape (N, ...), in worker order), summed exactly in fp32
    in that order, plus ``residual``, rounded to ``dtype``; ``residual`` keeps what the rounding left out. Both
    engines call this, so their arithmetic is the same."""
    total = payloads[0].float()
    for i in range(1, payloads.shape[0]):
        total += payloads[i].float()
    mean = total / payloads.shape[0] + residual
    low = mean.to(dtype)
    residual.copy_(mean - low.float())
    return low


class PayloadExchange(Protocol):
    """What an engine provides for compressed rounds (part of :class:`prsgd.algorithm.Communicator`)."""

    def mean_residual(self, payload: list[Tensor]) -> list[Tensor]:
        """Zeros for the rounded mean's residual ``e`` of ``payload``, laid out as :meth:`average_payload` uses it
        (per value, or this rank's shard)."""
        ...

    def average_payload(self, payload: list[Tensor], residual: list[Tensor]) -> None:
        """Replace each worker's ``payload`` by :func:`rounded_mean` of all workers', in place, and count it."""
        ...


class CompressedRounds:
    """The state and the rule of compressed rounds over some tensors (one worker's, or stacked ``(N, ...)``):
    ``anchor`` (the values after the last round), ``residual`` (what rounding left out, per worker) and
    ``mean_residual`` (what rounding the mean left out, the same for every worker)."""

    def __init__(self, codec: str) -> None:
        self.codec = check_compression(codec)
        self.dtype, self.clip = CODECS[codec]
        self.anchor: list[Tensor] = []
        self.residual: list[Tensor] = []
        self.mean_residual: list[Tensor] = []

    def restart(self, tensors: Sequence[Tensor]) -> None:
        """Take ``tensors`` (in consensus: at the start, or after an exact round) as the anchor; nothing unsent."""
        self.anchor = [t.detach().clone() for t in tensors]
        self.residual = [torch.zeros_like(t) for t in tensors]
        self.mean_residual = []

    @torch.no_grad()
    def round(self, tensors: Sequence[Tensor], engine: PayloadExchange) -> None:
        """One compressed round over ``tensors``, in place, exchanging the payload through ``engine``."""
        payload = self.encode(tensors)
        self.exchange(payload, engine)
        torch._foreach_copy_(list(tensors), self.decode(payload))

    @torch.no_grad()
    def encode(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """This worker's payload for a round over ``tensors``: their change since the anchor plus the residual,
        in the low-precision dtype; the residual keeps what rounding (and clipping) left out."""
        if not self.anchor:
            raise RuntimeError("CompressedRounds.encode before restart()")
        delta = torch._foreach_sub(list(tensors), self.anchor)
        torch._foreach_add_(delta, self.residual)
        clipped = [d.clamp(-self.clip, self.clip) for d in delta] if self.clip is not None else delta
        payload = [d.to(self.dtype) for d in clipped]
        # what this round leaves out (rounding, and anything clipped) goes with the next
        for residual, d, p in zip(self.residual, delta, payload, strict=True):
            torch.sub(d, p, out=residual)
        return payload

    def exchange(self, payload: list[Tensor], engine: PayloadExchange) -> None:
        """Replace ``payload`` by the rounded mean of every worker's (through ``engine``), in place."""
        if not self.mean_residual:
            self.mean_residual = engine.mean_residual(payload)
        engine.average_payload(payload, self.mean_residual)

    @torch.no_grad()
    def decode(self, payload: list[Tensor]) -> list[Tensor]:
        """The new anchor, the same on every worker: the old one plus the exchanged (rounded mean) ``payload``."""
        torch._foreach_add_(self.anchor, [p.to(a.dtype) for p, a in zip(payload, self.anchor, strict=True)])
        return self.anchor

    def state_dict(self) -> dict[str, Any]:
        return {
            "codec": self.codec,
            "anchor": [a.clone() for a in self.anchor],
            "residual": [r.clone() for r in self.residual],
            "mean_residual": [r.clone() for r in self.mean_residual],
        }

    def load_state_dict(self, state: dict[str, Any], tensors: Sequence[Tensor]) -> None:
        if state.get("codec") != self.codec:
            raise CheckpointError(
                f"the state was saved with compression={state.get('codec')!r}; this run uses {self.codec!r}"
            )
        anchor, residual = state["anchor"], state["residual"]
        if len(anchor) != len(tensors) or any(a.shape != t.shape for a, t in zip(anchor, tensors, strict=True)):
            raise CheckpointError("the state's compression anchor does not match this model's tensors")
        self.anchor = [a.to(t.device, t.dtype).clone() for a, t in zip(anchor, tensors, strict=True)]
        self.residual = [r.to(t.device, t.dtype).clone() for r, t in zip(residual, tensors, strict=True)]
        self.mean_residual = [r.to(tensors[0].device).clone() for r in state.get("mean_residual", [])]
