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
