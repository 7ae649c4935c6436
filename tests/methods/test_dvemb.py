"""DVEmb / ACC-DVEmb (DESIGN.md section 5) against a naive transcription, one sample and one step at a time.

The oracle recomputes everything itself in float64: per-row gradients by autograd at the recorded
parameters, the clip coefficient from the recorded norm, Adam's preconditioner from the recorded second
moment, the momentum weight by summing the bias-corrected recursion, and the recursion of the module
docstring of :mod:`hf_accinf.methods.dvemb` sample by sample, without or with the projection.
"""

import pytest
import torch
from torch.func import functional_call, grad

from hf_accinf.engine import CorrectionPolicy, estimate_influence, every_occurrence
from hf_accinf.engine.plan import build_plan
from hf_accinf.engine.sweep import per_sample_adjoint_scores
from hf_accinf.errors import AccInfError
from hf_accinf.scoring.objective import scores_from_embeddings
from hf_accinf.losses import clip_coefficient
from hf_accinf.methods.base import StepOps
from hf_accinf.methods.dvemb import effective_rates
from hf_accinf.methods.projection import GradientProjection
from hf_accinf.methods.registry import build_method
from tests.engine.helpers import make_problem
from tests.methods.helpers import make_adam_problem


def simulated_rate(lr: list[float], mu: float, t: int) -> float:
    """A unit gradient at step ``t`` only, through SGD momentum: the displacement ``sum_s eta_s buf_s``."""
    buffer, total = 0.0, 0.0
    for s in range(t, len(lr)):
        buffer = mu * buffer + (1.0 if s == t else 0.0)
        total += lr[s] * buffer
    return total


def simulated_adam_displacement(problem, gradients: list[torch.Tensor], t: int) -> torch.Tensor:
    """``-d theta_T / d g_t`` per coordinate: a unit tangent on every coordinate of step t's clipped gradient,
    carried by ``torch.func.jvp`` through the functional Adam steps t..T-1 (evaluation/optim.py, no clipping,
    no decay: DVEmb carries decay separately), later gradients fixed at their recorded values."""
    import copy

    from torch.func import jvp

    from hf_accinf.evaluation.optim import optimizer_step

    trajectory, chosen = problem.trajectory, list(problem.optimizer.group_of)
    spec = copy.deepcopy(problem.optimizer)
    spec.max_grad_norm = 0.0
    for group in spec.groups:
        group.weight_decay = 0.0
    sizes = [trajectory.params[n][0].numel() for n in chosen]
    shapes = [trajectory.params[n][0].shape for n in chosen]

    def named(flat):
        return {n: part.view(shape) for n, part, shape in zip(chosen, torch.split(flat, sizes), shapes)}

    def run(perturbation):
        theta = {n: trajectory.params[n][t] for n in chosen}
        state = {f"{n}.{key}": trajectory.states[f"{n}.{key}"][t] for n in chosen for key in ("exp_avg", "exp_avg_sq")}
        for s in range(t, trajectory.num_steps):
            gradient = gradients[s] + perturbation if s == t else gradients[s]
            lrs = {n: float(trajectory.lr[s, spec.group_of[n]]) for n in chosen}
            theta, state = optimizer_step(spec, theta, state, named(gradient), lrs, int(trajectory.optimizer_step_count[s]))
        return torch.cat([theta[n].flatten() for n in chosen])

    zero = torch.zeros(sum(sizes), dtype=torch.float64)
    return -jvp(run, (zero,), (torch.ones_like(zero),))[1]


def oracle_embeddings(problem, coefficient, matrix=None) -> torch.Tensor:
    """Per sample j, per step t: x' = (1 - d) x - sum_r w_r u~_r (g~_r . x) + [j in B_t] sum_{r of j} w_r u~_r (1 + c g~_r . x)."""
    trajectory, spec = problem.trajectory, problem.optimizer
    model, chosen = problem.model, list(spec.group_of)
    adam = spec.name in ("Adam", "AdamW")

    def flatten(named):
        return torch.cat([named[n].flatten() for n in chosen])

    steps, clipped = [], []
    for t in range(trajectory.num_steps):
        rows = trajectory.rows_of(t)
        x, y, w = trajectory.head_input[rows], trajectory.labels[rows], trajectory.row_weight[rows]
        params = {n: v[t] for n, v in trajectory.params.items()}

        def row_loss(theta, xi, yi):
            logits = functional_call(model, {**params, **theta}, (xi[None],))
            return torch.nn.functional.cross_entropy(logits, yi[None])

        theta = {n: params[n] for n in chosen}
        g = torch.stack([flatten(grad(row_loss)(theta, x[i], y[i])) for i in range(len(w))])
        norm = float(trajectory.grad_norm[t])
        clip = clip_coefficient(norm, spec.max_grad_norm)
        batch_grad = (w[:, None] * g).sum(0)
        clipped.append(clip * batch_grad)
        if clip < 1:  # the clip map's Jacobian on each row (the rest of the recorded norm held fixed)
            g_clipped = torch.stack([clip * (row - batch_grad * (batch_grad @ row) / (norm * (norm + 1e-6))) for row in g])
        else:
            g_clipped = g
        steps.append((trajectory.batch(t), w, g, g_clipped, t))

    def decay_of(t):
        return flatten({n: torch.full_like(trajectory.params[n][t], spec.groups[spec.group_of[n]].weight_decay)
                        for n in chosen})

    for index, (ids, w, g, g_clipped, t) in enumerate(steps):
        lr = flatten({n: torch.full_like(trajectory.params[n][t], float(trajectory.lr[t, spec.group_of[n]])) for n in chosen})
        if adam:  # AdamW in these tests: decoupled decay eta lam
            direction, d = simulated_adam_displacement(problem, clipped, t), (lr * decay_of(t)).mean()
        else:
            mu = spec.groups[0].momentum or 0.0
            direction = flatten({n: torch.full_like(trajectory.params[n][t], simulated_rate(
                trajectory.lr[:, spec.group_of[n]].tolist(), mu, t)) for n in chosen})
            d = (direction * decay_of(t)).mean()
        u = direction * g_clipped
        if matrix is not None:
            g, u = g @ matrix, u @ matrix
        steps[index] = (ids, w, g, u, d)

    results = []
    for j in range(problem.num_samples):
        state = torch.zeros(steps[0][2].shape[1], dtype=torch.float64)
        for t, (ids, w, g, u, d) in enumerate(steps):
            moved = (1 - d) * state - sum(w[r] * u[r] * (g[r] @ state) for r in range(len(ids)))
            for r in range(len(ids)):
                if int(ids[r]) == j:
                    moved = moved + w[r] * u[r] * (1 + coefficient(j, t) * (g[r] @ state))
            state = moved
        results.append(state)
    return torch.stack(results)


@pytest.fixture(scope="module")
def adamw():
    return make_adam_problem("AdamW", num_samples=8)


@pytest.fixture(scope="module")
def sgd():
    return make_problem(num_samples=8, momentum=0.9, weight_decay=0.01, max_grad_norm=0.3)


def test_effective_rates_are_the_displacement_through_momentum():
    """Against the simulated momentum recursion; without momentum the rate is the step's own; a gradient
    long before the end under a constant rate moves the parameters by eta / (1 - mu)."""
    lr = [0.1 * (t + 1) / 5 if t < 5 else 0.1 * (60 - t) / 55 for t in range(60)]
    rates = effective_rates(torch.tensor(lr, dtype=torch.float64)[:, None], [0.9])[:, 0]
    for t in range(60):
        assert float(rates[t]) == pytest.approx(simulated_rate(lr, 0.9, t), rel=1e-12)
    flat = effective_rates(torch.full((400, 1), 0.1, dtype=torch.float64), [0.0])[:, 0]
    torch.testing.assert_close(flat, torch.full((400,), 0.1, dtype=torch.float64))
    constant = effective_rates(torch.full((400, 1), 0.1, dtype=torch.float64), [0.9])[:, 0]
    assert float(constant[200]) == pytest.approx(1.0, rel=1e-9)


POLICIES = {"dvemb": lambda: CorrectionPolicy("none"), "acc-dvemb": lambda: CorrectionPolicy("all")}


@pytest.mark.parametrize("which", ["adamw", "sgd"])
@pytest.mark.parametrize("method", ["dvemb", "acc-dvemb"])
def test_identity_projection_equals_the_unprojected_computation(which, method, request):
    """``projection_dim=0``: the recursion in parameter space itself (clipping, warm-up, decay on weights
    only, a repeated row), both schedules, to 1e-8."""
    problem = request.getfixturevalue(which)
    assert (problem.trajectory.clip_coef < 1).any()
    accumulative = method == "acc-dvemb"
    expected = oracle_embeddings(problem, lambda j, t: float(accumulative))
    rule = build_method(problem, method, projection_dim=0)
    assert rule.state_dim == problem.curvature.dim
    for schedule in ("sweep", "propagator"):
        result = estimate_influence(problem, rule, policy=POLICIES[method](), schedule=schedule, progress=False)
        torch.testing.assert_close(result.embeddings, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("method", ["dvemb", "acc-dvemb"])
def test_projected_recursion_matches_the_oracle(adamw, method):
    rule = build_method(adamw, method, projection_dim=5, projection_seed=7)
    matrix = rule.projection(torch.eye(adamw.curvature.dim, dtype=torch.float64))  # R^T, (P, k)
    expected = oracle_embeddings(adamw, lambda j, t: float(method == "acc-dvemb"), matrix)
    for schedule in ("sweep", "propagator"):
        result = estimate_influence(adamw, rule, policy=POLICIES[method](), schedule=schedule, progress=False)
        torch.testing.assert_close(result.embeddings, expected, rtol=1e-8, atol=1e-12)
    assert result.embeddings.shape == (adamw.num_samples, 5)


def test_random_acc_draws_the_shared_coins(adamw):
    policy = CorrectionPolicy("random", p=0.5, seed=3)
    coin = lambda j, t: float(policy.coefficients(torch.tensor([j]), t, 0)[0])  # noqa: E731
    expected = oracle_embeddings(adamw, coin)
    rule = build_method(adamw, "acc-dvemb", projection_dim=0)
    for schedule in ("sweep", "propagator"):
        result = estimate_influence(adamw, rule, policy=CorrectionPolicy("random", p=0.5, seed=3), schedule=schedule,
                                    progress=False)
        torch.testing.assert_close(result.embeddings, expected, rtol=1e-8, atol=1e-12)


def test_adjoint_is_the_vjp_and_forms_agree(adamw):
    rule = build_method(adamw, "dvemb", projection_dim=6)
    vectors = torch.randn(4, rule.state_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for step in range(adamw.trajectory.num_steps):
        ops = rule.at_step(step)
        torch.testing.assert_close(ops.apply_adjoint(vectors), StepOps.apply_adjoint(ops, vectors), rtol=1e-12, atol=1e-14)
    objective = rule.embed_gradient(torch.randn(adamw.curvature.dim, dtype=torch.float64))
    forward = estimate_influence(adamw, rule, progress=False).embeddings @ objective
    plan = build_plan(adamw.trajectory, 0, adamw.num_samples)
    adjoint = per_sample_adjoint_scores(rule, plan, CorrectionPolicy("none"), adamw.trajectory.epoch,
                             rule.final_objective_state(objective))
    torch.testing.assert_close(adjoint, forward, rtol=1e-9, atol=1e-13)


def test_projection_is_seeded_unbiased_and_the_same_in_blocks(monkeypatch):
    cached = GradientProjection(300, 64, seed=4)
    again = GradientProjection(300, 64, seed=4)
    vectors = torch.randn(3, 300, dtype=torch.float64)
    torch.testing.assert_close(cached(vectors), again(vectors), rtol=0, atol=0)
    assert not torch.allclose(cached(vectors), GradientProjection(300, 64, seed=5)(vectors))
    monkeypatch.setattr("hf_accinf.methods.projection.BLOCK", 128)  # three generator blocks, regenerated per call
    blocked = GradientProjection(300, 64, seed=4, memory_gb=0.0)
    assert blocked._matrix is None
    assert not torch.allclose(blocked(vectors), cached(vectors))  # other blocks, other draws: still one seed
    torch.testing.assert_close(blocked(vectors), GradientProjection(300, 64, seed=4, memory_gb=1.0)(vectors))
    wide = GradientProjection(50, 20_000, seed=0)  # E[R^T R] = I: dot products survive on average
    gram = wide(torch.eye(50, dtype=torch.float64))
    torch.testing.assert_close(gram @ gram.T, torch.eye(50, dtype=torch.float64), atol=0.05, rtol=0)


def test_scores_are_dot_products_in_the_projected_space(adamw):
    """Against the projection of the evaluation loss's gradient taken by autograd, independently of the backend."""
    rule = build_method(adamw, "acc-dvemb", projection_dim=4)
    embeddings = estimate_influence(adamw, rule, every_occurrence(rule), progress=False).embeddings
    x, y = adamw.features, adamw.labels
    final = {n: v[-1] for n, v in adamw.trajectory.params.items()}
    by_autograd = grad(lambda p: torch.nn.functional.cross_entropy(functional_call(adamw.model, p, (x,)), y))(final)
    gradient = rule.projection(torch.cat([by_autograd[n].flatten() for n in adamw.optimizer.group_of]))
    torch.testing.assert_close(scores_from_embeddings(adamw.curvature, embeddings, final, x, y, rule=rule),
                               embeddings @ gradient)
    cosine = scores_from_embeddings(adamw.curvature, embeddings, final, x, y, "cosine", rule=rule)
    torch.testing.assert_close(cosine, embeddings @ gradient / (embeddings.norm(dim=1) * gradient.norm()))
    with pytest.raises(AccInfError, match="projected"):
        scores_from_embeddings(adamw.curvature, embeddings, final, x, y, "evaluated", rule=rule)


def test_refusals_before_any_work(adamw):
    with pytest.raises(AccInfError, match="memory_budget_gb"):
        build_method(adamw, "dvemb", projection_dim=4, memory_budget_gb=1e-9)
    rule = build_method(adamw, "dvemb", projection_dim=4)
    assert rule._factors is None  # built on first use, in one backward pass


def test_deep_scope_warning_names_the_measured_agreement():
    from hf_accinf.methods.dvemb import deep_scope_warning
    from hf_accinf.methods.registry import METHODS

    for method in ("dvemb", "acc-dvemb"):
        sentence = deep_scope_warning(method, deep=True)
        assert METHODS[method].display in sentence and "docs/FIDELITY.md" in sentence and "Kendall tau" in sentence
        assert deep_scope_warning(method, deep=False) is None
    assert all(deep_scope_warning(method, deep) is None for method in METHODS if "dvemb" not in method
               for deep in (True, False))
