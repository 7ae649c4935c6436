"""The adjoint form: the forward form's classical scores from one backward pass that touches only batch rows."""

import pytest
import torch

from hf_accinf.engine import CorrectionPolicy
from hf_accinf.engine.adjoint import adjoint_scores, choose_form
from hf_accinf.methods.registry import build_method
from hf_accinf.errors import AccInfError
from tests.engine.helpers import estimate, make_problem

CASES = {
    "mlp-momentum": dict(num_samples=14, batch_size=4),
    "mlp-nesterov-last-layer": dict(num_samples=14, batch_size=4, nesterov=True, chosen=["2.weight", "2.bias"]),
    "linear-head-closed-form-plain-sgd": dict(model="linear", num_samples=14, batch_size=4, features=6, classes=3,
                                              momentum=0.0),
}


def _problem(case: str):
    options = dict(CASES[case])
    if options.get("model") == "linear":
        torch.manual_seed(0)
        options["model"] = torch.nn.Linear(6, 3).double()
    return make_problem(**options)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_adjoint_forms_give_the_same_classical_scores(case):
    problem = _problem(case)
    trajectory = problem.trajectory
    assert (trajectory.clip_coef < 1).any()  # clipping active, decay on; helpers repeat a row in one step
    assert (trajectory.batch(1)[-1] == trajectory.batch(1)[0]).item()
    objective = torch.randn(problem.curvature.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for removal in ("exact", "first-order"):
        forward = estimate(problem, "sgd-ie", removal, progress=False).embeddings @ objective
        rule = build_method(problem, "sgd-ie", removal=removal)
        adjoint = adjoint_scores(rule, problem, objective, progress=False).scores
        assert adjoint.shape == (problem.num_samples,)
        assert (adjoint - forward).abs().max() <= 1e-9 * forward.abs().max()


class _Spy:
    """Wraps an update rule and records the shapes of every state block handed to its step operators."""

    def __init__(self, rule):
        self.rule, self.calls = rule, []
        self.state_dim, self.param_dim = rule.state_dim, rule.param_dim

    def final_objective_state(self, gradient):
        return self.rule.final_objective_state(gradient)

    def at_step(self, step):
        ops, calls = self.rule.at_step(step), self.calls

        class Ops:
            def apply(self, states):
                calls.append(("apply", step, tuple(states.shape)))
                return ops.apply(states)

            def apply_adjoint(self, states):
                calls.append(("apply_adjoint", step, tuple(states.shape)))
                return ops.apply_adjoint(states)

            def injection_scores(self, adjoint, row_owner, rows, count):
                calls.append(("injection_scores", step, (count, len(adjoint))))
                return ops.injection_scores(adjoint, row_owner, rows, count)

        return Ops()


def test_adjoint_touches_one_state_and_the_batch_rows_only():
    problem = make_problem(num_samples=16, batch_size=4, epochs=2)
    rule = build_method(problem, "sgd-ie", removal="exact")
    spy = _Spy(rule)
    objective = torch.randn(rule.param_dim, dtype=torch.float64)
    adjoint_scores(spy, problem, objective, progress=False)
    steps = problem.trajectory.num_steps
    adjoint_calls = [c for c in spy.calls if c[0] == "apply_adjoint"]
    assert [c[1] for c in adjoint_calls] == list(reversed(range(steps)))  # one backward pass, steps T-1 .. 0
    assert all(shape == (1, rule.state_dim) for _, _, shape in adjoint_calls)
    assert not [c for c in spy.calls if c[0] == "apply"]
    for _, step, shape in (c for c in spy.calls if c[0] == "injection_scores"):
        assert shape == (len(problem.trajectory.batch(step).unique()), rule.state_dim)  # the step's rows, no N x S
    assert len(spy.calls) == 2 * steps


def test_form_choice_and_refusals():
    assert choose_form("auto", accumulative=False)[0] == "adjoint"
    assert choose_form("auto", accumulative=True)[0] == "forward"
    assert choose_form("auto", accumulative=False, score_kind="evaluated")[0] == "forward"
    assert choose_form("forward", accumulative=False)[0] == "forward"
    with pytest.raises(AccInfError, match="--form forward"):
        choose_form("adjoint", accumulative=True)
    with pytest.raises(AccInfError, match="linear scores only"):
        choose_form("adjoint", accumulative=False, score_kind="evaluated")
    with pytest.raises(AccInfError, match="Unknown form"):
        choose_form("tangent", accumulative=False)


def test_an_objective_of_the_wrong_size_is_refused():
    problem = make_problem(num_samples=6)
    rule = build_method(problem, "sgd-ie", removal="exact")
    with pytest.raises(AccInfError, match="objective gradient"):
        adjoint_scores(rule, problem, torch.zeros(rule.param_dim + 1, dtype=torch.float64), progress=False)


@pytest.mark.parametrize("removal,policy", [
    ("exact", CorrectionPolicy("stage", stages=[(1, 5)])),
    ("first-order", CorrectionPolicy("stage", stage_epochs=[(0, 1)])),
], ids=["exact-steps", "first-order-epochs"])
def test_stage_limited_acc_by_the_hybrid_equals_the_forward_form(removal, policy):
    """ACC on the first steps only: forward states on that prefix, the shared adjoint after it."""
    problem = make_problem(num_samples=14, batch_size=4, epochs=3)
    objective = torch.randn(problem.curvature.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rule = build_method(problem, "acc-sgd-ie", removal=removal)
    forward = estimate(problem, "acc-sgd-ie", removal, policy, progress=False).embeddings @ objective
    hybrid = adjoint_scores(rule, problem, objective, progress=False, policy=policy).scores
    assert (hybrid - forward).abs().max() <= 1e-9 * forward.abs().max()
    classical = adjoint_scores(rule, problem, objective, progress=False).scores
    with_probes = adjoint_scores(rule, problem, objective, progress=False, policy=policy, probes=2)
    torch.testing.assert_close(with_probes.scores, hybrid, rtol=1e-12, atol=1e-15 * float(hybrid.abs().max()))
    assert with_probes.trust.kind == "adjoint-probes" and with_probes.trust.growth > 0
    assert (hybrid - classical).abs().max() > 1e-6 * classical.abs().max()  # the corrections did something
    assert choose_form("adjoint", True, policy=policy)[0] == "adjoint"
    for refused in (CorrectionPolicy("all"), CorrectionPolicy("random", p=0.5)):
        with pytest.raises(AccInfError, match="--form forward"):
            choose_form("adjoint", True, policy=refused)
        with pytest.raises(AccInfError, match="--form forward"):
            adjoint_scores(rule, problem, objective, progress=False, policy=refused)


def test_dtype_auto_is_float32_for_deep_scopes_and_float64_for_the_head():
    from hf_accinf.config import ScoreArguments, resolve_dtype

    assert ScoreArguments(run_dir="run").dtype == "auto"
    assert resolve_dtype("auto", deep_scope=True) == torch.float32
    assert resolve_dtype("auto", deep_scope=False) == torch.float64
    assert resolve_dtype("float64", deep_scope=True) == torch.float64
    with pytest.raises(ValueError, match="dtype"):
        ScoreArguments(run_dir="run", dtype="bfloat16")
