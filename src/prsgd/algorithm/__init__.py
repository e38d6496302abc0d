"""What a step and a round do, with no engine in sight.

- :mod:`~prsgd.algorithm.rules`: the sync rules (Algorithm 1, Algorithm 2, the paper's baselines);
- :mod:`~prsgd.algorithm.local`: the local rule (momentum SGD, eq. 4-5) and the optimizer state it keeps, by name;
  :mod:`~prsgd.algorithm.functional`: its stateless update;
- :mod:`~prsgd.algorithm.round`: :class:`RoundSpec`, one description of a round, with every option and exclusion;
- the round's stages: :mod:`~prsgd.algorithm.schedule`, :mod:`~prsgd.algorithm.exchange` (exact, mixing,
  :mod:`~prsgd.algorithm.compression`: 16-bit, int8, int4, top-k), :mod:`~prsgd.algorithm.overlap`,
  :mod:`~prsgd.algorithm.outer`, and :mod:`~prsgd.algorithm.fragments` (streaming: each stage per fragment);
- :mod:`~prsgd.algorithm.periodic`: :class:`PeriodicSync`, which composes them and counts steps;
  :mod:`~prsgd.algorithm.engine_view`: the engines' read-only view of it;
- :mod:`~prsgd.algorithm.contract`: what an engine must provide (:class:`Communicator`);
- :mod:`~prsgd.algorithm.topology` (mixing matrices) and :mod:`~prsgd.algorithm.theory` (the corollaries).
"""

from prsgd.algorithm.contract import CommStats, Communicator
from prsgd.algorithm.engine_view import FollowsAlgorithm
from prsgd.algorithm.local import Hyperparameters, UpdateGroup
from prsgd.algorithm.periodic import PeriodicSync, rescaled_steps
from prsgd.algorithm.round import EXCLUSIONS, ROUND_OPTIONS, RoundSpec
from prsgd.algorithm.rules import SYNC_RULES, Field, Scope, SyncRule, sync_rule

__all__ = [
    "EXCLUSIONS",
    "ROUND_OPTIONS",
    "SYNC_RULES",
    "CommStats",
    "Communicator",
    "Field",
    "FollowsAlgorithm",
    "Hyperparameters",
    "PeriodicSync",
    "RoundSpec",
    "Scope",
    "SyncRule",
    "UpdateGroup",
    "rescaled_steps",
    "sync_rule",
]
