"""The sweep schedule (DESIGN.md section 6a): all per-sample states as one tensor, every step applied to all.

Forward (tangent) form: returns every sample's final state, ``Delta^j_T``. States that do not fit
the memory budget are processed in chunks of samples, each a full pass over the trajectory.
Also here: the per-sample adjoint form for one objective (DESIGN.md section 3), used to check the
forward forms.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..methods.base import UpdateRule
from .plan import OccurrencePlan
from .policies import CorrectionPolicy


def _chunk_occurrences(occurrences, lo: int, hi: int):
    """Occurrences restricted to local samples ``[lo, hi)``, renumbered from 0."""
    keep = (occurrences.samples >= lo) & (occurrences.samples < hi)
    if keep.all():
        return occurrences.samples - lo, occurrences.row_owner, occurrences.rows, occurrences.global_samples
    renumber = torch.cumsum(keep.long(), 0) - 1
    rows_kept = keep[occurrences.row_owner]
    return (occurrences.samples[keep] - lo, renumber[occurrences.row_owner[rows_kept]],
            occurrences.rows[rows_kept], occurrences.global_samples[keep])


def sweep(rule: UpdateRule, plan: OccurrencePlan, policy: CorrectionPolicy, epochs: torch.Tensor,
          dtype: torch.dtype, device, chunk_size: int | None = None, progress: bool = False) -> torch.Tensor:
    """Final states (shard size, S) by carrying every state through every step."""
    chunk_size = chunk_size or plan.size
    results = []
    for lo in range(0, plan.size, chunk_size):
        hi = min(plan.size, lo + chunk_size)
        states = torch.zeros(hi - lo, rule.state_dim, dtype=dtype, device=device)
        for step in tqdm(range(plan.num_steps), desc=f"sweep {lo}:{hi}", disable=not progress, leave=False):
            ops = rule.at_step(step)
            occurrences = plan.steps[step]
            samples, owner, rows, global_ids = (  # one chunk: no masks (data-dependent shapes sync a GPU)
                (occurrences.samples, occurrences.row_owner, occurrences.rows, occurrences.global_samples)
                if hi - lo == plan.size else _chunk_occurrences(occurrences, lo, hi))
            moved = ops.apply(states)
            if len(samples):
                c = policy.coefficients(global_ids, step, int(epochs[step]), dtype)
                moved[samples] = ops.occurrence(states[samples], owner, rows, c)
            states = moved
        results.append(states)
    return torch.cat(results) if results else torch.zeros(0, rule.state_dim, dtype=dtype, device=device)


def per_sample_adjoint_scores(rule: UpdateRule, plan: OccurrencePlan, policy: CorrectionPolicy, epochs: torch.Tensor,
                   objective_state: torch.Tensor) -> torch.Tensor:
    """Scores ``u_T . Delta^j_T`` by the per-sample adjoint recursion, backward from ``u_T``.

    ``x_{t+1} = A_{j,t} x_t + b_{j,t}``  gives  ``s_j = sum_t y_{t+1} . b_{j,t}`` with ``y_t = A_{j,t}^T y_{t+1}``.
    """
    dtype, device = objective_state.dtype, objective_state.device
    adjoints = objective_state.expand(plan.size, -1).clone()
    scores = torch.zeros(plan.size, dtype=dtype, device=device)
    for step in reversed(range(plan.num_steps)):
        ops = rule.at_step(step)
        occurrences = plan.steps[step]
        moved = ops.apply_adjoint(adjoints)
        if len(occurrences.samples):
            samples, owner, rows = occurrences.samples, occurrences.row_owner, occurrences.rows
            c = policy.coefficients(occurrences.global_samples, step, int(epochs[step]), dtype)
            injected = ops.occurrence(torch.zeros(len(samples), rule.state_dim, dtype=dtype, device=device), owner, rows, c)
            scores[samples] += (adjoints[samples] * injected).sum(-1)
            moved[samples] = ops.occurrence_linear_adjoint(adjoints[samples], owner, rows, c)
        adjoints = moved
    return scores
