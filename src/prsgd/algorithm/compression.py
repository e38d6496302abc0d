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
(parameters and momentum) sends the bytes of one fp32 gradient. ``"int8"`` sends each chunk of 256 values as
int8 with one fp32 scale (its largest magnitude / 127, rounded to nearest): 260 bytes per 256 values, about a
quarter of fp32, with a coarser rounding step (1/254 of the chunk's range) that the same two feedbacks carry.
``"int4"`` does the same with groups of 128 values, two to a byte, and a scale of largest magnitude / 7: 68 bytes
per 128 values, 0.133 of fp32.

``"topk:<fraction>"`` (SparseLoCo / DeMo-style sparsification) sends only the largest-magnitude fraction of each
chunk of the change, as (int16 index, fp32 value) pairs: 6 bytes per value sent, 1.5 x fraction of fp32. The rest
stays in the residual (error feedback): nothing is lost, only delayed. Sparse payloads cannot be summed shard by
shard, so the exchange is an all-gather: every worker receives every worker's pairs and sums them exactly in
worker order (the mean needs no second rounding, hence no mean residual). ``comm`` counts the bytes one worker
sends (its payload), as for every exchange; on the wire an all-gather delivers (N-1) payloads to each worker, so
what each receives grows linearly with N, while a ring all-reduce's stays at 2 (N-1)/N of the round: top-k at
fraction f moves less than an exact fp32 all-reduce only while N x 1.5 f < 2, e.g. up to N = 133 at f = 0.01.

A round works on every tensor of the round at once: each worker's values are laid out as one row (the tensors
flattened and concatenated in the round's order, which both engines share), so the int8 chunks are the same on
both engines and a rank's shard of the exchange is whole chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prsgd.errors import CheckpointError, InvalidArgument

if TYPE_CHECKING:
    from prsgd.algorithm.contract import Communicator
    from prsgd.algorithm.rules import Field


class FloatCodec:
    """A 16-bit float format: each value rounded to ``dtype`` (to nearest), clipped to +-``clip`` first."""

    unit = 1  # payload elements that travel together
    values_per_unit = 1
    gathers = False  # exchanged by a reduce-scatter of the payload (see :func:`rounded_mean`), not an all-gather

    def __init__(self, dtype: torch.dtype, clip: float | None = None) -> None:
        self.dtype, self.clip = dtype, clip

    def encode(self, values: Tensor) -> Tensor:
        """``values`` (rows, L) in fp32 -> the payload (rows, L) in ``dtype``."""
        return (values.clamp(-self.clip, self.clip) if self.clip is not None else values).to(self.dtype)

    def decode(self, payload: Tensor, numel: int | None = None) -> Tensor:
        return payload.float()

    def values_numel(self, payload_numel: int) -> int:
        """How many values a payload of ``payload_numel`` elements decodes to."""
        return payload_numel


class IntCodec:
    """Groups of ``group`` values as ``bits``-bit integers (8 or 4), each group with one fp32 scale (its largest
    magnitude / (2^(bits-1) - 1)), rounded to nearest, packed into one int8 payload: per group, the quantized values
    (two to a byte for 4 bits, each stored as q + 8) then the scale's 4 bytes. Nearest rounding, not stochastic:
    the rounding error is what error feedback carries, and both engines round the same row the same way."""

    gathers = False

    def __init__(self, bits: int, group: int) -> None:
        self.dtype, self.bits, self.values_per_unit = torch.int8, bits, group
        self.qmax = 2 ** (bits - 1) - 1
        self.value_bytes = group * bits // 8
        self.unit = self.value_bytes + 4

    def encode(self, values: Tensor) -> Tensor:
        """``values`` (rows, L) in fp32 -> (rows, groups x unit) int8, zero-padded to whole groups."""
        rows, group = values.shape[0], self.values_per_unit
        groups = -(-values.shape[1] // group)
        v = F.pad(values, (0, groups * group - values.shape[1])).view(rows, groups, group)
        scale = v.abs().amax(dim=-1, keepdim=True) / self.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(v / scale).clamp_(-self.qmax, self.qmax)
        packed = torch.empty(rows, groups, self.unit, dtype=torch.int8, device=values.device)
        if self.bits == 4:  # q + 8 in [1, 15]: the even-indexed value in the low nibble, the odd one in the high
            q = (q[..., 0::2] + 8) + (q[..., 1::2] + 8) * 16
            packed[..., : self.value_bytes] = q.to(torch.uint8).view(torch.int8)
        else:
            packed[..., : self.value_bytes] = q
        packed[..., self.value_bytes :] = scale.view(torch.int8)
        return packed.view(rows, -1)

    def decode(self, payload: Tensor, numel: int | None = None) -> Tensor:
        """The payload (rows, P) -> its values (rows, groups x group) in fp32."""
        rows = payload.shape[0]
        packed = payload.reshape(rows, -1, self.unit)
        scale = packed[..., self.value_bytes :].contiguous().view(torch.float32)
        q = packed[..., : self.value_bytes]
        if self.bits == 4:
            nibbles = q.contiguous().view(torch.uint8).int()
            q = torch.stack((nibbles % 16 - 8, nibbles // 16 - 8), dim=-1).flatten(-2)
        return (q.float() * scale).view(rows, -1)

    def values_numel(self, payload_numel: int) -> int:
        return payload_numel // self.unit * self.values_per_unit


class TopKCodec:
    """The largest-magnitude ``fraction`` of the values, sent as (index, value) pairs: the row is cut into the fewest
    chunks of at most 4096 values, of near-equal length (the last one zero-padded), and each chunk sends its
    k = ceil(fraction x chunk) largest, as k int16 indices within the chunk then the k fp32 values (as int16
    pairs): 6k bytes per chunk. Chunks keep the choice local (parameters and optimizer state, which differ in scale,
    lie in different chunks), and int16 indices halve what int32 ones would cost. What is not sent stays in the
    residual (error feedback). Workers exchange their payloads by an all-gather and each sums every worker's
    values exactly (``gathers``); see :meth:`mean`."""

    dtype = torch.int16
    gathers = True
    max_chunk = 4096

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def layout(self, numel: int) -> tuple[int, int, int]:
        """(chunks, chunk, k) for a row of ``numel`` values."""
        chunks = max(1, -(-numel // self.max_chunk))
        chunk = max(1, -(-numel // chunks))
        return chunks, chunk, math.ceil(self.fraction * chunk)

    def encode(self, values: Tensor) -> Tensor:
        """``values`` (rows, L) in fp32 -> (rows, chunks x 3k) int16: each chunk's k indices, then its k values."""
        rows, numel = values.shape
        chunks, chunk, k = self.layout(numel)
        v = F.pad(values, (0, chunks * chunk - numel)).view(rows, chunks, chunk)
        index = v.abs().topk(k, dim=-1, sorted=False).indices
        picked = v.gather(-1, index).contiguous().view(torch.int16)
        return torch.cat((index.to(torch.int16), picked), dim=-1).view(rows, -1)

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        """The payload (rows, P) of a row of ``numel`` values -> what it sends, dense: (rows, chunks x chunk)."""
        rows = payload.shape[0]
        chunks, chunk, k = self.layout(numel)
        packed = payload.reshape(rows, chunks, 3 * k)
        index = packed[..., :k].long()
        picked = packed[..., k:].reshape(-1).clone().view(torch.float32).view(rows, chunks, k)  # aligned for fp32
        dense = torch.zeros(rows, chunks, chunk, device=payload.device)
        return dense.scatter_(-1, index, picked).view(rows, -1)

    def mean(self, gathered: Tensor, numel: int) -> Tensor:
        """Every worker's payload (N, P), in worker order -> the mean of what they sent, (1, chunks x chunk): decoded
        and summed exactly in fp32 in worker order, so every worker (and both engines) holds the same mean."""
        return (sum_in_worker_order(self.decode(gathered, numel)) / gathered.shape[0]).unsqueeze(0)


Codec = FloatCodec | IntCodec | TopKCodec

CODECS: dict[str, FloatCodec | IntCodec] = {
    "bf16": FloatCodec(torch.bfloat16),
    "fp16": FloatCodec(torch.float16, 65504.0),
    "int8": IntCodec(8, 256),
    "int4": IntCodec(4, 128),
}
"""The codecs with a fixed name; ``"topk:<fraction>"`` names a :class:`TopKCodec`."""

COMPRESSION_FORMS = (*CODECS, "topk:<fraction>")


def codec_for(compression: str) -> Codec:
    """The codec ``compression`` names (checked by :func:`check_compression`)."""
    if compression in CODECS:
        return CODECS[compression]
    return TopKCodec(float(compression.split(":", 1)[1]))


def check_compression(compression: str | None, off: str = "None") -> str | None:
    """``compression`` if it is None, a known codec or ``"topk:<fraction>"`` with a fraction in (0, 1], else
    :class:`InvalidArgument` naming the allowed forms (``off``: how exact rounds are asked for, for the message)."""
    if compression is None or compression in CODECS:
        return compression
    allowed = ", ".join([off, *COMPRESSION_FORMS])
    if not isinstance(compression, str) or not compression.startswith("topk:"):
        raise InvalidArgument(f"compression={compression!r} is not known; allowed: {allowed}")
    try:
        fraction = float(compression.split(":", 1)[1])
    except ValueError:
        fraction = math.nan
    if not 0 < fraction <= 1:
        raise InvalidArgument(
            f"compression={compression!r} is not allowed; topk takes the fraction of values each worker sends, in "
            "(0, 1], e.g. 'topk:0.01'"
        )
    return compression


def sum_in_worker_order(values: Tensor) -> Tensor:
    """The sum over the rows of ``values`` (N, L), in fp32, added one worker after another: the same order, hence
    the same bits, on both engines whatever N."""
    total = values[0].clone()
    for i in range(1, values.shape[0]):
        total += values[i]
    return total


def rounded_mean(payloads: Tensor, residual: Tensor, codec: Codec) -> Tensor:
    """The mean of every worker's payload (``payloads``: shape (N, P), in worker order), decoded and summed exactly
    in fp32 in that order, plus ``residual`` (one per value), encoded again; ``residual`` keeps what that encoding
    left out. Both engines call this, so their arithmetic is the same."""
    mean = (sum_in_worker_order(codec.decode(payloads)) / payloads.shape[0] + residual).unsqueeze(0)
    low = codec.encode(mean)
    residual.copy_(mean[0] - codec.decode(low)[0, : mean.shape[1]])
    return low[0]


class CompressedRounds:
    """The state and the rule of compressed rounds over some tensors (one worker's, or stacked ``(N, ...)``; the
    leading dimension is the workers, 1 for one worker): ``anchor`` (the values after the last round),
    ``residual`` (what rounding left out, per worker) and ``mean_residual`` (what rounding the mean left out, the
    same for every worker). The exchange stage of a compressed run (see :mod:`prsgd.algorithm.exchange`); its state
    is saved under ``"compression"``."""

    key = "compression"
    anchored = True

    @property
    def needs_start(self) -> bool:
        """Whether the anchor is still to be taken (at x^0, where every worker holds the same values: see
        :meth:`prsgd.algorithm.periodic.PeriodicSync.attach`)."""
        return not self.anchor

    def __init__(self, codec: str) -> None:
        self.codec_name = check_compression(codec)
        self.codec: Codec = codec_for(codec)
        self.anchor: list[Tensor] = []
        self.residual: list[Tensor] = []
        self.mean_residual: Tensor | None = None

    def restart(self, tensors: Sequence[Tensor]) -> None:
        """Take ``tensors`` (in consensus: at the start, or after an exact round) as the anchor; nothing unsent."""
        self.anchor = [t.detach().clone() for t in tensors]
        self.residual = [torch.zeros_like(t) for t in tensors]
        self.mean_residual = None

    def forget(self) -> None:
        """Start again: the next :meth:`restart` takes the anchor (:attr:`needs_start` until then)."""
        self.anchor, self.residual, self.mean_residual = [], [], None

    def rebase(self, tensors: Sequence[Tensor]) -> None:
        """Take ``tensors`` (in consensus: after a round that an outer step changed) as the anchor; what is unsent
        stays unsent."""
        self.anchor = [t.detach().clone() for t in tensors]

    def exchange_round(self, engine: Communicator, fields: Sequence[Field], step: int) -> None:
        self.round(engine.elementwise(fields), engine)

    def round_of(self, tensors: Sequence[Tensor], engine: Communicator, step: int) -> None:
        self.round(tensors, engine)

    def snapshot_payload(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        return [self.encode(tensors)]

    def exchange_payload(self, payload: list[Tensor], engine: Communicator) -> None:
        payload[0] = self.exchange(payload[0], engine)

    def averaged(self, payload: list[Tensor]) -> list[Tensor]:
        return self.decode(payload[0])

    @torch.no_grad()
    def round(self, tensors: Sequence[Tensor], engine: Communicator) -> None:
        """One compressed round over ``tensors``, in place, exchanging the payload through ``engine``."""
        torch._foreach_copy_(list(tensors), self.decode(self.exchange(self.encode(tensors), engine)))

    @property
    def numel(self) -> int:
        """Values in one worker's row."""
        return sum(a[0].numel() for a in self.anchor)

    @torch.no_grad()
    def encode(self, tensors: Sequence[Tensor]) -> Tensor:
        """This worker's payload (rows, P) for a round over ``tensors``: their change since the anchor plus the
        residual, as one row per worker, encoded; the residual keeps what encoding left out."""
        if not self.anchor:
            raise RuntimeError("CompressedRounds.encode before restart()")
        delta = torch._foreach_sub(list(tensors), self.anchor)
        torch._foreach_add_(delta, self.residual)
        rows = _rows(delta)
        payload = self.codec.encode(rows)
        # what this round leaves out (rounding, anything clipped or not chosen) goes with the next: views of `rows`
        self.residual = _split(rows.sub_(self.codec.decode(payload, rows.shape[1])[:, : rows.shape[1]]), self.residual)
        return payload

    def exchange(self, payload: Tensor, engine: Communicator) -> Tensor:
        """Every worker's ``payload`` exchanged through ``engine``: for a codec that ``gathers``, every worker's
        payload (N, P), gathered; otherwise ``payload`` itself, replaced in place by the rounded mean of every
        worker's: the engine hands each shard's rows to :func:`rounded_mean`, whose residual (one per value of the
        shard) lives here."""
        if self.codec.gathers:
            return engine.gather_rows(payload)

        def reduce(rows: Tensor) -> Tensor:
            if self.mean_residual is None:
                self.mean_residual = torch.zeros(self.codec.values_numel(rows.shape[1]), device=rows.device)
            return rounded_mean(rows, self.mean_residual, self.codec)

        engine.reduce_rows(payload, reduce, self.codec.unit)
        return payload

    @torch.no_grad()
    def decode(self, exchanged: Tensor) -> list[Tensor]:
        """The new anchor, the same on every worker: the old one plus the mean that ``exchanged`` (what
        :meth:`exchange` returned) carries."""
        numel = self.numel
        if self.codec.gathers:
            mean = self.codec.mean(exchanged, numel)[:, :numel].expand(self.anchor[0].shape[0], -1)
        else:
            mean = self.codec.decode(exchanged)[:, :numel]
        torch._foreach_add_(self.anchor, _split(mean, self.anchor))
        return self.anchor

    def state_dict(self) -> dict[str, Any]:
        return {
            "codec": self.codec_name,
            "anchor": [a.clone() for a in self.anchor],
            "residual": [r.clone() for r in self.residual],
            "mean_residual": [] if self.mean_residual is None else [self.mean_residual.clone()],
        }

    def load_state_dict(self, state: dict[str, Any], tensors: Sequence[Tensor]) -> None:
        if state.get("codec") != self.codec_name:
            raise CheckpointError(
                f"the state was saved with compression={state.get('codec')!r}; this run uses {self.codec_name!r}"
            )
        anchor, residual = state["anchor"], state["residual"]
        if len(anchor) != len(tensors) or any(a.numel() != t.numel() for a, t in zip(anchor, tensors, strict=True)):
            raise CheckpointError("the state's compression anchor does not match this model's tensors")
        # (the shapes may differ by a leading 1: states saved before rounds were laid out as rows)
        self.anchor = [a.to(t.device, t.dtype).reshape(t.shape).clone() for a, t in zip(anchor, tensors, strict=True)]
        self.residual = [
            r.to(t.device, t.dtype).reshape(t.shape).clone() for r, t in zip(residual, tensors, strict=True)
        ]
        mean_residual = state.get("mean_residual", [])  # (states of the simulator saved before: one per tensor)
        self.mean_residual = (
            torch.cat([r.reshape(-1) for r in mean_residual]).to(tensors[0].device) if mean_residual else None
        )


def _rows(tensors: list[Tensor]) -> Tensor:
    """Each worker's values of ``tensors`` (leading dimension: the workers) as one row: (rows, total)."""
    rows = tensors[0].shape[0]
    if len(tensors) == 1:  # one flat span (LocalSGD): a view, no copy
        return tensors[0].reshape(rows, -1)
    return torch.cat([t.reshape(rows, -1) for t in tensors], dim=1)


def _split(rows: Tensor, like: list[Tensor]) -> list[Tensor]:
    """``rows`` (rows, total) cut back into tensors shaped as ``like``."""
    pieces = torch.split(rows, [t[0].numel() for t in like], dim=1)
    return [p.reshape(t.shape) for p, t in zip(pieces, like, strict=True)]
