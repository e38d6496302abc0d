"""What the paper's corollaries prescribe: learning rate, communication period and rounds (Yu, Jin & Yang 2019).

With N workers and T iterations, Algorithm 1 (either momentum option) reaches O(1 / sqrt(N T)) with

    gamma = lr_scale * sqrt(N / T)                    (capped at the stability bound (1 - beta)^2 / (c L), if L given)
    I = period_scale * T^(1/2) / N^(3/2)              identical data across workers (zeta = 0)
    I = period_scale * T^(1/4) / N^(3/4)              non-identical data

so O(N^(3/2) T^(1/2)) rounds (identical) or O(N^(3/4) T^(3/4)) rounds (non-identical) instead of T. The corollaries
fix only orders of magnitude; the constants are arguments, 1 by default (the text we have lost the paper's
numbers). The period is rounded down and is at least 1.

The ``prsgd theory`` command prints them (:mod:`prsgd.experiments.theory_command`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prsgd.errors import InvalidArgument, check_number


@dataclass(frozen=True)
class Recommendation:
    workers: int
    steps: int
    identical: bool
    lr: float
    period: int
    rounds: int  # ceil(T / I)

    @property
    def rounds_saved(self) -> int:
        """Rounds saved against communicating every step (period 1)."""
        return self.steps - self.rounds


def recommended_period(workers: int, steps: int, identical: bool = True, period_scale: float = 1.0) -> int:
    """I = period_scale * T^(1/2) / N^(3/2) (identical) or T^(1/4) / N^(3/4) (non-identical), at least 1."""
    check_number("workers", workers, 1)
    check_number("steps", steps, 1)
    check_number("period_scale", period_scale, 0)
    exponent_t, exponent_n = (0.5, 1.5) if identical else (0.25, 0.75)
    return max(1, math.floor(period_scale * steps**exponent_t / workers**exponent_n))


def stability_cap(momentum: float = 0.0, smoothness: float | None = None, c: float = 1.0) -> float:
    """(1 - beta)^2 / (c L), the theorems' step-size condition; infinite without L."""
    if not 0 <= check_number("momentum", momentum, 0) < 1:
        raise InvalidArgument(f"momentum={momentum!r} is not allowed; it must be in [0, 1)")
    if smoothness is None:
        return math.inf
    check_number("smoothness", smoothness, 0)
    check_number("c", c, 0)
    return (1 - momentum) ** 2 / (c * smoothness) if smoothness > 0 else math.inf


def recommended_lr(
    workers: int,
    steps: int,
    lr_scale: float = 1.0,
    momentum: float = 0.0,
    smoothness: float | None = None,
    c: float = 1.0,
) -> float:
    """gamma = lr_scale * sqrt(N / T), capped at (1 - beta)^2 / (c L) when the smoothness L is given."""
    check_number("workers", workers, 1)
    check_number("steps", steps, 1)
    check_number("lr_scale", lr_scale, 0)
    return min(lr_scale * math.sqrt(workers / steps), stability_cap(momentum, smoothness, c))


def lr_is_capped(workers: int, steps: float, lr_scale: float, momentum: float, smoothness: float) -> bool:
    """Whether gamma = lr_scale sqrt(N / T) exceeds the step-size condition, i.e. (N, T) lies outside the
    corollary's regime."""
    return lr_scale * math.sqrt(workers / steps) > stability_cap(momentum, smoothness)


def recommend(
    workers: int,
    steps: int,
    identical: bool = True,
    *,
    lr_scale: float = 1.0,
    period_scale: float = 1.0,
    momentum: float = 0.0,
    smoothness: float | None = None,
    c: float = 1.0,
) -> Recommendation:
    period = recommended_period(workers, steps, identical, period_scale)
    lr = recommended_lr(workers, steps, lr_scale, momentum, smoothness, c)
    return Recommendation(workers, steps, identical, lr, period, math.ceil(steps / period))
