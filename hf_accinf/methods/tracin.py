"""TracIn, checkpoint form (DESIGN.md section 5): the no-propagation baseline.

``s_j = sum over the occurrences of j (rows r, weights w_r) of w_r grad L_val(theta_t) . (eta_t * g_r(theta_t))``
with ``eta_t`` the recorded learning rate of each chosen parameter. It scores one objective directly
(``output == "scores"``): the scorer injects ``objective_at(step)``, the objective's gradient at the
parameters before ``step`` in the curvature's layout, so that methods never import the scorer.
Per step, all rows of the batch at once: the per-row loss tangents along ``eta_t grad L_val`` (one
forward-mode pass; no per-row gradients). Several processes take the steps round-robin and sum the scores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm

from ..problem import InfluenceProblem

if TYPE_CHECKING:
    from ..engine.sharding import ShardContext


class TracIn:
    output = "scores"
    accumulative = False

    def __init__(self, problem: InfluenceProblem):
        self.problem = problem

    def scores(self, objective_at: Callable[[int], torch.Tensor], progress: bool = False,
               shard: "ShardContext | None" = None, steps: range | None = None) -> torch.Tensor:
        """``(N,)`` TracIn scores of every training row (positive: removing the row raises the objective).
        ``steps``: the contributions of those steps only (a partition: the partitions' scores sum to the whole);
        ``shard``: several processes split them round-robin (:meth:`ShardContext.steps_of`); every process gets
        the sum."""
        from ..engine.sharding import ShardContext

        shard = shard or ShardContext.single()
        problem = self.problem
        trajectory, curvature = problem.trajectory, problem.curvature
        scores = torch.zeros(problem.num_samples, dtype=curvature.dtype, device=curvature.device)
        steps = range(trajectory.num_steps) if steps is None else steps
        steps = steps[shard.rank::shard.world_size]
        for step in tqdm(steps, desc="tracin", disable=not progress, leave=False):
            batch = curvature.at_step(step)
            direction = objective_at(step).to(scores.dtype) * problem.learning_rates(step)
            contribution = batch.row_weight * batch.row_loss_tangents(direction)
            scores.index_add_(0, trajectory.batch(step).to(scores.device), contribution)
        return shard.all_reduce_sum(scores)
