"""The trust check against the exact product of the transitions, built densely for tiny problems."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian

from hf_accinf.methods.registry import build_method
from hf_accinf.engine.trust import EXPANSIVE_GROWTH, trust_check
from hf_accinf.evaluation.retrain import train_sgd
from hf_accinf.problem import InfluenceProblem, make_curvature
from tests.engine.helpers import estimate, make_problem, shuffled_batches, tiny_mlp


def _trained(lr: float, epochs: int = 6, num_samples: int = 16, batch_size: int = 8):
    """A 4-3-2 tanh MLP trained whole by plain SGD (no momentum, decay or clipping) at a constant ``lr``."""
    model = tiny_mlp(4, 3, 2, seed=0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(num_samples, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 2, (num_samples,), generator=generator)
    names = [name for name, _ in model.named_parameters()]
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    batches = shuffled_batches(num_samples, batch_size, epochs, seed=0, repeat_row=False)
    trajectory, spec = train_sgd(model, x, y, batches, [lr] * len(batches))
    spec.group_of = {name: 0 for name in names}
    curvature = make_curvature(trajectory, model, names, 0.0, torch.float64, "cpu")
    problem = InfluenceProblem(trajectory, curvature, spec, num_samples)
    problem.model, problem.features, problem.labels, problem.initial = model, x, y, initial
    return problem


def _flat_loss(problem, params: dict):
    shapes = {name: value.shape for name, value in params.items()}
    sizes = [value.numel() for value in params.values()]

    def loss(flat, x, y):
        named = {n: part.view(shapes[n]) for n, part in zip(shapes, torch.split(flat, sizes))}
        return nn.functional.cross_entropy(functional_call(problem.model, named, (x,)), y)

    return loss, torch.cat([value.flatten() for value in params.values()])


def _dense_growth(rule, problem, steps: int | None = None) -> float:
    """``||P M_{steps-1} ... M_0 P^T||_2`` (parameter block) from every basis vector through every step."""
    block = torch.eye(rule.state_dim, dtype=torch.float64)
    for step in range(problem.trajectory.num_steps if steps is None else steps):
        block = rule.at_step(step).apply(block)
    return float(torch.linalg.matrix_norm(block[: rule.param_dim, : rule.param_dim], ord=2))


@pytest.mark.parametrize("lr,chaotic", [(0.1, False), (5.0, True)])
def test_trust_check_flags_a_chaotic_run_and_passes_a_stable_one(lr, chaotic):
    problem = _trained(lr)
    loss, theta0 = _flat_loss(problem, problem.initial)
    lambda_max = float(torch.linalg.eigvalsh(hessian(loss)(theta0, problem.features, problem.labels)).max())
    assert (lr * lambda_max > 2) == chaotic  # beyond the edge of stability of the initial loss Hessian
    rule = build_method(problem, "sgd-ie", removal="exact")
    exact = _dense_growth(rule, problem)
    report = trust_check(rule, problem, probes=4, iterations=2)
    assert report.growth <= exact * (1 + 1e-9)  # a Ritz value: never above the true norm
    assert report.growth >= (0.95 if chaotic else 0.5) * exact
    assert (exact > EXPANSIVE_GROWTH) == chaotic and report.expansive == chaotic
    assert report.to_dict()["expansive"] == chaotic and len(report.epoch_growth) == 6
    if chaotic:
        assert exact > 100 * EXPANSIVE_GROWTH


def test_probes_spanning_the_state_give_the_exact_norms():
    """With as many probes as parameters the subspace is everything: the run's growth and the growth up to
    each epoch's end equal the 2-norms of the dense products (momentum, clipping, decay, a repeated row)."""
    problem = make_problem(num_samples=10, batch_size=4, epochs=3)
    rule = build_method(problem, "sgd-ie", removal="exact")
    assert rule.state_dim == 2 * rule.param_dim
    report = trust_check(rule, problem, probes=rule.param_dim, iterations=0)
    assert math.isclose(report.growth, _dense_growth(rule, problem), rel_tol=1e-9)
    epochs = problem.trajectory.epoch.tolist()
    ends = [t + 1 for t in range(len(epochs)) if t + 1 == len(epochs) or epochs[t + 1] != epochs[t]]
    assert len(report.epoch_growth) == len(ends) > 1
    for growth, end in zip(report.epoch_growth, ends):
        assert math.isclose(growth, _dense_growth(rule, problem, end), rel_tol=1e-9)


def test_embedding_ratio_is_the_embedding_over_the_injected_norm():
    """One epoch of plain SGD without clipping: each row occurs once and injects ``(eta / b) g_j(theta_t)``;
    the gradient here comes from autograd on the model, not from the update rule."""
    problem = _trained(0.5, epochs=1, num_samples=12, batch_size=4)
    embeddings = estimate(problem, "sgd-ie", progress=False).embeddings
    rule = build_method(problem, "sgd-ie", removal="exact")
    report = trust_check(rule, problem, embeddings, probes=2, iterations=0)
    trajectory = problem.trajectory
    injected = torch.zeros(problem.num_samples, dtype=torch.float64)
    for step in range(trajectory.num_steps):
        loss, theta = _flat_loss(problem, {n: v[step] for n, v in trajectory.params.items()})
        for row in trajectory.batch(step).tolist():
            gradient = grad(loss)(theta, problem.features[row : row + 1], problem.labels[row : row + 1])
            injected[row] = float(trajectory.lr[step, 0]) / len(trajectory.batch(step)) * gradient.norm()
    ratios = embeddings.norm(dim=1) / injected
    assert math.isclose(report.embedding_ratio["max"], float(ratios.max()), rel_tol=1e-9)
    assert math.isclose(report.embedding_ratio["median"], float(ratios.median()), rel_tol=1e-9)
    assert math.isclose(float(ratios[report.embedding_ratio["argmax"]]), float(ratios.max()), rel_tol=1e-9)
    last = trajectory.batch(trajectory.num_steps - 1)  # the last step's rows: no transition after them
    torch.testing.assert_close(ratios[last], torch.ones(len(last), dtype=torch.float64), rtol=1e-12, atol=0)


def _explicit_probe_growth(rule, problem, probes: torch.Tensor, start: int = 0) -> float:
    """``||P M_start^T ... M_{T-1}^T probes||_2`` by plain ``apply_adjoint`` calls (no re-orthonormalization)."""
    block = torch.zeros(len(probes), rule.state_dim, dtype=torch.float64)
    block[:, : rule.param_dim] = probes
    for step in reversed(range(start, problem.trajectory.num_steps)):
        block = rule.at_step(step).apply_adjoint(block)
    return float(torch.linalg.matrix_norm(block[:, : rule.param_dim], ord=2))


@pytest.mark.parametrize("lr", [0.1, 5.0], ids=["stable", "chaotic"])
def test_adjoint_probes_are_the_same_probes_carried_backward_and_bound_the_norm_from_below(lr):
    """The default trust figure of the adjoint form: the probes ride on its backward pass (scores unchanged) and
    their figure is what explicit ``apply_adjoint`` of the same probes gives, at most the exact norm."""
    from hf_accinf.engine.adjoint import adjoint_scores
    from hf_accinf.engine.trust import _random_probes

    problem = _trained(lr)
    rule = build_method(problem, "sgd-ie", removal="exact")
    objective = torch.randn(rule.param_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    plain = adjoint_scores(rule, problem, objective, progress=False)
    assert plain.trust is None
    carried = adjoint_scores(rule, problem, objective, progress=False, probes=3, probe_seed=7)
    torch.testing.assert_close(carried.scores, plain.scores, rtol=1e-12, atol=1e-15)
    report = carried.trust
    assert report.kind == "adjoint-probes" and report.probes == 3 and report.to_dict()["kind"] == "adjoint-probes"
    probes = _random_probes(3, rule.param_dim, 7, torch.float64, "cpu")
    assert math.isclose(report.growth, _explicit_probe_growth(rule, problem, probes), rel_tol=1e-9)
    epochs = problem.trajectory.epoch.tolist()
    starts = [t for t in range(len(epochs)) if t == 0 or epochs[t - 1] != epochs[t]]
    assert len(report.epoch_growth) == len(starts) == 6
    for growth, start in zip(report.epoch_growth, starts):  # from each epoch's start to the end of the run
        assert math.isclose(growth, _explicit_probe_growth(rule, problem, probes, start), rel_tol=1e-9)
    exact = trust_check(rule, problem, probes=rule.param_dim, iterations=0).growth  # power iteration, full span: exact
    assert math.isclose(exact, _dense_growth(rule, problem), rel_tol=1e-9)
    assert report.growth <= exact * (1 + 1e-9)
    assert report.expansive == (lr > 1)
    u = rule.final_objective_state(objective)[None]
    for step in reversed(range(problem.trajectory.num_steps)):
        u = rule.at_step(step).apply_adjoint(u)
    assert math.isclose(report.objective_growth, float(u[0, : rule.param_dim].norm() / objective.norm()), rel_tol=1e-9)
