"""Sketched exact embeddings (:mod:`hf_accinf.engine.sketch`) against the forward form, projected afterwards."""

import pytest
import torch

from hf_accinf.engine import estimate_influence
from hf_accinf.errors import AccInfError
from hf_accinf.methods.projection import BasisProjection, GradientProjection
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


# The methods adam-ie-sketch / sgd-ie-sketch (engine.sketch.SketchRule) run by the engine's forward form.

def _problem(which):
    return make_adam_problem("AdamW", num_samples=8) if which == "adamw" else \
        make_problem(num_samples=8, momentum=0.9, weight_decay=0.01, max_grad_norm=0.3)


@pytest.mark.parametrize("which", ["adamw", "sgd"])
@pytest.mark.parametrize("schedule", ["sweep", "propagator"])
def test_the_sketch_method_at_k_equal_p_is_the_exact_forward_form(which, schedule):
    """Unprojected (k = 0, the identity) and at k = P (no random map keeps more than P dimensions), the sketch
    method's k-dimensional forward form gives the exact method's forward-form embeddings (float64, 1e-10)."""
    problem = _problem(which)
    exact = "adam-ie" if which == "adamw" else "sgd-ie"
    expected = estimate_influence(problem, build_method(problem, exact), schedule=schedule, progress=False).embeddings
    for dim in (0, problem.curvature.dim):
        rule = build_method(problem, f"{exact}-sketch", projection_dim=dim, sketch_basis="random")
        assert rule.state_dim == problem.curvature.dim and rule.projection.identity
        result = estimate_influence(problem, rule, schedule=schedule, progress=False).embeddings
        torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))


@pytest.mark.parametrize("which", ["adamw", "sgd"])
def test_the_sketch_method_below_p_is_the_projected_exact_embeddings_in_chunks(which):
    """At k = 5 < P the sketch's states end at R Delta^j_T, also when the memory budget carries the k x S adjoint
    block two vectors at a time, and the adjoint form of the sketch gives the same scores."""
    problem = _problem(which)
    exact = build_method(problem, "adam-ie" if which == "adamw" else "sgd-ie")
    forward = estimate_influence(problem, exact, progress=False).embeddings
    whole = build_method(problem, f"{exact.spec.name}-sketch", projection_dim=5, projection_seed=3,
                         sketch_basis="random")
    budget = 4 * 2 * exact.state_dim * 8 / 2**30  # a quarter of it holds two adjoint vectors
    chunked = build_method(problem, f"{exact.spec.name}-sketch", projection_dim=5, projection_seed=3, sketch_basis="random",
                           memory_budget_gb=budget)
    assert chunked.chunk == 2
    expected = whole.projection(forward)
    for rule in (whole, chunked):
        result = estimate_influence(problem, rule, progress=False).embeddings
        torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    from hf_accinf.engine.adjoint import adjoint_scores

    objective = torch.randn(exact.param_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scores = adjoint_scores(whole, problem, whole.embed_gradient(objective), progress=False).scores
    torch.testing.assert_close(scores, expected @ whole.embed_gradient(objective), rtol=1e-9, atol=1e-14)


def test_the_sketch_refuses_a_cache_beyond_the_memory_budget():
    problem = _problem("adamw")
    with pytest.raises(AccInfError, match="lower --projection_dim"):
        build_method(problem, "adam-ie-sketch", projection_dim=5, memory_budget_gb=1e-9)
    with pytest.raises(AccInfError, match="models runs trained with SGD"):
        build_method(problem, "sgd-ie-sketch")


def test_sketched_scores_are_unbiased_with_the_gaussian_variance():
    """Over sketch seeds, ``(R Delta^j) . (R g)`` (the seeds' R stacked into one adjoint pass) averages to the exact
    ``Delta^j . g``, and its variance is the Gaussian sketch's ``(|Delta^j|^2 |g|^2 + (Delta^j . g)^2) / k`` (entries
    of R iid N(0, 1/k)): the error of one sketch shrinks as 1/sqrt(k), that of the mean over n seeds as
    1/sqrt(n k)."""
    problem = _problem("adamw")
    forward = estimate_influence(problem, build_method(problem, "adam-ie"), progress=False).embeddings
    objective = torch.randn(forward.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    exact = forward @ objective
    theory = forward.norm(dim=1) ** 2 * objective.norm() ** 2 + exact**2  # k times the variance of one sketch
    seeds, dims = 200, (4, 16)
    rule = build_method(problem, "adam-ie")
    sketches = {dim: [GradientProjection(rule.param_dim, dim, seed) for seed in range(seeds)] for dim in dims}
    stacked = BasisProjection(torch.cat([p.matrix() for dim in dims for p in sketches[dim]]))  # one pass, every R
    embeddings = sketched_embeddings(rule, problem, stacked, progress=False).split([dim for dim in dims
                                                                                      for _ in range(seeds)], 1)
    for dim in dims:
        own, embeddings = embeddings[:seeds], embeddings[seeds:]
        samples = torch.stack([part @ sketch(objective) for part, sketch in zip(own, sketches[dim])])  # (seeds, N)
        variance = theory / dim
        assert bool(((samples.mean(0) - exact).abs() <= 4 * (variance / seeds).sqrt()).all())
        ratio = samples.var(0) / variance
        assert bool(((ratio > 0.6) & (ratio < 1.6)).all()), ratio


def test_the_sketch_method_takes_a_given_basis():
    """With a basis ``Q`` (orthonormal rows), the method's states end at ``Q Delta^j_T``."""
    from hf_accinf.engine.sketch import SketchRule

    problem = _problem("adamw")
    exact = build_method(problem, "adam-ie")
    forward = estimate_influence(problem, exact, progress=False).embeddings
    basis = torch.linalg.qr(torch.randn(exact.param_dim, 3, dtype=torch.float64,
                                        generator=torch.Generator().manual_seed(5))).Q.T
    rule = SketchRule(exact, problem, projection=BasisProjection(basis))
    result = estimate_influence(problem, rule, progress=False).embeddings
    torch.testing.assert_close(result, forward @ basis.T, rtol=1e-9, atol=1e-12 * float(forward.abs().max()))


def test_the_gradient_subspace_is_exact_for_objectives_in_the_span_of_the_last_epoch_gradients():
    """sketch_basis gradients: Q has orthonormal rows inside the span of the last epoch's row gradients; with k at
    least that span's rank (11 rows < P = 23 here) an objective made of those gradients is scored exactly, and an
    objective orthogonal to them scores 0."""
    from hf_accinf.engine.sketch import GradientSubspace

    problem = _problem("adamw")
    exact = build_method(problem, "adam-ie")
    forward = estimate_influence(problem, exact, progress=False).embeddings
    subspace = GradientSubspace(problem, 16)
    gradients = torch.cat(list(subspace._gradients()))
    assert subspace.dim == min(16, len(gradients)) < exact.param_dim
    basis = subspace.matrix()
    torch.testing.assert_close(basis @ basis.T, torch.eye(subspace.dim, dtype=torch.float64), atol=1e-10, rtol=0)
    span = torch.linalg.svd(gradients, full_matrices=False)
    rank = int((span.S > 1e-10 * span.S[0]).sum())
    inside = span.Vh[:rank]
    torch.testing.assert_close(basis - (basis @ inside.T) @ inside, torch.zeros_like(basis), atol=1e-10, rtol=0)
    rule = build_method(problem, "adam-ie-sketch", projection_dim=16, sketch_basis="gradients")
    embeddings = estimate_influence(problem, rule, progress=False).embeddings
    objective = gradients[:3].sum(0) - 2 * gradients[-1]
    scale = float((forward @ objective).abs().max())
    torch.testing.assert_close(embeddings @ rule.embed_gradient(objective), forward @ objective, rtol=1e-8,
                               atol=1e-10 * scale)
    outside = torch.randn(exact.param_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    outside = outside - (outside @ inside.T) @ inside
    assert float((embeddings @ rule.embed_gradient(outside)).abs().max()) <= 1e-10 * float(forward.abs().max())
