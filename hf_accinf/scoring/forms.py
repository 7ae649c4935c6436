"""The three forms of a score run (DESIGN.md sections 3 and 6b "Forms"), one type each, chosen by the plan.

* :class:`DirectForm`: a method that scores one objective itself (TracIn), from the objective's gradient at
  every step;
* :class:`AdjointForm`: one backward pass with the shared adjoint, every row's linear score at a cost
  independent of N, no embeddings; its trust figure rides on the same pass (random probes) by default;
* :class:`ForwardForm`: every row's embedding ``Delta^j_T`` by the engine (sweep or propagator), then the
  scores of the asked kind; its trust figure is the power iteration.

Each ``run`` returns a :class:`FormOutput` (scores, embeddings, trust figure, schedule). Under several processes
(docs/ENGINE.md "Many processes") every process works: the adjoint splits each step's rows, TracIn and DVEmb's step
factors split the steps, the forward form splits the samples and returns each process's own rows (``rows``; the
caller writes them as shards); the direct and adjoint forms return on the main process only (``None`` elsewhere).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from ..config import ScoreArguments
from ..engine import InfluenceResult, ShardContext, estimate_influence
from ..engine.adjoint import adjoint_scores
from ..engine.sharding import split_rows
from ..engine.sketch import reference_check_for
from ..engine.policies import CorrectionPolicy
from ..engine.resume import ResumeStore
from ..engine.trust import trust_check
from ..options import BACKWARD_PASS, DIRECT_SCORER, FormName
from ..problem import InfluenceProblem
from . import artifacts
from .objective import scores_from_embeddings


@dataclass
class FormInputs:
    """What every form reads: the method, the problem, the evaluation objective and how to run."""

    method: Any  # an UpdateRule, or a direct scorer (output "scores")
    problem: InfluenceProblem
    inputs: Any  # the evaluation rows, as the curvature takes them
    labels: torch.Tensor
    final: dict[str, torch.Tensor]  # theta_T of the scope
    args: ScoreArguments
    policy: CorrectionPolicy | None
    shard: ShardContext
    progress: bool
    resume: ResumeStore | None = None  # where long work saves its resume points (engine.resume)

    def objective_grad(self, parameters: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.problem.curvature.objective_grad(parameters, self.inputs, self.labels)


@dataclass
class FormOutput:
    scores: torch.Tensor
    result: InfluenceResult  # the schedule that ran, its seconds and cost model
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # as written to embeddings.safetensors
    trust: dict | None = None  # engine.trust.TrustReport.to_dict()
    rows: tuple[int, int] | None = None  # the sample rows [lo, hi) that scores and embeddings hold (None: all)


def _power_iteration(run: FormInputs, embeddings: torch.Tensor | None) -> dict | None:
    """The power iteration's trust figure (every process takes part: the probes' batch products are split by rows);
    ``embeddings``: this process's rows of the forward form (their norms are gathered for the embedding ratio)."""
    args, shard = run.args, run.shard
    if args.trust_probes <= 0 or args.partition > 0:  # the growth is the run's: the first partition measures it
        return None
    if args.num_partitions > 1:
        embeddings = None  # the embedding ratio needs every row
    if embeddings is not None and shard.world_size > 1:
        # the ratio reads each row's norm only: the (N,) norms are gathered, never the embeddings
        embeddings = shard.gather_rows(embeddings.norm(dim=1), run.problem.num_samples)[:, None]
    rule = getattr(run.method, "exact", run.method)  # a sketch's growth is its exact method's
    with split_rows(rule, shard, run.problem.trajectory):
        report = trust_check(rule, run.problem, embeddings, args.trust_probes, args.trust_iterations,
                             progress=run.progress and shard.is_main, shard=shard)
    return report.to_dict() if shard.is_main else None


def _share_work(run: FormInputs) -> None:
    """Let a method that splits its own work over the processes (DVEmb's step factors) know the group, and let it
    do that collective work now, where every process is (a process whose rows all come back from resume points, or
    that has none, would otherwise never reach it)."""
    if hasattr(run.method, "shard"):
        run.method.shard = run.shard
        if hasattr(run.method, "prepare"):
            run.method.prepare()


class DirectForm:
    name: ClassVar[FormName] = "direct"

    @staticmethod
    def run(run: FormInputs) -> FormOutput | None:
        curvature = run.problem.curvature
        began = time.perf_counter()
        steps = range(*run.shard.partition_range(run.problem.trajectory.num_steps))
        scores = run.method.scores(lambda step: run.objective_grad(curvature.parameters_at(step)),
                                   run.progress and run.shard.is_main, shard=run.shard, steps=steps)
        if not run.shard.is_main:
            return None
        return FormOutput(scores, InfluenceResult(None, DIRECT_SCORER, time.perf_counter() - began))


class AdjointForm:
    name: ClassVar[FormName] = "adjoint"

    @staticmethod
    def run(run: FormInputs) -> FormOutput | None:
        began = time.perf_counter()
        _share_work(run)
        gradient = run.method.embed_gradient(run.objective_grad(run.final))
        probes = run.args.trust_probes if run.args.trust != "power" else 0
        backward = adjoint_scores(run.method, run.problem, gradient, run.shard, run.progress, run.policy,
                                  probes=probes, resume=run.resume)
        power = _power_iteration(run, None) if run.args.trust == "power" else None
        if backward is None:
            return None
        result = InfluenceResult(None, BACKWARD_PASS, time.perf_counter() - began)
        trust = backward.trust.to_dict() if backward.trust is not None else None
        return FormOutput(backward.scores, result, trust=power if run.args.trust == "power" else trust)


class ForwardForm:
    name: ClassVar[FormName] = "forward"

    @staticmethod
    def run(run: FormInputs) -> FormOutput | None:
        method, problem, args = run.method, run.problem, run.args
        _share_work(run)
        result = estimate_influence(problem, method, run.policy, schedule=args.schedule,
                                    memory_budget_gb=args.memory_budget_gb, shard=run.shard, progress=run.progress,
                                    gather=False, resume=run.resume)
        curvature = problem.curvature
        scores = scores_from_embeddings(curvature, result.embeddings, run.final, run.inputs,
                                        run.labels, args.score_kind, rule=method)
        embeddings = {name: value.contiguous() for name, value in curvature.unflatten(result.embeddings).items()} \
            if method.parameter_space else {artifacts.PROJECTED_NAME: result.embeddings.contiguous()}
        return FormOutput(scores, result, embeddings, _power_iteration(run, result.embeddings), result.rows)


FORMS: dict[str, type] = {form.name: form for form in (DirectForm, AdjointForm, ForwardForm)}


def form_runner(name: FormName) -> Callable[[FormInputs], FormOutput | None]:
    """The ``run`` of the form the plan chose."""
    return FORMS[name].run


def with_reference_check(run: FormInputs, output: FormOutput | None) -> FormOutput | None:
    """``output`` (every row's scores, on the main process) with the reference check of projected methods
    (``trust.reference``, :func:`~hf_accinf.engine.sketch.reference_check_for`: the exact adjoint, on this process)."""
    check = output and reference_check_for(run.method, run.problem, run.args, lambda: run.objective_grad(run.final),
                                           output.scores, run.progress)
    if check:
        output.trust = {**(output.trust or {}), "reference": check}
    return output
