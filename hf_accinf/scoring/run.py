"""Scoring a recorded run: influence embeddings and scores (DESIGN.md section 2), written next to the run.

Checks every input before the long work (arguments, output directory, run directory, finite
trajectory, training dataset identity, evaluation labels, method and optimizer), runs the engine on
this process's shard, and on the main process writes the artifact set of :mod:`.artifacts` at once and
returns the result. The score column of the training dataset is the caller's to add
(:func:`hf_accinf.data.columns.attach_scores`, :func:`~hf_accinf.data.columns.write_dataset_column`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ScoreArguments
from ..curvature.model import ModelCurvature
from ..inputs.collate import eval_collator
from ..inputs.evaluation import check_eval_labels
from ..engine import ShardContext
from .objective import check_score_kind
from ..methods.projection import projection_fingerprint
from ..methods.registry import build_method
from ..problem import deep_scope_unavailable, problem_from_run
from ..trajectory import RunReader
from ..trajectory.schema import content_hash
from . import artifacts
from .forms import FormInputs, form_runner
from .plan import plan_scoring

logger = logging.getLogger(__name__)

@dataclass
class ScoreResult:
    """What :func:`score_run` returns: the scores, the embeddings and what ``scores.json`` says about them."""

    scores: torch.Tensor
    embeddings: dict[str, torch.Tensor]
    output_dir: Path
    summary: artifacts.ScoreSummary

    def artifact(self) -> artifacts.ScoreArtifact:
        """The scores and their summary, as :func:`~.artifacts.load_score_artifact` reads them back."""
        return artifacts.ScoreArtifact(self.scores, self.summary, self.output_dir)

    method = property(lambda self: self.summary.method)  # the method that ran (method="auto" resolved)
    column = property(lambda self: self.summary.column)
    form = property(lambda self: self.summary.form)
    schedule = property(lambda self: self.summary.schedule)
    seconds = property(lambda self: self.summary.seconds)
    trust = property(lambda self: self.summary.trust)  # engine.trust.TrustReport.to_dict()
    verify = property(lambda self: self.summary.verify)  # agreement with K rows retrained out by replay
    lds = property(lambda self: self.summary.lds)  # LDS over subsets retrained out by replay (scoring.lds)
    replay = property(lambda self: self.summary.replay)  # trajectory.replay.ReplayReport.to_dict()
    gauge = property(lambda self: tuple(self.summary.gauge))  # gauge tensors left out of the scope


def score_run(args: ScoreArguments, train_dataset, eval_dataset, shard: ShardContext | None = None,
              collate_fn=None, progress: bool = True, model=None, tokenizer=None, states=None,
              evaluation_source: str | None = None) -> ScoreResult | None:
    """Estimate every training row's influence on the mean loss of ``eval_dataset``.

    ``model``: the model (or a factory, see :meth:`RunReader.build_model`) when the recorded class cannot
    be imported, e.g. one defined in the training script. ``tokenizer``: pads text evaluation batches as
    the Trainer would (``DataCollatorWithPadding``); ``collate_fn`` replaces the collator entirely.
    Under ``accelerate launch`` without a ``shard``, the processes form one group from the environment.
    A scope outside the recorded head (``args.modules``, e.g. ``last:1`` or ``all``) runs the whole model
    on each step's rows of ``train_dataset`` (collated by ``collate_fn``) at ``theta_t`` from ``states``
    (default: replay from the run's checkpoints) and evaluates the objective through the whole model.
    ``evaluation_source``: where ``eval_dataset`` came from, recorded in ``scores.json`` beside a hash of its rows.
    Writes the score files of :mod:`.artifacts` (not the dataset column: attach it with
    :func:`hf_accinf.data.columns.attach_scores` or write it with :func:`~hf_accinf.data.columns.write_dataset_column`).
    A rerun into the output of another run, or with other arguments (``artifacts.RERUN_ARGUMENTS``, the
    evaluation rows), is refused unless ``args.overwrite``.
    Returns the result on the main process (``None`` on the others).
    """
    own_shard = shard is None and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if own_shard:
        shard = ShardContext.from_accelerate(cpu=not torch.cuda.is_available())
    shard = shard or ShardContext.single()
    try:
        return _score(args, train_dataset, eval_dataset, shard, collate_fn, progress, model, tokenizer, states,
                      evaluation_source)
    finally:
        if own_shard:
            shard.close()


def _score(args, train_dataset, eval_dataset, shard, collate_fn, progress, model, tokenizer, states,
           evaluation_source=None) -> ScoreResult | None:
    output_dir = Path(args.output_dir or artifacts.default_output_dir(args.run_dir))
    artifacts.check_output_dir(output_dir, args.overwrite)
    run = RunReader(args.run_dir)
    run.check_dataset(train_dataset)
    if args.verify or args.verify_subsets:
        from .lds import check_sizes

        check_sizes(len(train_dataset), args.verify, args.verify_subsets, args.verify_fraction)
    run.trajectory().check_finite(clipped=run.manifest.training.max_grad_norm > 0)
    built = run.build_model(model=model)
    plan = plan_scoring(args, run, built, deep_scope_unavailable(run, "cpu", built))
    if shard.is_main:
        plan.log()
    args = plan.arguments(args)
    # The training rows of each step (deep scopes, --verify) are collated as the Trainer collated them:
    # padded per micro-batch (tokenized datasets.map output is not padded), unused columns dropped.
    train_collate = eval_collator(built, tokenizer, collate_fn)
    problem = problem_from_run(run, plan.dtype, modules=list(plan.modules) if plan.modules else None, model=built,
                               train_dataset=train_dataset, collate_fn=train_collate, states=states,
                               memory_budget=int(args.memory_budget_gb * 2**30), replay_tolerance=args.replay_tolerance)
    method = build_method(problem, plan.method, args)  # refuses a method/optimizer mismatch before the long work
    if method.output == "embeddings":
        check_score_kind(args.score_kind, method)

    curvature = problem.curvature
    inputs, labels = curvature.evaluation_inputs(built, run.manifest.head.module, eval_dataset, collate_fn, tokenizer)
    check_eval_labels(labels, run.manifest.loss.num_labels)
    final = problem.final_parameters()
    identity = _check_rerun(output_dir, args, run, eval_dataset, len(labels), evaluation_source)
    output = form_runner(plan.form)(FormInputs(method, problem, inputs, labels, final, args, plan.policy, shard,
                                               progress))
    if output is None:  # not the main process
        return None
    scores, embeddings, trust, result = output.scores, output.embeddings, output.trust, output.result
    checks = {"trust": trust, "verify": None, "replay": None, "projection": None, "plan": plan.to_dict(),
              "gauge": list(problem.gauge), "lds": None}
    if args.verify or args.verify_subsets:
        checks["verify"], checks["lds"], checks["query_scores"] = _check_by_replay(
            args, run, train_dataset, train_collate, eval_dataset, scores, plan.form, method, problem, inputs, labels,
            final, result, model, progress)
    states = getattr(curvature, "states", None)
    if hasattr(states, "report"):
        checks["replay"] = states.report().to_dict()
    if not getattr(method, "parameter_space", True):
        checks["projection"] = projection_fingerprint(method.projection)
    summary = _write(output_dir, args, identity, problem, result, scores, embeddings, plan.form, checks)
    return ScoreResult(scores, embeddings, output_dir, summary)


def _check_by_replay(args, run, train_dataset, train_collate, eval_dataset, scores, form, method, problem, inputs,
                     labels, final, result, model, progress):
    """``--verify`` and ``--verify_subsets`` (:func:`.lds.check_by_replay`): one batched retraining for both."""
    from . import lds, verify

    queries = lds.choose_queries(labels, args.verify_queries, args.verify_seed) if args.verify_subsets else None
    check = lds.check_by_replay(
        run, train_dataset, train_collate, eval_dataset, scores, verify=args.verify, subsets=args.verify_subsets,
        fractions=args.verify_fraction, seed=args.verify_seed, queries=queries,
        per_query=lambda chosen: lds.query_scores(form, method, problem, final, inputs, labels, chosen,
                                                  getattr(result, "embeddings", None), progress),
        eval_collate_fn=train_collate, memory_budget=int(args.memory_budget_gb * 2**30), progress=progress, model=model)
    if check[0] is not None:
        logger.info("verify: %s", verify.describe(check[0]))
    for line in lds.describe(check[1]) if check[1] is not None else []:
        logger.info("%s", line)
    return check


def _check_rerun(output_dir: Path, args: ScoreArguments, run: RunReader, eval_dataset, eval_rows: int,
                 evaluation_source: str | None) -> tuple[artifacts.RunIdentity, artifacts.EvaluationSet]:
    """The scored run and evaluation set, identified; a rerun into another run's or other arguments' output is
    refused here, before the long work."""
    manifest = run.manifest
    identity = artifacts.RunIdentity.of(args.run_dir, manifest)
    evaluation = artifacts.EvaluationSet(eval_rows, content_hash(eval_dataset), evaluation_source)
    artifacts.check_rerun(output_dir, artifacts.rerun_key(identity.manifest_sha256, args.to_dict(), evaluation),
                          args.overwrite)
    return identity, evaluation


def _write(output_dir: Path, args: ScoreArguments, identity: tuple[artifacts.RunIdentity, artifacts.EvaluationSet],
           problem, result, scores, embeddings, form: str, checks: dict) -> artifacts.ScoreSummary:
    scope = list(problem.scope.parameters) if problem.scope else list(embeddings)
    backend = "model" if isinstance(problem.curvature, ModelCurvature) else "head"
    metadata = {"method": args.method, "removal": args.removal, "form": form, "schedule": result.schedule,
                "run_dir": str(args.run_dir), "scope": json.dumps(scope), "backend": backend}
    writers = {artifacts.SCORES_NAME: lambda path: save_file({"scores": scores.contiguous()}, path, metadata=metadata)}
    if embeddings:  # the adjoint form and direct scorers have none
        writers[artifacts.EMBEDDINGS_NAME] = lambda path: save_file(embeddings, path, metadata=metadata)
    query_scores = checks.get("query_scores")
    if query_scores is not None:  # --verify_subsets: each query's (Q, N) scores, for prune --check
        queries = torch.tensor(checks["lds"]["queries"], dtype=torch.long)
        writers[artifacts.QUERY_SCORES_NAME] = lambda path: save_file(
            {"scores": query_scores.contiguous(), "queries": queries}, path, metadata=metadata)
    order = torch.argsort(scores)
    run, evaluation = identity
    summary = artifacts.ScoreSummary(
        run=run, method=args.method, column=artifacts.column_name(args.method), arguments=args.to_dict(),
        scope=scope, form=form, removal=args.removal, dtype=str(problem.curvature.dtype).removeprefix("torch."),
        modules=args.modules, backend=backend, schedule=result.schedule,
        evaluation=evaluation, trust=checks["trust"], verify=checks["verify"], lds=checks.get("lds"), replay=checks["replay"],
        projection=checks["projection"], gauge=list(checks.get("gauge") or []), plan=checks.get("plan"),
        seconds=result.seconds, cost_model=result.cost_model, most_harmful=order[:10].tolist(),
        most_helpful=order.flip(0)[:10].tolist())
    summary = artifacts.write_set(output_dir, writers, summary, args.overwrite)
    logger.info("wrote %s", output_dir)
    return summary
