"""Scoring a recorded run: influence embeddings and scores, written next to the run.

Checks every input before the long work (run directory, training dataset identity, evaluation
labels, method and optimizer), runs the engine on this process's shard, and on the main process
writes, each atomically:

    <output_dir>/embeddings.safetensors   Delta^j_T per chosen parameter, (N, *shape) (forward form only)
    <output_dir>/scores.safetensors       "scores": (N,) predicted change of mean eval loss without row j
    <output_dir>/scores.json              arguments, form, schedule, timing, trust figures, most helpful and harmful rows
    <output_dir>/dataset/                 the training dataset with the score column (datasets.Dataset only)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ScoreArguments
from .data.columns import add_score_column
from .data.features import head_inputs
from .engine import CorrectionPolicy, ShardContext, estimate_influence
from .engine.adjoint import adjoint_scores, choose_form
from .engine.estimator import InfluenceResult, make_rule
from .engine.objective import scores_from_embeddings
from .engine.trust import trust_check
from .errors import AccInfError
from .problem import problem_from_run
from .trajectory import RunReader
from .trajectory.schema import write_atomic

logger = logging.getLogger(__name__)


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


def score_run(args: ScoreArguments, train_dataset, eval_dataset, shard: ShardContext | None = None,
              collate_fn=None, progress: bool = True) -> ScoreResult | None:
    """Estimate every training row's influence on the mean loss of ``eval_dataset``.

    Returns the result on the main process (``None`` on the others).
    """
    shard = shard or ShardContext.single()
    run = RunReader(args.run_dir)
    run.check_dataset(train_dataset)
    if "labels" not in getattr(eval_dataset, "column_names", ["labels"]):
        raise AccInfError("The evaluation dataset needs a 'labels' column.")
    policy = CorrectionPolicy(args.correction, args.correction_p, args.correction_seed,
                              args.windows(args.stage_steps), args.windows(args.stage_epochs))
    problem = problem_from_run(run, getattr(torch, args.dtype), modules=args.modules)
    rule, accumulative = make_rule(problem, args.method, args.removal)  # refuse a mismatch before the long work
    form, reason = choose_form(args.form, accumulative, args.score_kind, policy)
    logger.info("form %s: %s", form, reason)

    model = run.build_model()
    inputs, labels = head_inputs(model, run.manifest.head.module, eval_dataset, collate_fn=collate_fn)
    final = run.head_parameters_at(run.num_steps)
    if form == "adjoint":
        began = time.perf_counter()
        gradient = problem.curvature.objective_grad(final, inputs, labels)
        scores = adjoint_scores(rule, problem, gradient, shard, progress, policy if accumulative else None)
        result = InfluenceResult(None, "backward", time.perf_counter() - began)
    else:
        result = estimate_influence(problem, args.method, args.removal, policy, args.schedule,
                                    args.memory_budget_gb, shard, progress)
    if not shard.is_main:
        return None
    embeddings = {}
    if form == "forward":
        scores = scores_from_embeddings(problem.curvature, result.embeddings, final, inputs, labels, args.score_kind)
        embeddings = {name: value.contiguous() for name, value in problem.curvature.unflatten(result.embeddings).items()}
    trust = None
    if args.trust_probes > 0:
        trust = trust_check(rule, problem, result.embeddings, args.trust_probes, args.trust_iterations,
                            progress=progress).to_dict()
    output_dir = Path(args.output_dir or Path(args.run_dir) / "scores")
    column = f"influence_{args.method.replace('-', '_')}"
    _write(output_dir, args, result, scores, embeddings, train_dataset, column, form, trust)
    return ScoreResult(scores, embeddings, result.schedule, result.seconds, output_dir, column, form, trust)


def attribution_matrix(run_dir: str, test_dataset, scores_dir: str | None = None, collate_fn=None,
                       modules: list[str] | None = None) -> torch.Tensor:
    """``(test rows, training rows)``: the predicted change of each test example's loss without each training
    row, ``grad l_v(theta_T) . Delta^j_T``, from saved embeddings: no replay of the trajectory."""
    from safetensors.torch import load_file

    run = RunReader(run_dir)
    embeddings_path = Path(scores_dir or Path(run_dir) / "scores") / "embeddings.safetensors"
    if not embeddings_path.is_file():
        raise AccInfError(f"No embeddings at {embeddings_path}: run `hf-accinf score --run_dir {run_dir} --form forward` "
                          "first (the adjoint form writes scores only).")
    problem = problem_from_run(run, modules=modules)
    embeddings = problem.curvature.flatten_named(load_file(embeddings_path))
    inputs, labels = head_inputs(run.build_model(), run.manifest.head.module, test_dataset, collate_fn=collate_fn)
    gradients = problem.curvature.example_grads(run.head_parameters_at(run.num_steps), inputs, labels)
    return gradients @ embeddings.to(gradients.dtype).T


def _write(output_dir: Path, args: ScoreArguments, result, scores, embeddings, train_dataset, column: str,
           form: str, trust: dict | None) -> None:
    metadata = {"method": args.method, "removal": args.removal, "form": form, "schedule": result.schedule,
                "run_dir": str(args.run_dir)}
    if embeddings:
        write_atomic(output_dir / "embeddings.safetensors", lambda tmp: save_file(embeddings, tmp, metadata=metadata))
    elif (output_dir / "embeddings.safetensors").exists():  # a previous forward run's: not these scores' embeddings
        logger.info("removing %s from an earlier run (the adjoint form writes none)", output_dir / "embeddings.safetensors")
        (output_dir / "embeddings.safetensors").unlink()
    write_atomic(output_dir / "scores.safetensors", lambda tmp: save_file({"scores": scores.contiguous()}, tmp, metadata=metadata))
    order = torch.argsort(scores)
    summary = {
        "arguments": args.to_dict(), "form": form, "schedule": result.schedule, "seconds": result.seconds,
        "trust": trust,
        "cost_model": result.cost_model, "column": column,
        "most_harmful": order[:10].tolist(), "most_helpful": order.flip(0)[:10].tolist(),
    }
    write_atomic(output_dir / "scores.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    if hasattr(train_dataset, "save_to_disk"):
        target, staging = output_dir / "dataset", output_dir / ".dataset.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        add_score_column(train_dataset, scores, column).save_to_disk(str(staging))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
