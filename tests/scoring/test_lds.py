"""LDS by replay (``--verify_subsets``) and the blocked adjoint behind its per-query scores.

Oracles: the sequential replay (:meth:`~hf_accinf.trajectory.replay.Replay.train`, one run at a time) for the
subset retraining; a run whose counterfactual effect is linear in the row weights (scores built from the
truth itself) for the statistic; ``Q`` single adjoint passes for the blocked one.
"""

import pytest
import torch

from hf_accinf.engine import CorrectionPolicy
from hf_accinf.engine.adjoint import adjoint_scores
from hf_accinf.methods.registry import build_method
from tests.engine.helpers import make_problem


@pytest.mark.parametrize("removal,policy", [("exact", None), ("first-order", None),
                                            ("exact", CorrectionPolicy("stage", stages=[(1, 5)]))])
def test_the_blocked_adjoint_of_q_gradients_equals_q_single_adjoints(removal, policy):
    problem = make_problem(num_samples=12, batch_size=4)
    method = "acc-sgd-ie" if policy is not None else "sgd-ie"
    rule = build_method(problem, method, removal=removal)
    gradients = torch.randn(3, rule.param_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    blocked = adjoint_scores(rule, problem, gradients, progress=False, policy=policy, probes=2)
    assert blocked.scores.shape == (3, problem.num_samples) and blocked.trust is not None
    for query, gradient in enumerate(gradients):
        single = adjoint_scores(rule, problem, gradient, progress=False, policy=policy).scores
        assert single.shape == (problem.num_samples,)
        assert (blocked.scores[query] - single).abs().max() <= 1e-10 * single.abs().max()
