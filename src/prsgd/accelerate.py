"""``prsgd.accelerate``: the accelerate helper (:mod:`prsgd.integrations.accelerate`) at its public path."""

from prsgd.integrations.accelerate import AcceleratedLocalSGD, prepare

__all__ = ["AcceleratedLocalSGD", "prepare"]
