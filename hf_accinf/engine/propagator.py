"""The propagator schedule (DESIGN.md section 6a): the same recursion at a cost linear in N.

Per window ``[a, z)`` (each sample at most once), with boundary states ``w_j`` (one (n, S) tensor):

1. forward: ``F_t = M_{t-1} ... M_a`` as S row-vectors (``Fr = F_t^T``, ``Fr <- M_t Fr`` row-wise);
   at an occurrence, ``d_j = F_t w_j`` (``w_j^T Fr``) takes the method's occurrence step, and the
   result ``v_j`` replaces ``w_j``; samples absent from the window get ``w_j <- F_z w_j`` at its end;
2. backward: the rows of ``G_t = M_{z-1} ... M_{t+1}`` (``G <- G M_t`` is the adjoint applied
   row-wise); at an occurrence, ``w_j <- G_t v_j``.

Each step's operators are built once in the forward pass and reused backward. Only the ``b`` rows
of a step are touched per step; the ``S x S`` products are shared by all samples of the shard.

Windows without any correction (SGD-IE, the classical part of stage-limited or sparse randomized
ACC) skip the forward pass: there an occurrence is ``M_t d + iota_j`` (the method's classical twin),
so ``w_j <- F_z w_j + G_t iota_j``, and the backward pass alone yields ``F_z = G_{a-1}``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..methods.base import UpdateRule
from .plan import OccurrencePlan
from .policies import CorrectionPolicy


def propagate(rule: UpdateRule, plan: OccurrencePlan, policy: CorrectionPolicy, epochs: torch.Tensor,
              dtype: torch.dtype, device, boundary_chunk: int = 65536, progress: bool = False) -> torch.Tensor:
    """Final states (shard size, S), equal to :func:`~.sweep.sweep` up to round-off."""
    size = rule.state_dim
    states = torch.zeros(plan.size, size, dtype=dtype, device=device)
    identity = torch.eye(size, dtype=dtype, device=device)
    bar = tqdm(total=2 * plan.num_steps, desc="propagator", disable=not progress, leave=False)
    for start, stop in plan.windows:
        coefficients = {
            step: policy.coefficients(plan.steps[step].global_samples, step, int(epochs[step]), dtype)
            for step in range(start, stop)
            if len(plan.steps[step].samples)
        }
        if not any(policy.may_correct(step, int(epochs[step])) for step in coefficients):
            _classical_window(rule, plan, states, start, stop, coefficients, identity, boundary_chunk)
            bar.update(stop - start)
            continue
        forward = identity.clone()
        occurred = torch.zeros(plan.size, dtype=torch.bool)  # on the host: which rows the window touched
        operators = []
        for step in range(start, stop):
            ops = rule.at_step(step)
            operators.append(ops)
            occurrences = plan.steps[step]
            if len(occurrences.samples):
                samples = occurrences.samples
                states[samples] = ops.occurrence(states[samples] @ forward, occurrences.row_owner, occurrences.rows,
                                                 coefficients[step])
                occurred[occurrences.host_samples if occurrences.host_samples is not None else samples.cpu()] = True
            forward = ops.apply(forward)
            bar.update()
        absent = (~occurred).nonzero().flatten().to(device, non_blocking=True)
        for lo in range(0, len(absent), boundary_chunk):
            chunk = absent[lo : lo + boundary_chunk]
            states[chunk] = states[chunk] @ forward
        backward = identity.clone()
        for step in reversed(range(start, stop)):
            samples = plan.steps[step].samples
            if len(samples):
                states[samples] = states[samples] @ backward.T
            if step > start:
                backward = operators[step - start].apply_adjoint(backward)
            bar.update()
    bar.close()
    return states


def _classical_window(rule: UpdateRule, plan: OccurrencePlan, states: torch.Tensor, start: int, stop: int,
                      coefficients: dict, identity: torch.Tensor, boundary_chunk: int) -> None:
    """One backward pass: ``w_j <- F_z w_j + G_t iota_j`` for every sample, in place."""
    backward = identity.clone()
    injected = torch.zeros_like(states)
    for step in reversed(range(start, stop)):
        ops = rule.at_step(step)
        occurrences = plan.steps[step]
        if len(occurrences.samples):
            zero = torch.zeros(len(occurrences.samples), rule.state_dim, dtype=states.dtype, device=states.device)
            iota = ops.occurrence(zero, occurrences.row_owner, occurrences.rows, coefficients[step])
            injected[occurrences.samples] = iota @ backward.T
        backward = ops.apply_adjoint(backward)
    for lo in range(0, len(states), boundary_chunk):
        states[lo : lo + boundary_chunk] = states[lo : lo + boundary_chunk] @ backward.T + injected[lo : lo + boundary_chunk]
