"""The engine against a naive transcription of the recursion: one sample at a time, autograd everywhere.

The oracle differentiates a functional torch-SGD step (global clipping, momentum or Nesterov, L2) with
``torch.func.jvp`` (DESIGN.md section 4: exact removal, first-order removal with the mixed ACC term),
looping over samples and steps in Python; it shares no code with the engine's update rules.
"""

import pytest
import torch
from torch.func import functional_call, grad

from hf_accinf.engine import CorrectionPolicy
from hf_accinf.engine.plan import build_plan
from hf_accinf.engine.sweep import per_sample_adjoint_scores
from hf_accinf.methods.registry import build_method
from tests.engine.helpers import estimate, make_problem, oracle_occurrence


def oracle_embeddings(problem, removal: str, coefficient) -> torch.Tensor:
    trajectory, spec = problem.trajectory, problem.optimizer
    model, chosen = problem.model, list(spec.group_of)
    group = spec.groups[0]
    mu, decay, max_norm, nesterov = group.momentum, group.weight_decay, spec.max_grad_norm, bool(group.nesterov)
    sizes = [trajectory.params[n][0].numel() for n in chosen]

    def unflatten(flat):
        return {n: part.view_as(trajectory.params[n][0]) for n, part in zip(chosen, torch.split(flat, sizes))}

    results = []
    for j in range(problem.num_samples):
        delta = torch.zeros(2 * sum(sizes), dtype=torch.float64)
        for t in range(trajectory.num_steps):
            ids = trajectory.batch(t)
            rows = trajectory.rows_of(t)
            x, y = trajectory.head_input[rows], trajectory.labels[rows]
            fixed = {n: v[t] for n, v in trajectory.params.items() if n not in chosen}
            theta = torch.cat([trajectory.params[n][t].flatten() for n in chosen])
            buf = torch.cat([trajectory.states[f"{n}.momentum_buffer"][t].flatten() for n in chosen])
            state = torch.cat([theta, buf])
            w = trajectory.row_weight[rows].clone()
            lr = float(trajectory.lr[t, 0])

            def loss(flat, weights):
                logits = functional_call(model, {**fixed, **unflatten(flat)}, (x,))
                return (weights * torch.nn.functional.cross_entropy(logits, y, reduction="none")).sum()

            g_full = grad(loss)(theta, w)
            rest = max(float(trajectory.grad_norm[t]) ** 2 - float(g_full @ g_full), 0.0)

            def step(s, weights):
                th, bu = s[: len(theta)], s[len(theta) :]
                g = grad(loss)(th, weights)
                if max_norm > 0:
                    norm = torch.sqrt(rest + (g * g).sum())
                    g = torch.clamp(max_norm / (norm + 1e-6), max=1.0) * g
                new_buf = mu * bu + g + decay * th
                direction = g + decay * th + mu * new_buf if nesterov else new_buf  # torch.optim.SGD's Nesterov
                return torch.cat([th - lr * direction, new_buf])

            delta = oracle_occurrence(step, state, delta, w, ids, j, coefficient(j, t), removal)
        results.append(delta[: len(theta)])
    return torch.stack(results)


POLICIES = {
    "none": (lambda problem: CorrectionPolicy("none"), lambda j, t: 0.0, "sgd-ie"),
    "all": (lambda problem: CorrectionPolicy("all"), lambda j, t: 1.0, "acc-sgd-ie"),
    "random": (lambda problem: CorrectionPolicy("random", p=0.5, seed=3), None, "acc-sgd-ie"),
    "stage": (lambda problem: CorrectionPolicy("stage", stages=[(0, 4)]), lambda j, t: float(t < 4), "acc-sgd-ie"),
}


def _coin(policy):
    def coefficient(j, t):
        return float(policy.coefficients(torch.tensor([j]), t, 0)[0])
    return coefficient


@pytest.mark.parametrize("removal", ["exact", "first-order"])
@pytest.mark.parametrize("policy_name", list(POLICIES))
@pytest.mark.parametrize("chosen", [None, ["2.weight", "2.bias"]], ids=["all-params", "last-layer"])
def test_engine_matches_the_naive_oracle(removal, policy_name, chosen):
    problem = make_problem(chosen=chosen)
    make_policy, coefficient, method = POLICIES[policy_name]
    policy = make_policy(problem)
    expected = oracle_embeddings(problem, removal, coefficient or _coin(policy))
    assert (problem.trajectory.clip_coef < 1).any() and (problem.trajectory.clip_coef == 1).any()
    for schedule in ("sweep", "propagator"):
        result = estimate(problem, method, removal, policy, schedule=schedule, progress=False)
        torch.testing.assert_close(result.embeddings, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("removal,policy_name", [("exact", "none"), ("first-order", "all")])
def test_nesterov_matches_the_naive_oracle(removal, policy_name):
    problem = make_problem(nesterov=True)
    assert problem.optimizer.groups[0].nesterov and (problem.trajectory.clip_coef < 1).any()
    make_policy, coefficient, method = POLICIES[policy_name]
    expected = oracle_embeddings(problem, removal, coefficient)
    result = estimate(problem, method, removal, make_policy(problem), schedule="sweep", progress=False)
    torch.testing.assert_close(result.embeddings, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("removal", ["exact", "first-order"])
@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_sweep_equals_propagator(nesterov, removal, policy_name):
    problem = make_problem(num_samples=23, batch_size=5, epochs=4, nesterov=nesterov)
    make_policy, _, method = POLICIES[policy_name]
    sweep = estimate(problem, method, removal, make_policy(problem), schedule="sweep", progress=False)
    prop = estimate(problem, method, removal, make_policy(problem), schedule="propagator", progress=False)
    assert len(build_plan(problem.trajectory, 0, 23).windows) > 4  # the repeated row splits windows
    scale = sweep.embeddings.abs().max()
    assert (prop.embeddings - sweep.embeddings).abs().max() <= 1e-10 * scale


def test_randomized_extremes_are_the_two_methods():
    problem = make_problem(num_samples=15, batch_size=4)
    classical = estimate(problem, "sgd-ie", progress=False).embeddings
    accumulative = estimate(problem, "acc-sgd-ie", progress=False).embeddings
    never = estimate(problem, "acc-sgd-ie", policy=CorrectionPolicy("random", p=0.0), progress=False)
    always = estimate(problem, "acc-sgd-ie", policy=CorrectionPolicy("random", p=1.0), progress=False)
    assert torch.equal(never.embeddings, classical) and torch.equal(always.embeddings, accumulative)
    assert not torch.allclose(classical, accumulative)


@pytest.mark.parametrize("method", ["sgd-ie", "acc-sgd-ie"])
def test_forward_and_adjoint_forms_agree(method):
    problem = make_problem(num_samples=12)
    objective = torch.randn(problem.curvature.dim, dtype=torch.float64)
    forward = estimate(problem, method, progress=False).embeddings @ objective
    rule = build_method(problem, method, removal="exact")
    accumulative = rule.accumulative
    policy = CorrectionPolicy("all" if accumulative else "none")
    plan = build_plan(problem.trajectory, 0, problem.num_samples)
    adjoint = per_sample_adjoint_scores(rule, plan, policy, problem.trajectory.epoch, rule.final_objective_state(objective))
    torch.testing.assert_close(adjoint, forward, rtol=1e-9, atol=1e-13)


def test_without_clipping_exact_and_first_order_removal_coincide():
    problem = make_problem(max_grad_norm=0.0)
    exact = estimate(problem, "acc-sgd-ie", "exact", progress=False).embeddings
    first = estimate(problem, "acc-sgd-ie", "first-order", progress=False).embeddings
    torch.testing.assert_close(exact, first, rtol=1e-10, atol=1e-14)


def test_closed_form_linear_head_equals_torch_func():
    model = torch.nn.Linear(6, 3).double()
    a = make_problem(model=model, features=6, classes=3, backend="linear")
    b = make_problem(model=torch.nn.Linear(6, 3).double().requires_grad_(True), features=6, classes=3, backend="functional")
    # Same data, same initial weights: rebuild b from a's initial weights for an identical run.
    model_b = torch.nn.Linear(6, 3).double()
    model_b.load_state_dict(a.initial)
    b = make_problem(model=model_b, features=6, classes=3, backend="functional")
    assert torch.equal(a.trajectory.params["weight"], b.trajectory.params["weight"])
    for method in ("sgd-ie", "acc-sgd-ie"):
        linear = estimate(a, method, progress=False).embeddings
        functional = estimate(b, method, progress=False).embeddings
        # layouts: the closed form holds [W | b] row by row, torch.func holds W flattened then b
        named_linear = a.curvature.unflatten(linear)
        named_functional = b.curvature.unflatten(functional)
        for name in ("weight", "bias"):
            torch.testing.assert_close(named_linear[name], named_functional[name], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("per_parameter_lr", [False, True])
def test_hand_written_adjoint_is_the_transpose(momentum, nesterov, per_parameter_lr):
    """The explicit ``M_t^T`` equals the VJP of ``M_t`` (clipping active, decay on)."""
    problem = make_problem(momentum=momentum, nesterov=nesterov)
    if per_parameter_lr:  # two groups with different learning rates
        from dataclasses import replace

        problem.optimizer.groups.append(replace(problem.optimizer.groups[0], index=1, weight_decay=0.0))
        problem.optimizer.group_of = {name: int(name.endswith("bias")) for name in problem.optimizer.group_of}
        problem.trajectory.lr = torch.cat([problem.trajectory.lr, 0.3 * problem.trajectory.lr], 1)
    rule = build_method(problem, "acc-sgd-ie", removal="exact")
    vectors = torch.randn(5, rule.state_dim, dtype=torch.float64)
    for step in range(problem.trajectory.num_steps):
        ops = rule.at_step(step)
        generic = super(type(ops), ops).apply_adjoint(vectors)
        torch.testing.assert_close(ops.apply_adjoint(vectors), generic, rtol=1e-12, atol=1e-14)
