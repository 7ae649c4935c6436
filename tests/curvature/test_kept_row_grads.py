"""Exact removal keeps every row's gradient of a step and takes the batch gradient as their weighted sum
(``BatchCurvature.keep_row_grads``): the same batch gradient and row gradients as computing them apart."""

import pytest
import torch

from tests.curvature.test_model_rows import CASES, curvature


@pytest.mark.parametrize("kind", sorted(CASES))
def test_kept_row_gradients_give_the_batch_gradient_and_the_same_rows(kind):
    model, step = CASES[kind]()
    backend = curvature(model, step, ["all"])
    apart, kept = backend.at_step(0), backend.at_step(0)
    kept.keep_row_grads()
    assert "batch_grad" in kept.__dict__  # taken from the kept rows, before any backward pass of its own
    torch.testing.assert_close(kept.batch_grad, apart.batch_grad, rtol=1e-10, atol=1e-14)
    rows = torch.tensor([5, 0, 3])
    torch.testing.assert_close(kept.row_grads(rows), apart.row_grads(rows), rtol=1e-12, atol=1e-15)
