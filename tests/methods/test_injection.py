"""The adjoint form's injections: the classical occurrence of zero states, with no curvature product.

``StepOps.injection`` must equal ``occurrence(0, ..., c = 0)`` for every rule and removal, and
``injection_scores(u)`` must equal ``injection @ u`` (first-order removal reads it off per-row loss
tangents, no per-row gradients). Neither, nor the clip map, may apply the batch curvature: each step's
only product with ``H_B`` is the one of ``apply`` / ``apply_adjoint``.
"""

import pytest
import torch

from hf_accinf.methods.registry import build_method
from hf_accinf.engine.plan import build_plan
from hf_accinf.methods.adam import AdamRule
from hf_accinf.methods.removal import ClipMap
from tests.engine.helpers import make_problem
from tests.methods.helpers import make_adam_problem

PROBLEMS = {
    "sgd-momentum": lambda: make_problem(num_samples=10),
    "sgd-nesterov": lambda: make_problem(num_samples=10, nesterov=True),
    "sgd-plain-no-decay": lambda: make_problem(num_samples=10, momentum=0.0, weight_decay=0.0),
    "linear-head": lambda: make_problem(model=_linear(), num_samples=10, features=6, classes=3, momentum=0.0),
    "adamw": lambda: make_adam_problem("AdamW", num_samples=8),
    "adam-l2": lambda: make_adam_problem("Adam", num_samples=8, chosen=["2.weight", "2.bias"]),
}


def _linear():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 3).double()


def _rules(problem, removal):
    name = "adam-ie" if problem.optimizer.name in ("Adam", "AdamW") else "sgd-ie"
    yield build_method(problem, name, removal=removal)
    if name == "adam-ie":
        yield AdamRule(problem, removal, frozen_preconditioner=True)


class _Counter:
    """Counts the batch curvature's products (``hvp``, ``hvp_add``, ``row_hvp``) of every step's batch."""

    def __init__(self, curvature, monkeypatch):
        self.products, self.inside = 0, False
        original = curvature.at_step

        def at_step(step):
            batch = original(step)
            for name in ("hvp", "hvp_add", "row_hvp"):
                setattr(batch, name, self._counted(getattr(batch, name)))
            return batch

        monkeypatch.setattr(curvature, "at_step", at_step)

    def _counted(self, method):
        def counted(*args, **kwargs):
            outer = not self.inside
            self.products += outer  # hvp_add may call hvp: one product
            self.inside = True
            try:
                return method(*args, **kwargs)
            finally:
                self.inside = not outer

        return counted


@pytest.mark.parametrize("removal", ["exact", "first-order"])
@pytest.mark.parametrize("case", list(PROBLEMS))
def test_injection_is_the_occurrence_of_zero_states_without_curvature_products(case, removal, monkeypatch):
    problem = PROBLEMS[case]()
    trajectory = problem.trajectory
    assert (trajectory.clip_coef < 1).any()  # the clip map's rank-one term is exercised
    plan = build_plan(trajectory, 0, problem.num_samples, "cpu")
    counter = _Counter(problem.curvature, monkeypatch)
    generator = torch.Generator().manual_seed(3)
    for rule in _rules(problem, removal):
        for step in range(trajectory.num_steps):
            occurrences = plan.steps[step]
            count = len(occurrences.samples)
            counter.products = 0
            ops = rule.at_step(step)
            assert counter.products == 0  # the clip map needs no H_B G
            injection = ops.injection(occurrences.row_owner, occurrences.rows, count)
            adjoint = torch.randn(rule.state_dim, dtype=torch.float64, generator=generator)
            scores = ops.injection_scores(adjoint, occurrences.row_owner, occurrences.rows, count)
            assert counter.products == 0
            zero = torch.zeros(count, rule.state_dim, dtype=torch.float64)
            expected = ops.occurrence(zero, occurrences.row_owner, occurrences.rows, torch.zeros(count, dtype=torch.float64))
            torch.testing.assert_close(injection, expected, rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(scores, expected @ adjoint, rtol=1e-10, atol=1e-14)
            counter.products = 0
            ops.apply_adjoint(adjoint[None])
            assert counter.products == 1  # one product with the batch curvature per adjoint step
            counter.products = 0
            ops.apply(adjoint[None])
            assert counter.products == 1


@pytest.mark.parametrize("transpose", [False, True])
def test_clip_map_curvature_term_is_clip_of_the_product_and_its_transpose(transpose):
    problem = make_problem(num_samples=10)
    step = int((problem.trajectory.clip_coef < 1).nonzero()[0])
    batch = problem.curvature.at_step(step)
    clip = ClipMap(batch, problem.optimizer.max_grad_norm, float(problem.trajectory.grad_norm[step]))
    assert clip.active
    dim = problem.curvature.dim
    hessian = batch.hvp(torch.eye(dim, dtype=torch.float64))  # H_B, symmetric
    jacobian = clip.jacobian(torch.eye(dim, dtype=torch.float64))  # clip(G, .), symmetric
    torch.testing.assert_close(jacobian, jacobian.T, rtol=0, atol=1e-15)
    expected = (hessian @ jacobian if transpose else jacobian @ hessian)  # rows: x -> (J H x) or (H J x)
    vectors = torch.randn(3, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    base = torch.randn(3, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = clip.curvature_term(vectors, base, -0.7, transpose)
    torch.testing.assert_close(result, base - 0.7 * vectors @ expected.T, rtol=1e-12, atol=1e-14)
    alone = ClipMap.of_gradient(batch.batch_grad, problem.optimizer.max_grad_norm, float(problem.trajectory.grad_norm[step]))
    torch.testing.assert_close(alone.jacobian(vectors), clip.rows(batch.batch_grad.expand_as(vectors), vectors)[0],
                               rtol=1e-13, atol=1e-15)


def test_exact_injection_scores_in_blocks_of_one_sample_equal_all_at_once(monkeypatch):
    """The exact injections' scores are taken a block of samples at a time (memory): one sample a block gives
    the scores of the whole step at once."""
    import hf_accinf.methods.removal as removal

    problem = PROBLEMS["adamw"]()
    plan = build_plan(problem.trajectory, 0, problem.num_samples, "cpu")
    rule = next(_rules(problem, "exact"))
    generator = torch.Generator().manual_seed(5)
    for step in range(problem.trajectory.num_steps):
        occurrences, ops = plan.steps[step], rule.at_step(step)
        count = len(occurrences.samples)
        adjoint = torch.randn(rule.state_dim, dtype=torch.float64, generator=generator)
        whole = ops.injection(occurrences.row_owner, occurrences.rows, count) @ adjoint
        monkeypatch.setattr(removal, "INJECTION_BLOCK_BYTES", 1)
        blocked = ops.injection_scores(adjoint, occurrences.row_owner, occurrences.rows, count)
        monkeypatch.undo()
        torch.testing.assert_close(blocked, whole, rtol=1e-10, atol=1e-14)
