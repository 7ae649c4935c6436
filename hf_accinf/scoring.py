"""Scoring a recorded run: influence embeddings and scores, written next to the run.

Checks every input before the long work (run directory, training dataset identity, evaluation
labels, method and optimizer), runs the engine on this process's shard, and on the main process
writes, each atomically:

    <output_dir>/embeddings.safetensors   Delta^j_T per chosen parameter, (N, *shape); metadata "scope" and
                                          "backend" say which parameters (head-relative or full names)
    <output_dir>/scores.safetensors       "scores": (N,) predicted change of mean eval loss without row j
    <output_dir>/scores.json              arguments, schedule, timing, most helpful and harmful rows
    <output_dir>/dataset/                 the training dataset with the score column (datasets.Dataset only)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ScoreArguments
from .data.columns import add_score_column
from .engine import CorrectionPolicy, ShardContext, estimate_influence
from .engine.estimator import make_rule
from .engine.objective import scores_from_embeddings
from .errors import AccInfError
from .curvature.model import ModelCurvature
from .modules import resolve_scope
from .problem import problem_from_run
from .trajectory import RunReader
from .trajectory.schema import write_atomic


@dataclass
class ScoreResult:
    scores: torch.Tensor
    embeddings: dict[str, torch.Tensor]
    schedule: str
    seconds: float
    output_dir: Path
    column: str


def score_run(args: ScoreArguments, train_dataset, eval_dataset, shard: ShardContext | None = None,
              collate_fn=None, progress: bool = True, states=None) -> ScoreResult | None:
    """Estimate every training row's influence on the mean loss of ``eval_dataset``.

    A scope outside the recorded head (``args.modules``, e.g. ``last:1`` or ``all``) runs the whole model
    on each step's rows of ``train_dataset`` (collated by ``collate_fn``) at ``theta_t`` from ``states``
    (a :class:`~hf_accinf.curvature.model.TrajectoryStates`; default: the run's checkpoints, which must
    then exist at every step), and evaluates the objective through the whole model (eval mode).
    Returns the result on the main process (``None`` on the others).
    """
    shard = shard or ShardContext.single()
    run = RunReader(args.run_dir)
    run.check_dataset(train_dataset)
    if "labels" not in getattr(eval_dataset, "column_names", ["labels"]):
        raise AccInfError("The evaluation dataset needs a 'labels' column.")
    policy = CorrectionPolicy(args.correction, args.correction_p, args.correction_seed,
                              args.windows(args.stage_steps), args.windows(args.stage_epochs))
    problem = problem_from_run(run, getattr(torch, args.dtype), modules=args.modules, train_dataset=train_dataset,
                               collate_fn=collate_fn, states=states)
    make_rule(problem, args.method, args.removal)  # refuse a method/optimizer mismatch before the long work

    model = run.build_model()
    inputs, labels = problem.curvature.evaluation_inputs(model, run.manifest.head.module, eval_dataset, collate_fn=collate_fn)
    final = problem.final_parameters()
    result = estimate_influence(problem, args.method, args.removal, policy, args.schedule,
                                args.memory_budget_gb, shard, progress)
    if not shard.is_main:
        return None
    scores = scores_from_embeddings(problem.curvature, result.embeddings, final, inputs, labels, args.score_kind)
    embeddings = {name: value.contiguous() for name, value in problem.curvature.unflatten(result.embeddings).items()}
    output_dir = Path(args.output_dir or Path(args.run_dir) / "scores")
    column = f"influence_{args.method.replace('-', '_')}"
    _write(output_dir, args, result, scores, embeddings, train_dataset, column, _scope_metadata(problem))
    return ScoreResult(scores, embeddings, result.schedule, result.seconds, output_dir, column)


def attribution_matrix(run_dir: str, test_dataset, scores_dir: str | None = None, collate_fn=None,
                       modules: list[str] | None = None) -> torch.Tensor:
    """``(test rows, training rows)``: the predicted change of each test example's loss without each training
    row, ``grad l_v(theta_T) . Delta^j_T``, from saved embeddings: no replay of the trajectory. The scope is
    read back from the embeddings file; ``modules``, if given, must name the same parameters."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    run = RunReader(run_dir)
    embeddings_path = Path(scores_dir or Path(run_dir) / "scores") / "embeddings.safetensors"
    if not embeddings_path.is_file():
        raise AccInfError(f"No embeddings at {embeddings_path}: run `hf-accinf score --run_dir {run_dir}` first.")
    with safe_open(str(embeddings_path), "pt") as handle:
        metadata = handle.metadata() or {}
    saved = load_file(embeddings_path)
    head_name = run.manifest.head.module
    backend = metadata.get("backend", "head")
    scope = json.loads(metadata["scope"]) if "scope" in metadata else [f"{head_name}.{name}" for name in saved]
    model = run.build_model()
    if modules and list(resolve_scope(model, modules, head=head_name).parameters) != scope:
        raise AccInfError(f"The embeddings at {embeddings_path} were scored for {scope}, not for {modules}. "
                          "Leave modules out (the saved scope is used) or score again with these modules.")
    if backend == "model":
        curvature = ModelCurvature(None, model, scope, None, run.manifest.loss["label_smoothing"])
        final = run.load_checkpoint(run.num_steps)
    else:
        curvature = problem_from_run(run, modules=scope).curvature
        final = run.head_parameters_at(run.num_steps)
    embeddings = curvature.flatten_named(saved)
    inputs, labels = curvature.evaluation_inputs(model, head_name, test_dataset, collate_fn=collate_fn)
    gradients = curvature.example_grads(final, inputs, labels)
    return gradients @ embeddings.to(gradients.dtype).T


def _scope_metadata(problem) -> dict[str, str]:
    backend = "model" if isinstance(problem.curvature, ModelCurvature) else "head"
    return {"backend": backend, "scope": json.dumps(list(problem.scope.parameters))}


def _write(output_dir: Path, args: ScoreArguments, result, scores, embeddings, train_dataset, column: str,
           scope: dict[str, str]) -> None:
    metadata = {"method": args.method, "removal": args.removal, "schedule": result.schedule, "run_dir": str(args.run_dir),
                **scope}
    write_atomic(output_dir / "embeddings.safetensors", lambda tmp: save_file(embeddings, tmp, metadata=metadata))
    write_atomic(output_dir / "scores.safetensors", lambda tmp: save_file({"scores": scores.contiguous()}, tmp, metadata=metadata))
    order = torch.argsort(scores)
    summary = {
        "arguments": args.to_dict(), "schedule": result.schedule, "seconds": result.seconds,
        "cost_model": result.cost_model, "column": column, "backend": scope["backend"],
        "scope": json.loads(scope["scope"]),
        "most_harmful": order[:10].tolist(), "most_helpful": order.flip(0)[:10].tolist(),
    }
    write_atomic(output_dir / "scores.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    if hasattr(train_dataset, "save_to_disk"):
        target, staging = output_dir / "dataset", output_dir / ".dataset.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        add_score_column(train_dataset, scores, column).save_to_disk(str(staging))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
