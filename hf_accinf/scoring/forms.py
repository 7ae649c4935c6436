"""The three forms of a score run (DESIGN.md sections 3 and 6b "Forms"), one type each, chosen by the plan.

* :class:`DirectForm`: a method that scores one objective itself (TracIn), from the objective's gradient at
  every step;
* :class:`AdjointForm`: one backward pass with the shared adjoint, every row's linear score at a cost
  independent of N, no embeddings; its trust figure rides on the same pass (random probes) by default;
* :class:`ForwardForm`: every row's embedding ``Delta^j_T`` by the engine (sweep or propagator), then the
  scores of the asked kind; its trust figure is the power iteration.

Each ``run`` returns a :class:`FormOutput` (scores, embeddings, trust figure, schedule); only the main process
gets one (``None`` elsewhere).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from ..config import ScoreArguments
from ..engine import InfluenceResult, ShardContext, estimate_influence
from ..engine.adjoint import adjoint_scores
from ..engine.sketch import reference_check_for
from ..engine.policies import CorrectionPolicy
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

    def objective_grad(self, parameters: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.problem.curvature.objective_grad(parameters, self.inputs, self.labels)


@dataclass
class FormOutput:
    scores: torch.Tensor
    result: InfluenceResult  # the schedule that ran, its seconds and cost model
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # as written to embeddings.safetensors
    trust: dict | None = None  # engine.trust.TrustReport.to_dict()


def _power_iteration(run: FormInputs, embeddings: torch.Tensor | None) -> dict | None:
    args = run.args
    if args.trust_probes <= 0:
        return None
    rule = getattr(run.method, "exact", run.method)  # a sketch's growth is its exact method's
    return trust_check(rule, run.problem, embeddings, args.trust_probes, args.trust_iterations,
                       progress=run.progress).to_dict()


class DirectForm:
    name: ClassVar[FormName] = "direct"

    @staticmethod
    def run(run: FormInputs) -> FormOutput | None:
        curvature = run.problem.curvature
        began = time.perf_counter()
        scores = run.method.scores(lambda step: run.objective_grad(curvature.parameters_at(step)),
                                   run.progress and run.shard.is_main)
        if not run.shard.is_main:
            return None
        return FormOutput(scores, InfluenceResult(None, DIRECT_SCORER, time.perf_counter() - began))


class AdjointForm:
    name: ClassVar[FormName] = "adjoint"

    @staticmethod
    def run(run: FormInputs) -> FormOutput | None:
        began = time.perf_counter()
        gradient = run.method.embed_gradient(run.objective_grad(run.final))
        probes = run.args.trust_probes if run.args.trust != "power" else 0
        backward = adjoint_scores(run.method, run.problem, gradient, run.shard, run.progress, run.policy,
                                  probes=probes)
        if backward is None:
            return None
        result = InfluenceResult(None, BACKWARD_PASS, time.perf_counter() - began)
        trust = backward.trust.to_dict() if backward.trust is not None else None
        if run.args.trust == "power":
            trust = _power_iteration(run, None)
        return FormOutput(backward.scores, result, trust=trust)


class ForwardForm:
    name: ClassVar[FormName] = "forward"

    @staticmethod
    def run(run: FormInputs) -> FormOutput | None:
        method, problem, args = run.method, run.problem, run.args
        result = estimate_influence(problem, method, run.policy, schedule=args.schedule,
                                    memory_budget_gb=args.memory_budget_gb, shard=run.shard, progress=run.progress)
        if not run.shard.is_main:
            return None
        curvature = problem.curvature
        scores = scores_from_embeddings(curvature, result.embeddings, run.final, run.inputs,
                                        run.labels, args.score_kind, rule=method)
        embeddings = {name: value.contiguous() for name, value in curvature.unflatten(result.embeddings).items()} \
            if method.parameter_space else {artifacts.PROJECTED_NAME: result.embeddings.contiguous()}
        return FormOutput(scores, result, embeddings, _power_iteration(run, result.embeddings))


FORMS: dict[str, type] = {form.name: form for form in (DirectForm, AdjointForm, ForwardForm)}


def form_runner(name: FormName) -> Callable[[FormInputs], FormOutput | None]:
    """The ``run`` of the form the plan chose, then the reference check of projected methods (trust.reference)."""
    return lambda run: _with_reference_check(run, FORMS[name].run(run))


def _with_reference_check(run: FormInputs, output: FormOutput | None) -> FormOutput | None:
    check = output and reference_check_for(run.method, run.problem, run.args, lambda: run.objective_grad(run.final),
                                           output.scores, run.progress)
    if check:
        output.trust = {**(output.trust or {}), "reference": check}
    return output
