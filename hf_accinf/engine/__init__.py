"""The propagation engine: sweep and propagator schedules, the adjoint form, correction policies, sharding, trust."""

from .adjoint import adjoint_scores, choose_form
from .estimator import InfluenceResult, estimate_influence, make_rule
from .policies import CorrectionPolicy
from .sharding import ShardContext
from .trust import TrustReport, trust_check

__all__ = ["CorrectionPolicy", "InfluenceResult", "ShardContext", "TrustReport", "adjoint_scores", "choose_form",
           "estimate_influence", "make_rule", "trust_check"]
