"""The curvature approximations of :mod:`hf_accinf.methods.output_hessian` against explicit matrices.

Oracle: the Jacobian of every row's logits with respect to the flat scope (``torch.func.jacrev`` of a
``functional_call`` in float64), the row gradients by autograd, and ``J_r^T (diag p - p p^T) J_r`` /
``g_r g_r^T`` summed with the recorded weights; on the linear head the GGN is the Hessian itself.
"""

import pytest
import torch
from torch.func import jacrev

from hf_accinf import RunReader
from hf_accinf.methods.output_hessian import fisher_product, ggn_product, row_output_factors
from hf_accinf.problem import problem_from_run
from tests.conftest import record_run
from tests.engine.test_deep_scope import tiny_model


@pytest.fixture(scope="module", params=["bert", "vit"])
def recorded(request, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, data = tiny_model(request.param)
    run_dir = tmp_path_factory.mktemp(request.param) / "run"
    record_run(model, data, run_dir, recording={"checkpoint_every": 1}, optim="adamw_torch", learning_rate=0.05,
               max_grad_norm=0.5, per_device_train_batch_size=3, num_train_epochs=1)
    yield RunReader(run_dir), data
    torch.set_num_threads(threads)


def explicit(problem, batch):
    """``(J (b, C, P), probs (b, C), row gradients (b, P))`` at the step's point, by plain autograd."""
    curvature = problem.curvature
    jacobians, probs = [], []
    for micro in batch.micros:
        def logits(flat, micro=micro):
            return curvature.logits_named(curvature.unflatten(flat), batch.fixed, micro.inputs)

        values = logits(batch.point)
        jacobians.append(jacrev(logits)(batch.point))
        probs.append(torch.softmax(values, -1))
    jacobian, prob = torch.cat(jacobians), torch.cat(probs)
    targets = torch.cat([micro.targets for micro in batch.micros])
    residual = prob - targets
    return jacobian, prob, torch.einsum("rc,rcp->rp", residual, jacobian)


@pytest.mark.parametrize("scope", ["last:1", "all"])
def test_products_equal_the_explicit_matrices(recorded, scope):
    run, data = recorded
    problem = problem_from_run(run, modules=[scope], train_dataset=data)
    batch = problem.curvature.at_step(1)
    jacobian, prob, grads = explicit(problem, batch)
    weights = torch.cat([micro.weights for micro in batch.micros])
    lam = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    ggn = torch.einsum("r,rcp,rcd,rdq->pq", weights, jacobian, lam, jacobian)
    fisher = torch.einsum("r,rp,rq->pq", weights, grads, grads)
    vectors = torch.randn(4, problem.curvature.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected_ggn, expected_fisher = vectors @ ggn, vectors @ fisher
    # forward-over-reverse and jacrev round differently: ~1e-12 of the scale
    torch.testing.assert_close(ggn_product(batch, vectors), expected_ggn, rtol=1e-8,
                               atol=1e-10 * float(expected_ggn.abs().max()))
    torch.testing.assert_close(fisher_product(batch, vectors), expected_fisher, rtol=1e-8,
                               atol=1e-10 * float(expected_fisher.abs().max()))
    factors = row_output_factors(batch)
    assert factors.shape == (len(weights), prob.shape[1], problem.curvature.dim)
    per_row = torch.einsum("rcp,rcq->rpq", factors, factors)
    expected = torch.einsum("rcp,rcd,rdq->rpq", jacobian, lam, jacobian)
    torch.testing.assert_close(per_row, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))


def test_on_the_linear_head_the_ggn_is_the_hessian(recorded):
    run, data = recorded
    problem = problem_from_run(run, modules=["classifier"], train_dataset=data, backend="model")
    batch = problem.curvature.at_step(1)
    vectors = torch.randn(3, problem.curvature.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    hessian = batch.hvp(vectors)
    torch.testing.assert_close(ggn_product(batch, vectors), hessian, rtol=1e-8, atol=1e-10 * float(hessian.abs().max()))
