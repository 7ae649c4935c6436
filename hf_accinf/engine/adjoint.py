"""The adjoint form (DESIGN.md sections 3 "Forward form and adjoint form" and 6b "Forms"): one objective,
one backward pass over the trajectory, every row's score at a cost independent of N.

For a classical estimator (``c_t = 0``) every row's state obeys ``Delta^j_{t+1} = M_t Delta^j_t + inj_{j,t}``
with the shared transition ``M_t``, so ``s_j = u_T . Delta^j_T = sum_{t: j in B_t} u_{t+1} . inj_{j,t}`` with
the one shared adjoint ``u_t = M_t^T u_{t+1}``, ``u_T = (grad L_val, 0, ...)`` on the full optimizer state.
The injection of an occurrence is the classical occurrence step of a zero state (exact or first-order
removal alike, repeated rows counted), so only the ``b`` rows of each step are touched: no ``N x S`` tensor.
Accumulative corrections make the transition per-row; they need the forward form (``choose_form`` refuses).
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from ..errors import AccInfError
from ..methods.base import UpdateRule
from ..problem import InfluenceProblem
from .plan import build_plan
from .sharding import ShardContext

logger = logging.getLogger(__name__)

FORMS = ("auto", "forward", "adjoint")


def choose_form(form: str, accumulative: bool, score_kind: str = "linear") -> tuple[str, str]:
    """The form to run and why: ``adjoint`` for a classical method scored linearly on one objective (its cost
    is one backward pass over the run whatever N), ``forward`` otherwise (it also gives test-agnostic
    embeddings). A forced ``adjoint`` that cannot compute the request is refused before any work."""
    if form not in FORMS:
        raise AccInfError(f"Unknown form '{form}': use auto, forward or adjoint.")
    if form == "adjoint":
        if accumulative:
            raise AccInfError(
                "The adjoint form computes classical estimators only (sgd-ie): the accumulative correction makes "
                "each row's transition its own. Use --form forward (or --form auto) for acc-sgd-ie."
            )
        if score_kind != "linear":
            raise AccInfError(
                f"The adjoint form gives linear scores only; score_kind '{score_kind}' needs the embeddings of "
                "--form forward."
            )
        return "adjoint", "forced by the caller"
    if form == "forward":
        return "forward", "forced by the caller"
    if accumulative:
        return "forward", "accumulative corrections make each row's transition its own (forward form)"
    if score_kind != "linear":
        return "forward", f"score_kind '{score_kind}' needs embeddings (forward form)"
    return "adjoint", ("classical method, one objective: one backward pass whatever N "
                       "(no embeddings written; --form forward gives them)")


def adjoint_scores(rule: UpdateRule, problem: InfluenceProblem, objective_gradient: torch.Tensor,
                   shard: ShardContext | None = None, progress: bool = True) -> torch.Tensor | None:
    """``s_j = u_T . Delta^j_T`` for every row ``j`` of a classical ``rule``, ``(N,)``, by one backward pass.

    ``objective_gradient`` ``(P,)`` is ``grad L_val(theta_T)`` in the rule's parameter layout. The shared
    adjoint is the same on every process, so sharding by rows would save nothing: the main process computes
    all rows and the others return ``None``.
    """
    shard = shard or ShardContext.single()
    if objective_gradient.shape != (rule.param_dim,):
        raise AccInfError(
            f"The objective gradient has shape {tuple(objective_gradient.shape)}; the rule's parameters have "
            f"{rule.param_dim} entries."
        )
    if not shard.is_main:
        return None
    trajectory = problem.trajectory
    dtype, device = objective_gradient.dtype, objective_gradient.device
    plan = build_plan(trajectory, 0, problem.num_samples, device)
    began = time.perf_counter()
    adjoint = rule.final_objective_state(objective_gradient)[None]  # (1, S)
    scores = torch.zeros(problem.num_samples, dtype=dtype, device=device)
    for step in tqdm(reversed(range(trajectory.num_steps)), total=trajectory.num_steps, desc="adjoint",
                     disable=not progress, leave=False):
        ops = rule.at_step(step)
        occurrences = plan.steps[step]
        if len(occurrences.samples):
            count = len(occurrences.samples)
            zero = torch.zeros(count, rule.state_dim, dtype=dtype, device=device)
            injected = ops.occurrence(zero, occurrences.row_owner, occurrences.rows,
                                      torch.zeros(count, dtype=dtype, device=device))
            scores.index_add_(0, occurrences.samples, injected @ adjoint[0])
        adjoint = ops.apply_adjoint(adjoint)
    logger.info("adjoint form: %d steps backward in %.2f s", trajectory.num_steps, time.perf_counter() - began)
    return scores
