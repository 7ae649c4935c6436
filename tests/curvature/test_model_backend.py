"""The model backend (DESIGN.md section 6b) against plain autograd, on both per-row paths, and against the
head fast path on the head scope."""

import pytest
import torch

from hf_accinf.curvature.attention import EXACT_ATTENTION
from hf_accinf import RunReader
from hf_accinf.problem import problem_from_run
from tests.conftest import record_run
from tests.engine.helpers import estimate
from tests.engine.test_deep_scope import tiny_model


@pytest.fixture(scope="module", params=["bert", "vit"])
def recorded(request, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny-model ops are latency bound
    model, data = tiny_model(request.param)
    run_dir = tmp_path_factory.mktemp(request.param) / "run"
    record_run(model, data, run_dir, recording={"checkpoint_every": 1}, optim="sgd", optim_args="momentum=0.9",
               learning_rate=0.5, max_grad_norm=0.5, per_device_train_batch_size=3, num_train_epochs=2)
    yield request.param, RunReader(run_dir), data
    torch.set_num_threads(threads)


def autograd_reference(run, data, step, names, vectors):
    """Per-row gradients, per-row ``H_r v_r``, the batch gradient and ``H_B v_k`` by double-backward autograd."""
    model = run.build_model().double().eval()
    model.set_attn_implementation(EXACT_ATTENTION)  # fused SDPA has no double backward; eager softmax is float32
    params = dict(model.named_parameters())
    for name, value in run.load_checkpoint(step).items():
        if name in params:
            params[name].data.copy_(value.double())
    trajectory = run.trajectory()
    rows = data[trajectory.batch(step).tolist()]
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in rows.items() if k != "labels"}
    weights = trajectory.row_weight[trajectory.rows_of(step)]
    losses = torch.nn.functional.cross_entropy(model(**inputs).logits, rows["labels"], reduction="none")
    chosen = [params[name] for name in names]

    def flat_grad(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, chosen, create_graph=True)])

    def hessian_product(gradient, vector):
        return torch.cat([h.flatten() for h in torch.autograd.grad(gradient @ vector, chosen, retain_graph=True)])

    row_grads = [flat_grad(loss) for loss in losses]
    batch_grad = flat_grad((weights * losses).sum())
    return (torch.stack([g.detach() for g in row_grads]),
            torch.stack([hessian_product(g, v) for g, v in zip(row_grads, vectors)]),
            batch_grad.detach(),
            torch.stack([hessian_product(batch_grad, v) for v in vectors]))


@pytest.mark.parametrize("scope", ["last:1", "all"])
def test_model_backend_equals_autograd_on_both_per_row_paths(recorded, scope):
    kind, run, data = recorded
    step = 1
    for path in ["vmap", "weights"]:
        problem = problem_from_run(run, modules=[scope], train_dataset=data, per_row=path)
        batch = problem.curvature.at_step(step)
        rows = torch.arange(len(batch.row_weight))
        vectors = torch.randn(len(rows), problem.curvature.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        grads, row_hvps, batch_grad, batch_hvps = autograd_reference(run, data, step, list(problem.scope.parameters), vectors)
        torch.testing.assert_close(batch.row_grads(rows), grads, rtol=1e-10, atol=1e-12)
        # Forward-over-reverse and double backward round differently through LayerNorm: ~1e-10 of the scale.
        close = dict(rtol=1e-8, atol=1e-9 * float(row_hvps.abs().max()))
        torch.testing.assert_close(batch.row_hvp(vectors, rows), row_hvps, **close)
        torch.testing.assert_close(batch.batch_grad, batch_grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(batch.hvp(vectors), batch_hvps, **close)
        # a subset of rows in another order, and chunked vector blocks
        subset = torch.tensor([2, 0])
        torch.testing.assert_close(batch.row_grads(subset), grads[subset], rtol=1e-10, atol=1e-12)
        problem.curvature.vector_chunk = 2
        torch.testing.assert_close(batch.hvp(vectors), batch_hvps, **close)


def test_head_scope_through_the_model_backend_equals_the_head_fast_path(recorded):
    """The head backend replays recorded float32 head inputs; the model backend recomputes them in float64."""
    kind, run, data = recorded
    fast = problem_from_run(run, modules=["classifier"])
    slow = problem_from_run(run, modules=["classifier"], backend="model", train_dataset=data)
    assert type(fast.curvature).__name__ == "LinearHeadCurvature" and type(slow.curvature).__name__ == "ModelCurvature"
    for method in ("sgd-ie", "acc-sgd-ie"):
        expected = fast.curvature.unflatten(estimate(fast, method, schedule="sweep", progress=False).embeddings)
        actual = slow.curvature.unflatten(estimate(slow, method, schedule="sweep", progress=False).embeddings)
        scale = float(expected["weight"].abs().max())
        for name in ("weight", "bias"):
            torch.testing.assert_close(actual[f"classifier.{name}"], expected[name], rtol=1e-5, atol=1e-6 * scale)
