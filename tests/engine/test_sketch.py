"""Sketched exact embeddings (:mod:`hf_accinf.engine.sketch`) against the forward form, projected afterwards."""

import pytest
import torch

from hf_accinf.engine import estimate_influence
from hf_accinf.errors import AccInfError
from hf_accinf.methods.projection import GradientProjection
from hf_accinf.methods.registry import build_method
from hf_accinf.engine.sketch import sketched_embeddings
from tests.engine.helpers import make_problem
from tests.methods.helpers import make_adam_problem


@pytest.mark.parametrize("which", ["adamw", "sgd"])
@pytest.mark.parametrize("dim", [0, 5])
def test_sketch_is_the_projection_of_the_forward_embeddings(which, dim):
    """R Delta^j_T from k adjoint vectors equals R applied to the forward form's Delta^j_T (exact removal,
    clipping, warm-up, a repeated row), unprojected (k = P: the embeddings themselves) and at k = 5."""
    problem = make_adam_problem("AdamW", num_samples=8) if which == "adamw" else \
        make_problem(num_samples=8, momentum=0.9, weight_decay=0.01, max_grad_norm=0.3)
    rule = build_method(problem, "adam-ie" if which == "adamw" else "sgd-ie")
    forward = estimate_influence(problem, rule, progress=False).embeddings
    projection = GradientProjection(rule.param_dim, dim, seed=2)
    expected = projection(forward)
    for chunk in (None, 2):
        result = sketched_embeddings(rule, problem, projection, chunk=chunk, progress=False)
        torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))


def test_sketch_refuses_accumulative_and_projected_rules():
    problem = make_adam_problem("AdamW", num_samples=4)
    for method in ("acc-adam-ie", "dvemb"):
        rule = build_method(problem, method)
        with pytest.raises(AccInfError, match="classical parameter-space"):
            sketched_embeddings(rule, problem, GradientProjection(problem.curvature.dim, 2))


def test_sketch_in_a_data_subspace_is_exact_for_objectives_in_it():
    """With ``Q`` orthonormal rows spanning the objective, ``(Q Delta^j) . (Q g) = Delta^j . g`` exactly."""
    from hf_accinf.methods.projection import BasisProjection

    problem = make_adam_problem("AdamW", num_samples=8)
    rule = build_method(problem, "adam-ie")
    forward = estimate_influence(problem, rule, progress=False).embeddings
    generator = torch.Generator().manual_seed(4)
    objective = torch.randn(rule.param_dim, dtype=torch.float64, generator=generator)
    spanning = torch.stack([objective, torch.randn(rule.param_dim, dtype=torch.float64, generator=generator)])
    basis = torch.linalg.qr(spanning.T).Q.T  # (2, P), orthonormal rows, the objective in their span
    projection = BasisProjection(basis)
    result = sketched_embeddings(rule, problem, projection, progress=False)
    torch.testing.assert_close(result, forward @ basis.T, rtol=1e-9, atol=1e-12 * float(forward.abs().max()))
    torch.testing.assert_close(result @ projection(objective), forward @ objective, rtol=1e-9, atol=1e-13)
