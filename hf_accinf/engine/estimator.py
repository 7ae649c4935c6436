"""The estimator entry point: one engine, a method rule plugged in, the schedule chosen by the cost model.

``estimate_influence`` computes every sample's influence embedding ``Delta^j_T`` (the parameter
block of its final state) on this process's shard of samples (:meth:`ShardContext.sample_range`: rank ``r`` of
this job's partition of the rows); the shards are gathered only when asked (the scoring forms keep them: each
process writes its own rows). Rows beyond the memory budget run in chunks, each saved as a resume point when a
:class:`.resume.ResumeStore` is given.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from ..errors import AccInfError
from ..methods.base import UpdateRule
from ..options import SCHEDULE_CHOICES, ScheduleChoice, ScheduleRun, check_choice
from ..problem import InfluenceProblem
from .plan import build_plan, choose_schedule
from .policies import CorrectionPolicy, check_policy
from .propagator import propagate
from .resume import ResumeStore, chunk_name
from .sharding import ShardContext
from .sweep import sweep

logger = logging.getLogger(__name__)


@dataclass
class InfluenceResult:
    embeddings: torch.Tensor  # (N, P) Delta^j_T of this job's partition gathered on every process, or this process's rows (gather=False)
    schedule: ScheduleRun
    seconds: float
    cost_model: dict = field(default_factory=dict)
    rows: tuple[int, int] | None = None  # the sample rows [start, stop) that ``embeddings`` holds


def estimate_influence(problem: InfluenceProblem, rule: UpdateRule, policy: CorrectionPolicy | None = None,
                       schedule: ScheduleChoice = "auto", memory_budget_gb: float = 4.0,
                       shard: ShardContext | None = None, progress: bool = True,
                       gather: bool = True, resume: ResumeStore | None = None) -> InfluenceResult:
    """Every sample's embedding under ``rule`` (built by ``methods.registry.build_method``).

    ``policy``: where the accumulative correction applies, decided by the caller (``scoring.plan``); ``None``
    for a classical rule. An accumulative rule without a policy, or a classical one with a correcting policy,
    is refused. ``gather=False``: each process keeps its own rows (no collective). ``resume``: each finished chunk
    of rows is saved there, and a chunk saved before is read back."""
    check_policy(rule, policy)
    policy = policy or CorrectionPolicy("none")
    shard = shard or ShardContext.single()
    start, stop = shard.sample_range(problem.num_samples)
    dtype, device = problem.curvature.dtype, problem.curvature.device
    trajectory = problem.trajectory
    plan = build_plan(trajectory, start, stop, device)
    mean_batch = float(trajectory.row_offsets[-1]) / max(trajectory.num_steps, 1)
    choice, costs = choose_schedule(plan, stop - start, rule.state_dim, mean_batch)
    # The propagator holds about three S x S matrices (F, G, identity): refused above the memory budget.
    propagator_gb = 3 * rule.state_dim**2 * torch.finfo(dtype).bits / 8 / 2**30
    if propagator_gb > memory_budget_gb:
        if schedule == "propagator":
            raise AccInfError(
                f"The propagator needs {propagator_gb:.1f} GiB for its S x S matrices (S = {rule.state_dim}), more "
                f"than --memory_budget_gb {memory_budget_gb}: use --schedule sweep (or auto), or a smaller scope."
            )
        choice, costs["propagator_memory_gb"] = "sweep", round(propagator_gb, 2)
    if schedule == "auto":
        schedule = choice
    else:
        check_choice("schedule", schedule, SCHEDULE_CHOICES, AccInfError)
    logger.info("schedule %s (cost model prefers %s: %s)", schedule, choice, costs)
    if problem.optimizer.max_grad_norm > 0 and bool((trajectory.clip_coef < 1).any()):
        logger.info("clipped steps: the clip direction uses the chosen parameters' gradient, the rest of the "
                    "recorded norm held fixed (DESIGN.md section 4)")
    bytes_per_state = rule.state_dim * torch.finfo(dtype).bits // 8
    chunk = max(1, int(memory_budget_gb * 2**30 / (3 * bytes_per_state)))
    if chunk < plan.size:
        logger.info("per-sample states exceed %.1f GiB: %d chunks of %d samples, one pass each",
                    memory_budget_gb, -(-plan.size // chunk), chunk)
    began = time.perf_counter()
    show = progress and shard.is_main
    run = sweep if schedule == "sweep" else propagate
    resume = resume if chunk < plan.size and resume is not None and resume.every >= 0 else None  # one chunk: the result
    parts = []
    for lo in range(start, stop, chunk):
        hi = min(stop, lo + chunk)
        saved = resume.load(chunk_name(lo, hi), device) if resume is not None else None
        if saved is not None:
            logger.info("rows %d:%d read from their resume point", lo, hi)
            parts.append(saved[0]["embeddings"].to(dtype))
            continue
        chunk_plan = plan if (lo, hi) == (start, stop) else build_plan(trajectory, lo, hi, device)
        parts.append(rule.parameter_part(run(rule, chunk_plan, policy, trajectory.epoch, dtype, device, progress=show)))
        if resume is not None:
            resume.save(chunk_name(lo, hi), {"embeddings": parts[-1]})
    embeddings = (torch.cat(parts) if parts else torch.zeros(0, rule.param_dim, dtype=dtype, device=device)).contiguous()
    if not gather:
        return InfluenceResult(embeddings, schedule, time.perf_counter() - began, costs, (start, stop))
    lo, hi = shard.partition_range(problem.num_samples)
    embeddings = shard.gather_rows(embeddings, hi - lo)
    return InfluenceResult(embeddings, schedule, time.perf_counter() - began, costs, (lo, hi))
