"""``prsgd.lightning``: the Lightning strategy (:mod:`prsgd.integrations.lightning`) at its public path."""

from prsgd.integrations.lightning import WORKERS_KEY, LocalSGDMixedPrecision, LocalSGDStrategy

__all__ = ["WORKERS_KEY", "LocalSGDMixedPrecision", "LocalSGDStrategy"]
