"""The propagation engine: sweep and propagator schedules, correction policies, sharding."""

from .estimator import InfluenceResult, estimate_influence, make_rule
from .policies import CorrectionPolicy
from .sharding import ShardContext

__all__ = ["CorrectionPolicy", "InfluenceResult", "ShardContext", "estimate_influence", "make_rule"]
