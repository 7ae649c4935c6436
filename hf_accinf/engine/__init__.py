"""The propagation engine: sweep and propagator schedules, correction policies, sharding."""

from .estimator import METHODS, InfluenceResult, estimate_influence, make_rule
from .policies import CorrectionPolicy
from .sharding import ShardContext

__all__ = ["METHODS", "CorrectionPolicy", "InfluenceResult", "ShardContext", "estimate_influence", "make_rule"]
