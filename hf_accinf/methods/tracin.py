"""TracIn, checkpoint form (DESIGN.md section 5): the no-propagation baseline.

``s_j = sum over the occurrences of j (rows r, weights w_r) of w_r grad L_val(theta_t) . (eta_t * g_r(theta_t))``
with ``eta_t`` the recorded learning rate of each chosen parameter. It scores one objective directly
(``output == "scores"``): the scorer injects ``objective_at(step)``, the objective's gradient at the
parameters before ``step`` in the curvature's layout, so that methods never import the scorer.
Per step, all rows of the batch at once: the per-row loss tangents along ``eta_t grad L_val`` (one
forward-mode pass; no per-row gradients).
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

    def scores(self, objective_at: Callable[[int], torch.Tensor], progress: bool = False,
               steps: range | None = None) -> torch.Tensor:
        """``(N,)`` TracIn scores of every training row (positive: removing the row raises the objective); with
        ``steps``, the contributions of those steps only (a partition: the partitions' scores sum to the whole)."""
        problem = self.problem
        trajectory, curvature = problem.trajectory, problem.curvature
        scores = torch.zeros(problem.num_samples, dtype=curvature.dtype, device=curvature.device)
        steps = range(trajectory.num_steps) if steps is None else steps
        for step in tqdm(steps, desc="tracin", disable=not progress, leave=False):
            batch = curvature.at_step(step)
            direction = objective_at(step).to(scores.dtype) * problem.learning_rates(step)
            contribution = batch.row_weight * batch.row_loss_tangents(direction)
            scores.index_add_(0, trajectory.batch(step).to(scores.device), contribution)
        return scores
