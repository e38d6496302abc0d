"""prsgd's exceptions. Everything prsgd raises on purpose is a :class:`PrsgdError` with a message that names the
bad value (or the failed worker, step or file) and what is allowed, so that callers can catch one class."""

from __future__ import annotations


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
