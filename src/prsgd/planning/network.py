"""The network a prediction assumes: each node's link (bandwidth and latency between nodes) and the links within a
node, read from the units people write (``100Mbit``, ``1Gbit``, ``12.5MB/s``; ``0.1ms``, ``50us``; ``6h``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from prsgd.errors import InvalidArgument

BANDWIDTH_UNITS = {
    "bit": 1.0,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "tbit": 1e12,
    "bps": 1.0,
    "kbps": 1e3,
    "mbps": 1e6,
    "gbps": 1e9,
    "tbps": 1e12,
    "b/s": 8.0,
    "kb/s": 8e3,
    "mb/s": 8e6,
    "gb/s": 8e9,
}
"""Bits per second per unit, lower-cased: ``Mbit`` and ``Mbps`` are bits, ``MB/s`` bytes (decimal prefixes)."""

DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

TCP_GOODPUT = 1448 / 1514
"""The payload share of a link's rate for bulk TCP over IPv4 on Ethernet with a 1500-byte MTU: 1448 bytes of data
(timestamps on) in each 1514-byte frame as a qdisc or switch counts it."""

_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-z/]*)\s*$", re.IGNORECASE)


def _split(flag: str, text: str, what: str, example: str, units: dict[str, float]) -> tuple[float, float]:
    match = _NUMBER.match(str(text))
    unit = match.group(2).lower() if match else ""
    if text.strip().startswith("-"):
        raise InvalidArgument(f"{flag} {text!r}: a {what} cannot be below zero (e.g. {example})")
    if match is None or unit not in units:
        given = f"unit {match.group(2)!r}" if match and match.group(2) else "no unit"
        raise InvalidArgument(
            f"{flag} {text!r}: a {what} needs a number and a unit ({given}); e.g. {example}; units: " + ", ".join(units)
        )
    value = float(match.group(1))
    if not math.isfinite(value):
        raise InvalidArgument(f"{flag} {text!r}: not a finite {what}")
    return value, units[unit]


def parse_bandwidth(flag: str, text: str) -> float:
    """Bits per second from ``"100Mbit"``, ``"1Gbps"``, ``"12.5MB/s"``; :class:`InvalidArgument` for a number
    without a unit, an unknown unit, or a bandwidth that is not above zero."""
    value, scale = _split(flag, text, "bandwidth", "100Mbit, 1Gbit, 400Gbps, 12.5MB/s", BANDWIDTH_UNITS)
    if value <= 0:
        raise InvalidArgument(f"{flag} {text!r}: a bandwidth must be above zero")
    return value * scale


def parse_duration(flag: str, text: str) -> float:
    """Seconds from ``"0.1ms"``, ``"50us"``, ``"120s"``, ``"6h"``, ``"2d"``; :class:`InvalidArgument` for a number
    without a unit, an unknown unit or a value below zero."""
    value, scale = _split(flag, text, "duration", "0.1ms, 50us, 2s, 6h", DURATION_UNITS)
    return value * scale


def format_bandwidth(bits_per_s: float) -> str:
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_s >= scale:
            return f"{bits_per_s / scale:g} {unit}"
    return f"{bits_per_s:g} bit/s"


@dataclass(frozen=True)
class Network:
    """Each node's link to the others (``bandwidth`` in bits/s each way, ``latency`` in s per message) and the links
    between the workers of one node (``intra_*``; by default as fast as the node's link). ``goodput``: the share of
    a link's rate that carries payload (:data:`TCP_GOODPUT`)."""

    bandwidth: float
    latency: float = 0.0
    intra_bandwidth: float | None = None
    intra_latency: float | None = None
    goodput: float = TCP_GOODPUT

    def bytes_per_s(self, within_node: bool) -> float:
        bits = self.intra_bandwidth if within_node and self.intra_bandwidth is not None else self.bandwidth
        return bits * self.goodput / 8

    def message_latency(self, within_node: bool) -> float:
        return self.intra_latency if within_node and self.intra_latency is not None else self.latency
