"""Adam-IE / ACC-Adam-IE against a naive transcription: one sample at a time, autograd through torch's step.

The oracle differentiates :func:`hf_accinf.evaluation.optim.optimizer_step` (a functional copy of torch
Adam/AdamW with global clipping, written independently of the rules) with ``torch.func.jvp``, per
sample and per step, in float64: exact removal ``J_s step(s; w^-j) D + step(s; w^-j) - step(s; w)``,
first-order removal with the full mixed ACC derivative (DESIGN.md section 4).
"""

import pytest
import torch
from torch.func import functional_call, grad

from hf_accinf.engine import CorrectionPolicy, estimate_influence, every_occurrence
from hf_accinf.engine.plan import build_plan
from hf_accinf.engine.sweep import per_sample_adjoint_scores
from hf_accinf.errors import AccInfError
from hf_accinf.evaluation.optim import optimizer_step
from hf_accinf.methods.base import StepOps
from hf_accinf.methods.registry import build_method
from tests.engine.helpers import estimate, oracle_occurrence
from tests.methods.helpers import make_adam_problem


def oracle_embeddings(problem, removal: str, coefficient, frozen: bool = False) -> torch.Tensor:
    trajectory, spec = problem.trajectory, problem.optimizer
    model, chosen = problem.model, list(spec.group_of)
    shapes = {n: trajectory.params[n][0].shape for n in chosen}
    sizes = [trajectory.params[n][0].numel() for n in chosen]
    size = sum(sizes)

    def unflatten(flat):
        return {n: part.view(shapes[n]) for n, part in zip(chosen, torch.split(flat, sizes))}

    def flatten(named):
        return torch.cat([named[n].flatten() for n in chosen])

    results = []
    for j in range(problem.num_samples):
        delta = torch.zeros(3 * size, dtype=torch.float64)
        for t in range(trajectory.num_steps):
            ids, rows = trajectory.batch(t), trajectory.rows_of(t)
            x, y = trajectory.head_input[rows], trajectory.labels[rows]
            fixed = {n: v[t] for n, v in trajectory.params.items() if n not in chosen}
            state = torch.cat([flatten({n: trajectory.params[n][t] for n in chosen}),
                               flatten({n: trajectory.states[f"{n}.exp_avg"][t] for n in chosen}),
                               flatten({n: trajectory.states[f"{n}.exp_avg_sq"][t] for n in chosen})])
            w = trajectory.row_weight[rows].clone()
            lrs = {n: float(trajectory.lr[t, spec.group_of[n]]) for n in chosen}
            count = int(trajectory.optimizer_step_count[t])

            def loss(params, weights):
                logits = functional_call(model, {**fixed, **params}, (x,))
                return (weights * torch.nn.functional.cross_entropy(logits, y, reduction="none")).sum()

            g_rec = flatten(grad(loss)(unflatten(state[:size]), w))
            rest = max(float(trajectory.grad_norm[t]) ** 2 - float(g_rec @ g_rec), 0.0)

            def raw_step(s, weights, preconditioner=None):
                theta, m, v = unflatten(s[:size]), unflatten(s[size : 2 * size]), unflatten(s[2 * size :])
                moments = {**{f"{n}.exp_avg": m[n] for n in chosen}, **{f"{n}.exp_avg_sq": v[n] for n in chosen}}
                params, new = optimizer_step(spec, theta, moments, grad(loss)(theta, weights), lrs, count, rest,
                                             preconditioner)
                return torch.cat([flatten(params), flatten({n: new[f"{n}.exp_avg"] for n in chosen}),
                                  flatten({n: new[f"{n}.exp_avg_sq"] for n in chosen})])

            if frozen:  # the preconditioner of the recorded step, a constant
                recorded_v = unflatten(raw_step(state, w)[2 * size :].detach())

                def step(s, weights):
                    out = raw_step(s, weights, recorded_v)
                    return torch.cat([out[: 2 * size], torch.zeros(size, dtype=out.dtype)])
            else:
                step = raw_step

            delta = oracle_occurrence(step, state, delta, w, ids, j, coefficient(j, t), removal)
        results.append(delta[:size])
    return torch.stack(results)


def _coin(policy):
    return lambda j, t: float(policy.coefficients(torch.tensor([j]), t, 0)[0])


POLICIES = {
    "none": ("adam-ie", lambda: CorrectionPolicy("none")),
    "all": ("acc-adam-ie", lambda: CorrectionPolicy("all")),
    "random": ("acc-adam-ie", lambda: CorrectionPolicy("random", p=0.5, seed=3)),
}


@pytest.fixture(scope="module")
def adamw():
    return make_adam_problem("AdamW", num_samples=8)


@pytest.fixture(scope="module")
def adam_l2():
    return make_adam_problem("Adam", num_samples=8, chosen=["2.weight", "2.bias"])


CASES = [(which, policy, removal) for removal in ("exact", "first-order")
         for which, policy in (("adamw", "none"), ("adamw", "all"), ("adamw", "random"), ("adam_l2", "all"))]


@pytest.mark.parametrize("which,policy_name,removal", CASES)
def test_adam_rules_match_the_naive_oracle(which, policy_name, removal, request):
    """Both schedules equal the oracle to 1e-8: clipping active on some steps, decay on weights only,
    a repeated row, warm-up then decay, Adam's L2 in the gradient, whole model or the last layer."""
    problem = request.getfixturevalue(which)
    assert (problem.trajectory.clip_coef < 1).any() and (problem.trajectory.clip_coef == 1).any()
    method, make_policy = POLICIES[policy_name]
    expected = oracle_embeddings(problem, removal, _coin(make_policy()))
    rule = build_method(problem, method, removal=removal)
    for schedule in ("sweep", "propagator"):
        result = estimate_influence(problem, rule, policy=make_policy(), schedule=schedule, progress=False)
        torch.testing.assert_close(result.embeddings, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("removal", ["exact", "first-order"])
def test_frozen_preconditioner_matches_its_oracle(adamw, removal):
    expected = oracle_embeddings(adamw, removal, lambda j, t: 1.0, frozen=True)
    rule = build_method(adamw, "acc-adam-ie", removal=removal, frozen_preconditioner=True)
    for schedule in ("sweep", "propagator"):
        result = estimate_influence(adamw, rule, every_occurrence(rule), schedule=schedule, progress=False)
        torch.testing.assert_close(result.embeddings, expected, rtol=1e-8, atol=1e-12)
    full = estimate(adamw, "acc-adam-ie", removal, progress=False).embeddings
    assert not torch.allclose(full, expected)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("which", ["adamw", "adam_l2"])
def test_hand_written_adjoint_is_the_vjp(which, frozen, request):
    problem = request.getfixturevalue(which)
    rule = build_method(problem, "acc-adam-ie", frozen_preconditioner=frozen)
    vectors = torch.randn(5, rule.state_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for step in range(problem.trajectory.num_steps):
        ops = rule.at_step(step)
        torch.testing.assert_close(ops.apply_adjoint(vectors), StepOps.apply_adjoint(ops, vectors), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("removal", ["exact", "first-order"])
def test_classical_twin_is_the_shared_step_plus_the_injection(adamw, removal):
    """With ``c = 0`` an occurrence is ``M_t D + occurrence(0)`` (the propagator relies on it); with
    ``c = 1`` it is not (the ACC transition differs)."""
    rule = build_method(adamw, "acc-adam-ie", removal=removal)
    plan = build_plan(adamw.trajectory, 0, adamw.num_samples)
    for step in range(adamw.trajectory.num_steps):
        occurrences, ops = plan.steps[step], rule.at_step(step)
        count = len(occurrences.samples)
        states = torch.randn(count, rule.state_dim, dtype=torch.float64)
        args = (occurrences.row_owner, occurrences.rows)
        zero_c = torch.zeros(count, dtype=torch.float64)
        twin = ops.occurrence(states, *args, zero_c)
        expected = ops.apply(states) + ops.occurrence(torch.zeros_like(states), *args, zero_c)
        torch.testing.assert_close(twin, expected, rtol=1e-10, atol=1e-13)
        accumulative = ops.occurrence(states, *args, torch.ones(count, dtype=torch.float64))
        assert not torch.allclose(accumulative, twin)


@pytest.mark.parametrize("method", ["adam-ie", "acc-adam-ie"])
def test_forward_and_adjoint_forms_agree(adamw, method):
    objective = torch.randn(adamw.curvature.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rule = build_method(adamw, method)
    forward = estimate_influence(adamw, rule, every_occurrence(rule), progress=False).embeddings @ objective
    policy = CorrectionPolicy("all" if rule.accumulative else "none")
    plan = build_plan(adamw.trajectory, 0, adamw.num_samples)
    adjoint = per_sample_adjoint_scores(rule, plan, policy, adamw.trajectory.epoch, rule.final_objective_state(objective))
    torch.testing.assert_close(adjoint, forward, rtol=1e-9, atol=1e-13)


def test_refusals_name_the_methods_that_fit(adamw):
    with pytest.raises(AccInfError, match="adam-ie, acc-adam-ie, dvemb, acc-dvemb, adam-ie-sketch, tracin"):
        build_method(adamw, "acc-sgd-ie")
    with pytest.raises(AccInfError, match="removal"):
        build_method(adamw, "acc-adam-ie", removal="second-order")


@pytest.mark.parametrize("method", ["adam-ie", "dvemb"])
@pytest.mark.parametrize("flag", ["amsgrad", "maximize"])
def test_the_rules_refuse_adam_flags_they_do_not_model(method, flag):
    problem = make_adam_problem("AdamW")
    for group in problem.optimizer.groups:
        setattr(group, flag, True)
    with pytest.raises(AccInfError, match="without amsgrad or maximize"):
        build_method(problem, method)
