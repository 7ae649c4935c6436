"""The propagation engine: sweep and propagator schedules, the adjoint form, correction policies, sharding, trust."""

from .adjoint import adjoint_scores, choose_form
from .estimator import InfluenceResult, estimate_influence
from .policies import CorrectionPolicy, every_occurrence
from .sharding import ShardContext
from .trust import TrustReport, trust_check

__all__ = ["CorrectionPolicy", "InfluenceResult", "ShardContext", "TrustReport", "adjoint_scores", "choose_form",
           "estimate_influence", "every_occurrence", "trust_check"]
