"""TracIn, checkpoint form (DESIGN.md section 5): the no-propagation baseline.

``s_j = sum over the occurrences of j (rows r, weights w_r) of w_r grad L_val(theta_t) . (eta_t * g_r(theta_t))``
with ``eta_t`` the recorded learning rate of each chosen parameter. It scores one objective directly
(``output == "scores"``): the scorer injects ``objective_at(step)``, the objective's gradient at the
parameters before ``step`` in the curvature's layout, so that methods never import the scorer.
Per step, all rows of the batch at once: one ``(b, P) @ (P,)`` product.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ..problem import InfluenceProblem


class TracIn:
    output = "scores"
    accumulative = False

    def __init__(self, problem: InfluenceProblem):
        self.problem = problem

    def scores(self, objective_at: Callable[[int], torch.Tensor], progress: bool = False) -> torch.Tensor:
        """``(N,)`` TracIn scores of every training row (positive: removing the row raises the objective)."""
        problem = self.problem
        trajectory, curvature = problem.trajectory, problem.curvature
        scores = torch.zeros(problem.num_samples, dtype=curvature.dtype, device=curvature.device)
        for step in tqdm(range(trajectory.num_steps), desc="tracin", disable=not progress, leave=False):
            batch = curvature.at_step(step)
            direction = objective_at(step).to(scores.dtype) * problem.learning_rates(step)
            rows = torch.arange(len(batch.row_weight), device=scores.device)
            contribution = batch.row_weight * (batch.row_grads(rows) @ direction)
            scores.index_add_(0, trajectory.batch(step).to(scores.device), contribution)
        return scores
