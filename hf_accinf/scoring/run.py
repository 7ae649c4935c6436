"""Scoring a recorded run: influence embeddings and scores (DESIGN.md section 2), written next to the run.

Checks every input before the long work (arguments, output directory, run directory, finite
trajectory, training dataset identity, evaluation labels, method and optimizer), runs the engine on
this process's shard, and on the main process writes the artifact set of :mod:`.artifacts` at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import __version__
from ..config import ScoreArguments
from ..data.columns import ScoreArtifact, add_score_column
from ..curvature.model import ModelCurvature
from ..data.features import check_eval_labels, eval_collator
from ..modules import resolve_scope
from ..engine import CorrectionPolicy, InfluenceResult, ShardContext, estimate_influence
from ..engine.adjoint import adjoint_scores, choose_form
from ..engine.objective import check_score_kind, scores_from_embeddings
from ..engine.trust import trust_check
from ..errors import AccInfError
from ..methods.projection import GradientProjection
from ..methods.registry import build_method, default_method
from ..problem import problem_from_run
from ..trajectory import RunReader, Trajectory
from . import artifacts

logger = logging.getLogger(__name__)

PROJECTED_NAME = "projected"  # the one embeddings tensor of projected methods (DVEmb), (N, projection_dim)


@dataclass
class ScoreResult:
    scores: torch.Tensor
    embeddings: dict[str, torch.Tensor]
    schedule: str
    seconds: float
    output_dir: Path
    column: str
    form: str = "forward"
    trust: dict | None = None  # engine.trust.TrustReport.to_dict(): growth, epoch_growth, expansive, ratios
    verify: dict | None = None  # scoring.verify.verify(): agreement with K rows retrained out by replay
    replay: dict | None = None  # trajectory.replay.ReplayReport.to_dict() when the scope needed replay
    method: str = ""  # the method that ran (method="auto" resolved)


def score_run(args: ScoreArguments, train_dataset, eval_dataset, shard: ShardContext | None = None,
              collate_fn=None, progress: bool = True, model=None, tokenizer=None, states=None) -> ScoreResult | None:
    """Estimate every training row's influence on the mean loss of ``eval_dataset``.

    ``model``: the model (or a factory, see :meth:`RunReader.build_model`) when the recorded class cannot
    be imported, e.g. one defined in the training script. ``tokenizer``: pads text evaluation batches as
    the Trainer would (``DataCollatorWithPadding``); ``collate_fn`` replaces the collator entirely.
    Under ``accelerate launch`` without a ``shard``, the processes form one group from the environment.
    A scope outside the recorded head (``args.modules``, e.g. ``last:1`` or ``all``) runs the whole model
    on each step's rows of ``train_dataset`` (collated by ``collate_fn``) at ``theta_t`` from ``states``
    (default: replay from the run's checkpoints) and evaluates the objective through the whole model.
    Returns the result on the main process (``None`` on the others).
    """
    own_shard = shard is None and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if own_shard:
        shard = ShardContext.from_accelerate(cpu=not torch.cuda.is_available())
    shard = shard or ShardContext.single()
    try:
        return _score(args, train_dataset, eval_dataset, shard, collate_fn, progress, model, tokenizer, states)
    finally:
        if own_shard:
            shard.close()


def _score(args, train_dataset, eval_dataset, shard, collate_fn, progress, model, tokenizer, states) -> ScoreResult | None:
    output_dir = Path(args.output_dir or artifacts.default_output_dir(args.run_dir))
    artifacts.check_output_dir(output_dir, args.overwrite)
    run = RunReader(args.run_dir)
    if args.method == "auto":
        args = dataclasses.replace(args, method=default_method(run.manifest.optimizer_class))
        logger.info("method %s (the accumulative method of the run's optimizer %s)", args.method,
                    run.manifest.optimizer_class)
    run.check_dataset(train_dataset)
    check_finite(run.trajectory(), clipped=float(run.manifest.training.get("max_grad_norm") or 0.0) > 0)
    policy = CorrectionPolicy(args.correction, args.correction_p, args.correction_seed,
                              args.windows(args.stage_steps), args.windows(args.stage_epochs))
    built = run.build_model(model=model)
    # The training rows of each step (deep scopes, --verify) are collated as the Trainer collated them:
    # padded per micro-batch (tokenized datasets.map output is not padded), unused columns dropped.
    train_collate = eval_collator(built, tokenizer, collate_fn)
    problem = problem_from_run(run, getattr(torch, args.dtype), modules=args.modules, model=built,
                               train_dataset=train_dataset, collate_fn=train_collate, states=states)
    method = build_method(problem, args.method, args)  # refuses a method/optimizer mismatch before the long work
    if method.output == "embeddings":
        check_score_kind(args.score_kind, method)
    elif args.score_kind != "linear":
        raise AccInfError(f"{args.method} scores one objective directly: its scores are linear; score_kind "
                          f"'{args.score_kind}' needs a method with embeddings.")
    form, reason = ("direct", "the method scores one objective directly") if method.output == "scores" else \
        choose_form(args.form, method.accumulative, args.score_kind, policy if method.accumulative else None)
    logger.info("form %s: %s", form, reason)

    curvature = problem.curvature
    inputs, labels = curvature.evaluation_inputs(built, run.manifest.head.module, eval_dataset, collate_fn, tokenizer)
    check_eval_labels(labels, int(run.manifest.loss["num_labels"]))
    final = problem.final_parameters()
    began = time.perf_counter()
    embeddings, trust = {}, None
    if form == "direct":
        scores = method.scores(lambda step: curvature.objective_grad(curvature.parameters_at(step), inputs, labels),
                               progress and shard.is_main)
        result = InfluenceResult(None, "direct", time.perf_counter() - began)
    elif form == "adjoint":
        gradient = method.embed_gradient(curvature.objective_grad(final, inputs, labels))
        scores = adjoint_scores(method, problem, gradient, shard, progress, policy if method.accumulative else None)
        result = InfluenceResult(None, "backward", time.perf_counter() - began)
    else:
        result = estimate_influence(problem, method, policy=policy, schedule=args.schedule,
                                    memory_budget_gb=args.memory_budget_gb, shard=shard, progress=progress)
    if not shard.is_main:
        return None
    if form == "forward":
        scores = scores_from_embeddings(curvature, result.embeddings, final, inputs, labels, args.score_kind,
                                        rule=method)
        embeddings = {name: value.contiguous() for name, value in curvature.unflatten(result.embeddings).items()} \
            if method.parameter_space else {PROJECTED_NAME: result.embeddings.contiguous()}
    if args.trust_probes > 0 and form != "direct":
        trust = trust_check(method, problem, result.embeddings, args.trust_probes, args.trust_iterations,
                            progress=progress).to_dict()
    checks = {"trust": trust, "verify": None, "replay": None, "projection": None}
    if args.verify:
        from .verify import describe, verify

        logger.info("verify: retraining the run and %d rows out by replay (weight 0 and 0.5) together, %d steps",
                    args.verify, run.num_steps)
        checks["verify"] = verify(run, train_dataset, train_collate, eval_dataset, scores, args.verify,
                                  args.verify_seed, eval_collate_fn=train_collate,
                                  memory_budget=int(args.memory_budget_gb * 2**30), progress=progress)
        logger.info("verify: %s", describe(checks["verify"]))
    states = getattr(curvature, "states", None)
    if hasattr(states, "report"):
        checks["replay"] = states.report().to_dict()
    if not getattr(method, "parameter_space", True):
        checks["projection"] = projection_fingerprint(method.projection)
    column = f"influence_{args.method.replace('-', '_')}"
    _write(output_dir, args, run, problem, result, scores, embeddings, train_dataset, column, len(labels), form, checks)
    return ScoreResult(scores, embeddings, result.schedule, result.seconds, output_dir, column, form, trust,
                       checks["verify"], checks["replay"], args.method)


def projection_fingerprint(projection: GradientProjection) -> dict:
    """What identifies a projection: its width and its image of a fixed probe."""
    probe = torch.linspace(-1, 1, projection.input_dim, dtype=torch.float64)
    image = projection(probe.to(projection.dtype)).double()
    return {"dim": projection.dim, "identity": projection.identity, "probe": [float(x) for x in image[:4]]}


def same_projection(rebuilt: dict, saved: dict) -> bool:
    return rebuilt["dim"] == saved["dim"] and rebuilt["identity"] == saved["identity"] and \
        torch.allclose(torch.tensor(rebuilt["probe"]), torch.tensor(saved["probe"]), rtol=1e-4, atol=1e-6)


def check_finite(trajectory: Trajectory, clipped: bool = True) -> None:
    """Refuse a trajectory with a non-finite loss, learning rate, gradient or head parameter, naming the step.
    Without clipping the Trainer computes no gradient norm (recorded as NaN): it is not checked then."""
    per_step = {"loss": trajectory.loss, "learning rate": trajectory.lr}
    if clipped:
        per_step["gradient norm"] = trajectory.grad_norm
    per_step.update({f"gradient of '{name}'": value for name, value in trajectory.grads.items()})
    per_step.update({f"parameter '{name}'": value for name, value in trajectory.params.items()})
    for what, values in per_step.items():
        if values is None or not values.is_floating_point():
            continue
        bad = ~torch.isfinite(values.reshape(len(values), -1)).all(1)
        if bad.any():
            step = int(bad.nonzero()[0])
            raise AccInfError(
                f"The recorded run has a non-finite {what} at step {step} (the training diverged or a learning rate "
                "was NaN/inf): influence through it is undefined. Fix the training (lower learning rate, clipping) "
                "and record it again."
            )
    head_rows = trajectory.head_input.reshape(len(trajectory.head_input), -1)
    bad_rows = ~torch.isfinite(head_rows).all(1)
    if bad_rows.any():
        row = int(bad_rows.nonzero()[0])
        step = int(torch.searchsorted(trajectory.row_offsets, torch.tensor(row), right=True)) - 1
        raise AccInfError(f"The recorded run has non-finite head inputs at step {step}: record it again after fixing the training.")


def attribution_matrix(run_dir: str, test_dataset, scores_dir: str | None = None, collate_fn=None,
                       modules: list[str] | None = None, model=None, tokenizer=None) -> torch.Tensor:
    """``(test rows, training rows)``: the predicted change of each test example's loss without each training
    row, ``grad l_v(theta_T) . Delta^j_T``, from saved embeddings: no replay of the trajectory.

    The scope is read back from the scores' summary; ``modules``, if given, must name the same parameters."""
    run = RunReader(run_dir)
    scores_dir = scores_dir or artifacts.default_output_dir(run_dir)
    summary = artifacts.load_summary(scores_dir)
    if artifacts.EMBEDDINGS_NAME not in summary.get("files", [artifacts.EMBEDDINGS_NAME]) or \
            not (Path(scores_dir) / artifacts.EMBEDDINGS_NAME).is_file():
        raise AccInfError(f"No embeddings at {scores_dir}: run `hf-accinf score --run_dir {run_dir} --form forward` "
                          "first (the adjoint form and direct scorers write scores only).")
    saved = artifacts.load_embeddings(scores_dir)
    built = run.build_model(model=model)
    head_name = run.manifest.head.module
    scope = summary.get("scope") or [f"{head_name}.{name}" for name in saved]
    if modules and list(resolve_scope(built, modules, head=head_name).parameters) != list(scope):
        raise AccInfError(f"The embeddings at {scores_dir} were scored for {scope}, not for {modules}. "
                          "Leave modules out (the saved scope is used) or score again with these modules.")
    if summary.get("backend") == "model":
        curvature = ModelCurvature(None, built, scope, None, run.manifest.loss["label_smoothing"])
        final = run.load_checkpoint(run.num_steps)
    else:
        curvature = problem_from_run(run, modules=list(scope), model=built).curvature
        final = run.head_parameters_at(run.num_steps)
    projected = PROJECTED_NAME in saved
    embeddings = saved[PROJECTED_NAME] if projected else curvature.flatten_named(saved)
    inputs, labels = curvature.evaluation_inputs(built, head_name, test_dataset, collate_fn, tokenizer)
    check_eval_labels(labels, int(run.manifest.loss["num_labels"]))
    gradients = curvature.example_grads(final, inputs, labels)
    if projected:  # the same seeded projection the scores used (a pure function of P, k and the seed)
        arguments = summary["arguments"]
        projection = GradientProjection(curvature.dim, int(arguments["projection_dim"]), int(arguments["projection_seed"]),
                                        gradients.dtype, gradients.device)
        if summary.get("projection") and not same_projection(projection_fingerprint(projection), summary["projection"]):
            raise AccInfError(f"The projection rebuilt from {scores_dir}/scores.json differs from the one the scores "
                              "used (another torch version draws other numbers?): score again with this installation.")
        gradients = projection(gradients)
    return gradients @ embeddings.to(gradients.dtype).T


def _write(output_dir: Path, args: ScoreArguments, run: RunReader, problem, result, scores, embeddings, train_dataset,
           column: str, eval_rows: int, form: str, checks: dict) -> None:
    scope = list(problem.scope.parameters) if problem.scope else list(embeddings)
    backend = "model" if isinstance(problem.curvature, ModelCurvature) else "head"
    metadata = {"method": args.method, "removal": args.removal, "form": form, "schedule": result.schedule,
                "run_dir": str(args.run_dir), "scope": json.dumps(scope), "backend": backend}
    writers = {artifacts.SCORES_NAME: lambda path: save_file({"scores": scores.contiguous()}, path, metadata=metadata)}
    if embeddings:  # the adjoint form and direct scorers have none
        writers[artifacts.EMBEDDINGS_NAME] = lambda path: save_file(embeddings, path, metadata=metadata)
    if hasattr(train_dataset, "save_to_disk"):
        writers[artifacts.DATASET_DIR] = lambda path: add_score_column(
            train_dataset, scores, column, ScoreArtifact(scores, summary, output_dir).provenance()).save_to_disk(str(path))
    order = torch.argsort(scores)
    manifest = run.manifest
    summary = {
        "hf_accinf_version": __version__,
        "run": {"run_dir": str(args.run_dir), "model_class": manifest.model_class, "num_steps": manifest.num_steps,
                "dataset_content_hash": manifest.dataset.get("content_hash"), "dataset_length": manifest.dataset["length"]},
        "method": args.method, "removal": args.removal, "modules": args.modules, "column": column,
        "scope": scope, "backend": backend,
        "evaluation_rows": eval_rows, "arguments": args.to_dict(), "form": form, **checks,
        "schedule": result.schedule,
        "seconds": result.seconds, "cost_model": result.cost_model,
        "most_harmful": order[:10].tolist(), "most_helpful": order.flip(0)[:10].tolist(),
    }
    artifacts.write_set(output_dir, writers, summary, args.overwrite)
    logger.info("wrote %s", output_dir)
