"""``row_loss_tangents(v)``: every backend's per-row directional derivatives equal ``g_r . v``."""

import pytest
import torch

from tests.engine.helpers import make_problem


def _linear():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 3).double()


@pytest.mark.parametrize("case", ["functional-mlp", "linear-head"])
def test_row_loss_tangents_are_the_row_gradients_along_the_vector(case):
    problem = make_problem(num_samples=10) if case == "functional-mlp" else \
        make_problem(model=_linear(), num_samples=10, features=6, classes=3, momentum=0.0)
    assert type(problem.curvature).__name__ == ("FunctionalHeadCurvature" if case == "functional-mlp" else "LinearHeadCurvature")
    vector = torch.randn(problem.curvature.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        batch = problem.curvature.at_step(step)
        rows = torch.arange(len(batch.row_weight))
        torch.testing.assert_close(batch.row_loss_tangents(vector), batch.row_grads(rows) @ vector, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_model_row_loss_tangents_by_one_forward_mode_pass(kind, tmp_path):
    """The model backend's forward-mode tangents (ModelBatch.row_loss_tangents) equal its per-row gradients along v."""
    from hf_accinf import RunReader
    from hf_accinf.problem import problem_from_run
    from tests.conftest import record_run
    from tests.engine.test_deep_scope import tiny_model

    model, data = tiny_model(kind)
    record_run(model, data, tmp_path / "run", recording={"checkpoint_every": 1}, optim="sgd", learning_rate=0.5,
               per_device_train_batch_size=3, num_train_epochs=1)
    problem = problem_from_run(RunReader(tmp_path / "run"), modules=["all"], train_dataset=data)
    vector = torch.randn(problem.curvature.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    batch = problem.curvature.at_step(1)
    expected = batch.row_grads(torch.arange(len(batch.row_weight))) @ vector
    # Forward mode and reverse mode round differently through LayerNorm (as in test_model_backend): ~1e-10.
    torch.testing.assert_close(batch.row_loss_tangents(vector), expected, rtol=1e-9,
                               atol=1e-9 * float(expected.abs().max()))
