"""The adjoint form (DESIGN.md sections 3 "Forward form and adjoint form" and 6b "Forms"): one objective,
one backward pass over the trajectory, every row's score at a cost independent of N.

For a classical estimator (``c_t = 0``) every row's state obeys ``Delta^j_{t+1} = M_t Delta^j_t + inj_{j,t}``
with the shared transition ``M_t``, so ``s_j = u_T . Delta^j_T = sum_{t: j in B_t} u_{t+1} . inj_{j,t}`` with
the one shared adjoint ``u_t = M_t^T u_{t+1}``, ``u_T = (grad L_val, 0, ...)`` on the full optimizer state.
The injection of an occurrence is the classical occurrence step of a zero state (exact or first-order
removal alike, repeated rows counted), so only the ``b`` rows of each step are touched: no ``N x S`` tensor.
Each step reads ``u_{t+1} . inj_{j,t}`` from :meth:`StepOps.injection_scores` (no curvature product with
zero states; first-order removal by per-row loss tangents, no per-row gradients) and then applies ``M_t^T``
once, to the adjoint and the trust probes together (:class:`.trust.ProbeGrowth`).
Accumulative corrections make the transition per-row. When they are limited to steps before ``s``
(stage-limited ACC), DESIGN.md's hybrid applies: the forward form on ``[0, s)`` gives ``Delta^j_s`` and
``s_j = u_s . Delta^j_s + sum_{t >= s, j in B_t} u_{t+1} . inj_{j,t}``. ACC at every occurrence, or at random
ones, needs the forward form (``choose_form`` refuses the adjoint).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import AccInfError
from ..methods.base import UpdateRule
from ..options import FORM_CHOICES, check_choice
from ..problem import InfluenceProblem
from .plan import OccurrencePlan, build_plan, choose_schedule
from .policies import CorrectionPolicy
from .propagator import propagate
from .resume import ResumeStore, restore_adjoint, save_adjoint
from .sharding import ShardContext, split_rows
from .sweep import sweep
from .trust import EXPANSIVE_GROWTH, ProbeGrowth, TrustReport

logger = logging.getLogger(__name__)

def choose_form(form: str, accumulative: bool, score_kind: str = "linear",
                policy: CorrectionPolicy | None = None) -> tuple[str, str]:
    """The form to run and why: ``adjoint`` for a classical method scored linearly on one objective (its cost
    is one backward pass over the run whatever N), ``forward`` otherwise (it also gives test-agnostic
    embeddings). A forced ``adjoint`` runs stage-limited ACC as the hybrid; what it cannot compute is
    refused before any work."""
    check_choice("form", form, FORM_CHOICES, AccInfError)
    if form == "adjoint":
        if accumulative and (policy is None or policy.kind != "stage"):
            raise AccInfError(
                "The adjoint form computes classical estimators (sgd-ie, adam-ie, dvemb) and stage-limited ACC "
                "(correction=stage, as a hybrid); ACC at every or at random occurrences makes each row's transition "
                "its own. Use --form forward (or --form auto) for the acc- methods."
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


def corrected_prefix(policy: CorrectionPolicy | None, epochs: torch.Tensor) -> int:
    """``s``: no correction at steps ``>= s`` (0 for a classical policy). Refuses policies that correct anywhere."""
    if policy is None or policy.kind == "none":
        return 0
    if policy.kind != "stage":
        raise AccInfError(f"The adjoint form cannot run the '{policy.kind}' correction policy: use --form forward.")
    probe = torch.zeros(1, dtype=torch.int64)
    inside = [t for t, epoch in enumerate(epochs.tolist()) if bool(policy.coefficients(probe, t, epoch).any())]
    return inside[-1] + 1 if inside else 0


def _prefix_plan(plan: OccurrencePlan, stop: int) -> OccurrencePlan:
    windows = [(a, min(z, stop)) for a, z in plan.windows if a < stop]
    return OccurrencePlan(plan.start, plan.size, plan.steps[:stop], windows)


def _injection_scores(ops, adjoints: torch.Tensor, occurrences) -> torch.Tensor:
    """``(Q, m)``: what each occurring sample adds to the score of each of the ``Q`` adjoints; one call for the
    block where the step operators take one (``takes_adjoint_blocks``: exact removal), else one per adjoint."""
    arguments = (occurrences.row_owner, occurrences.rows, len(occurrences.samples))
    if len(adjoints) > 1 and getattr(ops, "takes_adjoint_blocks", False):
        return ops.injection_scores(adjoints, *arguments).mT
    return torch.stack([ops.injection_scores(adjoint, *arguments) for adjoint in adjoints])


@dataclass
class AdjointScores:
    """What one backward pass gives: every row's score and, with probes, the run's trust figure."""

    scores: torch.Tensor  # (N,), or (Q, N) for a block of Q objectives
    trust: TrustReport | None = None  # kind "adjoint-probes"; None without probes


def adjoint_scores(rule: UpdateRule, problem: InfluenceProblem, objective_gradient: torch.Tensor,
                   shard: ShardContext | None = None, progress: bool = True,
                   policy: CorrectionPolicy | None = None, probes: int = 0, probe_seed: int = 0,
                   threshold: float = EXPANSIVE_GROWTH, resume: ResumeStore | None = None) -> AdjointScores | None:
    """``s_j = u_T . Delta^j_T`` for every row ``j``, ``(N,)``, by one backward pass.

    ``objective_gradient`` ``(P,)`` is ``grad L_val(theta_T)`` in the rule's parameter layout; a block ``(Q, P)``
    of ``Q`` objectives (e.g. one evaluation row each, for per-query LDS) is carried backward together and
    gives ``(Q, N)`` scores. ``policy``:
    the correction coefficients (``None``: classical); a stage-limited policy runs the hybrid, whose forward
    part on the corrected prefix holds ``N x S`` states. ``probes > 0`` carries that many random probes with
    the adjoint (:class:`.trust.ProbeGrowth`, extra rows of each ``apply_adjoint``) and returns their trust
    figure; on a hybrid it covers the backward steps ``[s, T)``.

    Several processes (``shard``) split each step by rows, as DDP splits training (docs/ENGINE.md "Many
    processes"): each takes its block of the step's occurrences (:meth:`ShardContext.rows_of_step`), computes
    its rows' share of the batch gradient and of ``H_B v`` (summed over the processes by
    :class:`.sharding.RowShardBatch`, so every process holds the same adjoint) and its occurrences' injection
    scores; the hybrid's forward part is split by samples. The ``(N,)`` scores are summed at the end and
    returned on the main process (``None`` on the others). ``resume``: where the walk saves its resume points (:mod:`.resume`) and
    starts from the last one every process holds.
    """
    shard = shard or ShardContext.single()
    blocked = objective_gradient.dim() == 2
    gradients = objective_gradient if blocked else objective_gradient[None]
    if gradients.shape[1:] != (rule.param_dim,) or not len(gradients):
        raise AccInfError(
            f"The objective gradient has shape {tuple(objective_gradient.shape)}; the rule's parameters have "
            f"{rule.param_dim} entries."
        )
    trajectory = problem.trajectory
    dtype, device = objective_gradient.dtype, objective_gradient.device
    plan = build_plan(trajectory, 0, problem.num_samples, device)
    began = time.perf_counter()
    prefix = corrected_prefix(policy, trajectory.epoch)
    tracker = ProbeGrowth(rule, probes, trajectory.epoch.tolist(), probe_seed, dtype, device) if probes > 0 else None
    count = len(gradients)
    block = torch.stack([rule.final_objective_state(g) for g in gradients])  # (Q, S): the adjoints, then the probes
    if tracker is not None:
        block = torch.cat([block, tracker.states])
    scores = torch.zeros(count, problem.num_samples, dtype=dtype, device=device)
    own = [shard.own_occurrences(occurrences) for occurrences in plan.steps]  # before the loop: no syncs in it
    fresh = (block, scores, dict(vars(tracker)) if tracker is not None else None)
    start, block, scores = restore_adjoint(resume, trajectory.num_steps, block, scores, tracker, shard)
    if resume is not None and len(set(shard.all_gather_object(start))) > 1:
        # a process stopped between two others' saves: start over rather than mix two steps
        logger.info("adjoint: the processes' resume points differ; starting from the last step")
        start, (block, scores, saved) = trajectory.num_steps, fresh
        if tracker is not None:
            vars(tracker).update(saved)
    with split_rows(rule, shard, trajectory):
        for step in tqdm(reversed(range(prefix, start)), total=start - prefix,
                         desc="adjoint", disable=not (progress and shard.is_main), leave=False):
            ops = rule.at_step(step)
            occurrences = own[step]
            if len(occurrences.samples):
                scores.index_add_(1, occurrences.samples, _injection_scores(ops, block[:count], occurrences))
            block = ops.apply_adjoint(block)
            if tracker is not None:
                block = torch.cat([block[:count], tracker.carried(step, block[count:])])
            if resume is not None and step > prefix and resume.due(trajectory.num_steps - step, step):
                save_adjoint(resume, step, block, scores, tracker, shard)
    adjoints = block[:count]
    if prefix:
        start, stop = shard.sample_range(problem.num_samples)
        head = _prefix_plan(build_plan(trajectory, start, stop, device), prefix)
        mean_batch = float(trajectory.row_offsets[prefix]) / prefix
        schedule, costs = choose_schedule(head, stop - start, rule.state_dim, mean_batch)
        logger.info("hybrid: forward form (%s) on the corrected steps [0, %d), %s", schedule, prefix, costs)
        run = sweep if schedule == "sweep" else propagate
        states = run(rule, head, policy, trajectory.epoch, dtype, device, progress=progress and shard.is_main)
        scores[:, start:stop] += adjoints @ states.T
    scores = shard.all_reduce_sum(scores)
    logger.info("adjoint form: %d steps backward in %.2f s", trajectory.num_steps, time.perf_counter() - began)
    if not shard.is_main:
        return None
    trust = None
    if tracker is not None:
        start = gradients.norm(dim=1)
        growth = rule.parameter_part(adjoints).norm(dim=1) / start
        objective_growth = float(growth[start > 0].max()) if bool((start > 0).any()) else None
        trust = tracker.report(objective_growth, threshold)
    return AdjointScores(scores if blocked else scores[0], trust)
