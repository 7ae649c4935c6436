"""Scoring a recorded run: influence embeddings and scores (DESIGN.md section 2), written next to the run.

Checks every input before the long work (arguments, output directory, run directory, finite
trajectory, training dataset identity, evaluation labels, method and optimizer), runs the engine on
this process's shard, and on the main process writes the artifact set of :mod:`.artifacts` at once and
returns the result. The score column of the training dataset is the caller's to add
(:func:`hf_accinf.data.columns.attach_scores`, :func:`~hf_accinf.data.columns.write_dataset_column`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ScoreArguments
from ..curvature.model import ModelCurvature
from ..devices import recorded_precision, scorer_precision
from ..inputs.collate import eval_collator
from ..inputs.evaluation import check_eval_labels
from ..engine import ShardContext
from ..engine.resume import RESUME_DIR
from .objective import check_score_kind
from ..methods.projection import projection_fingerprint
from ..methods.registry import build_method
from ..problem import deep_scope_unavailable, problem_from_run
from ..trajectory import RunReader
from ..trajectory.schema import content_hash
from . import artifacts, partitions
from .forms import FormInputs, FormOutput, form_runner, with_reference_check
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
    ``args.num_partitions > 1``: this job scores partition ``args.partition`` only and writes its shard
    (:mod:`.partitions`; ``hf-accinf aggregate`` combines them); a partition already written is skipped.
    Long work saves resume points under ``<output_dir>/.resume`` (removed after success).
    Returns the result on the main process (``None`` on the others, and for a partition already written).
    """
    own_shard = shard is None and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if own_shard:
        shard = ShardContext.from_accelerate(cpu=args.device == "cpu" or not torch.cuda.is_available())
    shard = shard or ShardContext.single()
    try:
        with shard.guard():  # an error here stops every process (PeerFailure names this one), not a hang
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
    plan = plan_scoring(args, run, built, lambda device: deep_scope_unavailable(run, device, built),
                        process_device=getattr(shard.state, "device", None))
    if shard.is_main:
        plan.log()
    args = plan.arguments(args)
    partitions.check_partitioned(args, plan.form)
    shard = dataclasses.replace(shard, partition=(args.partition, args.num_partitions))
    key = partitions.partition_key(artifacts.manifest_sha256(args.run_dir), args.to_dict(), content_hash(eval_dataset))
    if partitions.already_written(output_dir, args, key):
        return None
    # The training rows of each step (deep scopes, --verify) are collated as the Trainer collated them:
    # padded per micro-batch (tokenized datasets.map output is not padded), unused columns dropped.
    train_collate = eval_collator(built, tokenizer, collate_fn)
    problem = problem_from_run(run, plan.dtype, plan.device, modules=list(plan.modules) if plan.modules else None,
                               model=built, train_dataset=train_dataset, collate_fn=train_collate, states=states,
                               memory_budget=plan.memory_budget, replay_tolerance=args.replay_tolerance)
    method = build_method(problem, plan.method, args)  # refuses a method/optimizer mismatch before the long work
    if method.output == "embeddings":
        check_score_kind(args.score_kind, method)

    curvature = problem.curvature
    inputs, labels = curvature.evaluation_inputs(built, run.manifest.head.module, eval_dataset, collate_fn, tokenizer)
    check_eval_labels(labels, run.manifest.loss.num_labels)
    final = problem.final_parameters()
    identity = _check_rerun(output_dir, args, run, eval_dataset, len(labels), evaluation_source)
    resume = partitions.resume_store(output_dir, args, key, run.manifest.checkpoints)
    form_inputs = FormInputs(method, problem, inputs, labels, final, args, plan.policy, shard, progress, resume)
    with scorer_precision(plan.device, plan.dtype, plan.tf32):
        output = form_runner(plan.form)(form_inputs)
        own_embeddings = output.result.embeddings if output is not None else None  # forward form: this process's rows
        output = _own_rows_written(output, shard, output_dir, problem.num_samples)
        if args.num_partitions == 1:  # a projected method's scores against the exact adjoint's (every row needed)
            output = with_reference_check(form_inputs, output)
    checks = {"verify": None, "lds": None, "query_scores": None}
    if args.verify or args.verify_subsets:
        with recorded_precision(run.manifest.numerics):  # retraining replays the run: its own TF32 flags
            checks["verify"], checks["lds"], checks["query_scores"] = _check_by_replay(
                args, run, train_dataset, train_collate, eval_dataset, output.scores if output is not None else None,
                plan, method, problem, inputs, labels, final, own_embeddings, model, progress, shard)
    if output is None:  # not the main process
        return None
    # Results leave the device here: the writers, --verify's statistics and the dataset column read them on the host.
    scores, trust, result = output.scores.cpu(), output.trust, output.result
    embeddings = {name: value.cpu() for name, value in output.embeddings.items()}
    checks.update(trust=trust, replay=None, projection=None, plan=plan.to_dict(), gauge=list(problem.gauge))
    states = getattr(curvature, "states", None)
    if hasattr(states, "report"):
        checks["replay"] = states.report().to_dict()
    if not getattr(method, "parameter_space", True):
        checks["projection"] = projection_fingerprint(method.projection)
    summary, metadata = _summarize(args, identity, problem, result, scores, embeddings, plan.form, checks)
    if args.num_partitions > 1:
        summary = partitions.write_partition(output_dir, args, key, output.rows, problem.num_samples, scores,
                                             embeddings, summary, metadata)
    else:
        summary = _write(output_dir, args, summary, metadata, scores, embeddings, checks)
    resume.clear()
    return ScoreResult(scores, embeddings, output_dir, summary)


def _own_rows_written(output: FormOutput | None, shard: ShardContext, output_dir: Path,
                      num_samples: int) -> FormOutput | None:
    """A form that returned this process's rows only (the forward form under several processes): each process
    writes its rows as one shard into ``<output_dir>/.resume/processes-<partition>`` (:func:`.artifacts.write_scores_shard`),
    and the main process reads them back in row order (:func:`.artifacts.aggregate`): the rows of this job's
    partition, ``[lo, hi)``, then written as the set or as the partition's shard. Other outputs pass through; the main
    process gets the whole output, the others ``None``."""
    if output is None or output.rows is None or shard.world_size == 1:
        return output if output is None or shard.is_main else None
    start, stop = output.rows
    lo, hi = shard.partition_range(num_samples)
    index, count = shard.partition
    folder = output_dir / RESUME_DIR / f"processes-{index:05d}-of-{count:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    shard.barrier()  # every process has checked the output directory before any writes into it
    artifacts.write_scores_shard(folder, shard.rank, shard.world_size, torch.arange(start, stop) - lo,
                                 output.scores, output.embeddings)
    shard.barrier()
    if not shard.is_main:
        return None
    scores, embeddings = artifacts.aggregate(folder, shard.world_size, hi - lo)
    shutil.rmtree(folder, ignore_errors=True)
    dtype = output.scores.dtype
    return dataclasses.replace(output, scores=scores.to(dtype), embeddings=embeddings, rows=(lo, hi))


def _check_by_replay(args, run, train_dataset, train_collate, eval_dataset, scores, plan, method, problem, inputs,
                     labels, final, own_embeddings, model, progress, shard):
    """``--verify`` and ``--verify_subsets`` (:func:`.lds.check_by_replay`): one batched retraining for both, on the
    plan's device, its counterfactuals (and the per-query scores) split over the processes."""
    from . import lds, verify

    queries = lds.choose_queries(labels, args.verify_queries, args.verify_seed) if args.verify_subsets else None
    check = lds.check_by_replay(
        run, train_dataset, train_collate, eval_dataset, scores, verify=args.verify, subsets=args.verify_subsets,
        fractions=args.verify_fraction, seed=args.verify_seed, queries=queries,
        per_query=lambda chosen: lds.query_scores(plan.form, method, problem, final, inputs, labels, chosen,
                                                  own_embeddings, progress, shard=shard, policy=plan.policy),
        eval_collate_fn=train_collate, device=plan.device, memory_budget=plan.memory_budget, progress=progress,
        model=model, shard=shard)
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


def _summarize(args: ScoreArguments, identity: tuple[artifacts.RunIdentity, artifacts.EvaluationSet],
               problem, result, scores, embeddings, form: str, checks: dict) -> tuple[artifacts.ScoreSummary, dict]:
    """``scores.json``'s summary and the tensor files' metadata."""
    scope = list(problem.scope.parameters) if problem.scope else list(embeddings)
    backend = "model" if isinstance(problem.curvature, ModelCurvature) else "head"
    metadata = {"method": args.method, "removal": args.removal, "form": form, "schedule": result.schedule,
                "run_dir": str(args.run_dir), "scope": json.dumps(scope), "backend": backend}
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
    return summary, metadata


def _write(output_dir: Path, args: ScoreArguments, summary: artifacts.ScoreSummary, metadata: dict, scores,
           embeddings, checks: dict) -> artifacts.ScoreSummary:
    writers = {artifacts.SCORES_NAME: lambda path: save_file({"scores": scores.contiguous()}, path, metadata=metadata)}
    if embeddings:  # the adjoint form and direct scorers have none
        writers[artifacts.EMBEDDINGS_NAME] = lambda path: save_file(embeddings, path, metadata=metadata)
    query_scores = checks.get("query_scores")
    if query_scores is not None:  # --verify_subsets: each query's (Q, N) scores, for prune --check
        queries = torch.tensor(checks["lds"]["queries"], dtype=torch.long)
        writers[artifacts.QUERY_SCORES_NAME] = lambda path: save_file(
            {"scores": query_scores.contiguous(), "queries": queries}, path, metadata=metadata)
    summary = artifacts.write_set(output_dir, writers, summary, args.overwrite)
    logger.info("wrote %s", output_dir)
    return summary
