"""The attribution matrix: every test row's predicted loss change without every training row, from the saved
embeddings of a score run (DESIGN.md section 2, ``grad l_v(theta_T) . Delta^j_T``), without replaying the run."""

from __future__ import annotations

from pathlib import Path

import torch

from ..curvature.model import ModelCurvature
from ..inputs.evaluation import check_eval_labels
from ..errors import AccInfError
from ..methods.projection import GradientProjection, projection_fingerprint, same_projection
from ..scope import resolve_scope
from ..problem import problem_from_run
from ..trajectory import RunReader
from . import artifacts


def attribution_matrix(run_dir: str, test_dataset, scores_dir: str | None = None, collate_fn=None,
                       modules: list[str] | None = None, model=None, tokenizer=None) -> torch.Tensor:
    """``(test rows, training rows)``: the predicted change of each test example's loss without each training
    row, ``grad l_v(theta_T) . Delta^j_T``, from saved embeddings: no replay of the trajectory.

    The scope is read back from the scores' summary; ``modules``, if given, must name the same parameters."""
    run = RunReader(run_dir)
    scores_dir = scores_dir or artifacts.default_output_dir(run_dir)
    summary = artifacts.read_summary(scores_dir)
    if artifacts.EMBEDDINGS_NAME not in summary.files or not (Path(scores_dir) / artifacts.EMBEDDINGS_NAME).is_file():
        raise AccInfError(f"No embeddings at {scores_dir}: run `hf-accinf score --run_dir {run_dir} --form forward` "
                          "first (the adjoint form and direct scorers write scores only).")
    saved = artifacts.load_embeddings(scores_dir)
    built = run.build_model(model=model)
    head_name = run.manifest.head.module
    scope = summary.scope or [f"{head_name}.{name}" for name in saved]
    gauge = set(summary.gauge or ())  # left out of the scope when it was scored
    if modules and [n for n in resolve_scope(built, modules, head=head_name).parameters if n not in gauge] != list(scope):
        raise AccInfError(f"The embeddings at {scores_dir} were scored for {scope}, not for {modules}. "
                          "Leave modules out (the saved scope is used) or score again with these modules.")
    if summary.backend == "model":
        curvature = ModelCurvature(None, built, scope, None, run.manifest.loss.label_smoothing)
        final = run.load_checkpoint(run.num_steps)
    else:
        curvature = problem_from_run(run, modules=list(scope), model=built).curvature
        final = run.head_parameters_at(run.num_steps)
    projected = artifacts.PROJECTED_NAME in saved
    embeddings = saved[artifacts.PROJECTED_NAME] if projected else curvature.flatten_named(saved)
    inputs, labels = curvature.evaluation_inputs(built, head_name, test_dataset, collate_fn, tokenizer)
    check_eval_labels(labels, run.manifest.loss.num_labels)
    gradients = curvature.example_grads(final, inputs, labels)
    if projected:  # the same seeded projection the scores used (a pure function of P, k and the seed)
        arguments = summary.arguments
        if str(arguments.get("method", "")).endswith("-sketch") and arguments.get("sketch_basis", "random") != "random":
            raise AccInfError(f"The embeddings at {scores_dir} are in the {arguments['sketch_basis']} basis of "
                              f"{arguments['method']}, built from the run's gradients and not saved: score this objective "
                              f"with `hf-accinf score --method {arguments['method'].removesuffix('-sketch')} --form adjoint`, "
                              "or score with --sketch_basis random for embeddings that any later objective can use.")
        projection = GradientProjection(curvature.dim, int(arguments["projection_dim"]), int(arguments["projection_seed"]),
                                        gradients.dtype, gradients.device)
        if summary.projection and not same_projection(projection_fingerprint(projection), summary.projection):
            raise AccInfError(f"The projection rebuilt from {scores_dir}/scores.json differs from the one the scores "
                              "used (another torch version draws other numbers?): score again with this installation.")
        gradients = projection(gradients)
    return gradients @ embeddings.to(gradients.dtype).T
