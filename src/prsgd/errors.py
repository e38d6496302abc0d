"""prsgd's exceptions. Everything prsgd raises on purpose is a :class:`PrsgdError` with a message that names the
bad value (or the failed worker, step or file) and what is allowed, so that callers can catch one class."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable

import torch


class PrsgdError(Exception):
    """Base class of every error prsgd raises on purpose."""


class InvalidArgument(PrsgdError, ValueError):
    """A bad argument of a public function or constructor, rejected before any work is done."""


class CheckpointError(PrsgdError):
    """A checkpoint is missing, corrupt, or does not belong to this run."""


class WorkerFailure(PrsgdError, RuntimeError):
    """A distributed worker stopped responding (died, hung, or its connection broke)."""


class NonFiniteError(PrsgdError, FloatingPointError):
    """A NaN or infinity appeared in a worker's loss, gradients or parameters."""


def check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """``value`` if it is an integer (not a bool) in [low, high]; :class:`InvalidArgument` naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise InvalidArgument(f"{name}={value!r} is not allowed; it must be an integer{_range(low, high)}")
    if high is not None and value > high:
        raise InvalidArgument(f"{name}={value!r} is not allowed; it must be an integer{_range(low, high)}")
    return value


def check_number(name: str, value: object, low: float | None = None, *, positive: bool = False) -> float:
    """``value`` if it is a finite real number (not a bool), > 0 with ``positive``, >= ``low`` otherwise."""
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if ok and positive:
        ok = value > 0
    if ok and low is not None:
        ok = value >= low
    if not ok:
        bound = " > 0" if positive else (f" >= {low:g}" if low is not None else "")
        raise InvalidArgument(f"{name}={value!r} is not allowed; it must be a finite number{bound}")
    return float(value)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name}={value!r} is not allowed; it must be True or False")
    return value


def check_device(name: str, value: object, error: type[InvalidArgument] = InvalidArgument) -> torch.device:
    """``value`` as a ``torch.device`` this machine has, else ``error`` naming it (a CUDA device without a usable
    GPU, or with too high an index, would otherwise fail later with a bare assertion from torch)."""
    try:
        device = torch.device(value)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        raise error(f"{name}={value!r} is not a device; allowed: cpu, cuda, cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise error(
            f"{name}={value!r} but this machine has {torch.cuda.device_count()} usable CUDA GPU(s) "
            "(torch.cuda.is_available() is False or the index is too high); use device='cpu'"
        )
    return device


def check_choice(name: str, value: object, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise InvalidArgument(f"{name}={value!r} is not known; allowed: {', '.join(allowed)}")
    return value


def _range(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    return f" >= {low}" if low is not None else (f" <= {high}" if high is not None else "")


def user_error(error: BaseException) -> str | None:
    """The one-line message for a failure that is the user's input or machine, not a bug in prsgd; None for a bug
    (its traceback is shown). ``PRSGD_DEBUG=1`` shows the traceback of every failure."""
    if os.environ.get("PRSGD_DEBUG") == "1":
        return None
    if isinstance(error, PrsgdError | OSError):
        return str(error)
    if isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "allocate" in str(error)):
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else "MemoryError"
        return f"out of memory ({first}): fewer workers, a smaller model or batch, or another device"
    if isinstance(error, RecursionError):
        return "input nested too deeply (a config or data file?)"
    return None


def exit_on_user_error(prog: str, work: Callable[[], None]) -> None:
    """Run ``work``; a user's failure (:func:`user_error`) ends the process with one line ``PROG: error: ...`` and
    no traceback, any other failure propagates."""
    try:
        work()
    except Exception as error:
        message = user_error(error)
        if message is None:
            raise
        sys.exit(f"{prog}: error: {message}")
