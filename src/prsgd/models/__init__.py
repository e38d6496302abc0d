"""Models written in plain torch, built by name."""

from prsgd.models.mlp import MLP, build_model

__all__ = ["MLP", "build_model"]
