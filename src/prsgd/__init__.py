"""prsgd: communication-efficient distributed momentum SGD.

Implements Yu, Jin & Yang, "On the Linear Speedup Analysis of Communication Efficient Momentum SGD for
Distributed Non-Convex Optimization" (ICML 2019): Algorithm 1 (PR-SGD-Momentum) and its baselines, on two
engines that share one definition of the algorithm (:mod:`prsgd.algorithm`), each round described by one
:class:`RoundSpec`:

- :class:`LocalSGD`, a ``torch.optim.Optimizer`` for real multi-process training under ``torch.distributed``;
- :class:`Simulator`, N workers vectorized over a leading tensor dimension on one device.
"""

from prsgd.algorithm import SYNC_RULES, CommStats, Hyperparameters, RoundSpec, SyncRule
from prsgd.engines.fault_tolerance import FaultTolerance
from prsgd.engines.local_sgd import LocalSGD
from prsgd.engines.simulator import Simulator
from prsgd.errors import CheckpointError, InvalidArgument, NonFiniteError, PrsgdError, WorkerFailure

__all__ = [
    "SYNC_RULES",
    "CheckpointError",
    "CommStats",
    "FaultTolerance",
    "Hyperparameters",
    "InvalidArgument",
    "LocalSGD",
    "NonFiniteError",
    "PrsgdError",
    "RoundSpec",
    "Simulator",
    "SyncRule",
    "WorkerFailure",
]
__version__ = "0.1.0"
