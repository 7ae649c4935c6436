"""Exact projected embeddings ``R Delta^j_T`` of a classical parameter-space rule (issue 22), ``k`` numbers per row.

``(R Delta^j_T)_i = r_i . Delta^j_T`` is the adjoint-form score of row ``j`` for the objective ``r_i`` (row ``i``
of the projection ``R``, :mod:`.projection`): one backward pass of the rule's adjoint with the ``k`` rows of ``R``
as ``k`` adjoint vectors at once gives every row's projected embedding **without any approximation of the
recursion** (Adam-IE's moments carried per step, the exact batch Hessian, exact removal), whatever ``N``.
A test objective enters by ``R g`` and its score is ``(R Delta^j) . (R g)``, unbiased for ``Delta^j . g``
(Johnson-Lindenstrauss, the only approximation left). DESIGN.md sections 3 ("Forward form and adjoint form":
``s_j = sum_t u_{t+1} . inj_{j,t}``) and 6b ("Forms"). Cost: per step one batch product ``M_t^T`` with ``k``
vectors (``k`` whole-model HVPs) and the batch rows' injections, against DVEmb's per-row gradients: exact and
``k``-fold the single-objective adjoint, where DVEmb (the empirical-Fisher, collapsed-moment recursion) is
cheap and, at deep scopes, measured far from the exact method (docs/FIDELITY.md, "DVEmb at deep scopes").
Classical methods only: ACC's per-row transitions have no shared adjoint.

The subspace decides the projection's error. Measured whole-model on a BERT that learnt (docs/FIDELITY.md,
"DVEmb at deep scopes"): a random Gaussian ``R`` agrees with the exact scores at Kendall tau 0.33 (k = 256) and
0.69 (k = 1024); the leading right singular vectors of the training rows' final gradients
(:class:`~.projection.BasisProjection`) at 0.92 (k = 64) and 0.996 (k = 256), and on a ViT at 0.79 and 0.974.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .plan import build_plan
from ..errors import AccInfError
from ..methods.base import UpdateRule
from ..methods.projection import GradientProjection


def sketched_embeddings(rule: UpdateRule, problem, projection: GradientProjection, chunk: int | None = None,
                        progress: bool = True) -> torch.Tensor:
    """``(N, k)``: ``R Delta^j_T`` for every training row ``j`` under the classical ``rule`` (a parameter-space
    rule: adam-ie, sgd-ie), the ``k`` adjoint vectors propagated ``chunk`` at a time (default: all)."""
    if not getattr(rule, "parameter_space", True) or getattr(rule, "accumulative", False):
        raise AccInfError("Sketched embeddings need a classical parameter-space method (adam-ie, sgd-ie).")
    if projection.input_dim != rule.param_dim:
        raise AccInfError(f"The projection maps {projection.input_dim} parameters; the scope has {rule.param_dim}.")
    matrix = projection.matrix()
    chunk = chunk or len(matrix)
    trajectory = problem.trajectory
    plan = build_plan(trajectory, 0, problem.num_samples, matrix.device)
    embeddings = torch.zeros(problem.num_samples, len(matrix), dtype=matrix.dtype, device=matrix.device)
    adjoints = [torch.stack([rule.final_objective_state(row) for row in matrix[start:start + chunk]])
                for start in range(0, len(matrix), chunk)]
    for step in tqdm(reversed(range(trajectory.num_steps)), total=trajectory.num_steps, desc="sketched adjoint",
                     disable=not progress, leave=False):
        ops = rule.at_step(step)
        occurrences = plan.steps[step]
        if len(occurrences.samples):
            count = len(occurrences.samples)
            zero = torch.zeros(count, rule.state_dim, dtype=matrix.dtype, device=matrix.device)
            injected = ops.occurrence(zero, occurrences.row_owner, occurrences.rows, zero[:, 0])
            embeddings.index_add_(0, occurrences.samples, torch.cat([injected @ adjoint.T for adjoint in adjoints], 1))
        adjoints = [ops.apply_adjoint(adjoint) for adjoint in adjoints]
    return embeddings
