"""Where whole-model DVEmb loses fidelity (issue 22): one approximation at a time, against retraining.

For a tiny HF ViT on 8x8 digits and a tiny HF BERT on synthetic token sequences, each trained WHOLE with
the HF default AdamW recipe (warm-up, linear decay, clipping 1.0, weight decay 0.01, dropout off) long
enough to learn, this script

1. retrains ``--truth_rows`` random rows out by replay (weight 0, and 0.5 for the linearity ceiling);
2. scores the whole model (float64) down a ladder that swaps one approximation at a time:

   * Adam-IE adjoint, exact removal (the reference) and first-order removal (DVEmb's injection is
     first-order);
   * Adam-IE carried per step (the ``(Delta_theta, Delta_m, Delta_v)`` recursion) with the batch Hessian
     replaced by the Gauss-Newton form with the true per-row output Hessian, then by the empirical
     Fisher (``ModelBatch.hvp`` swapped for :mod:`hf_accinf.methods.output_hessian`);
   * the DVEmb recursion (Adam's moments collapsed into each gradient's total displacement ``D_t``,
     :class:`~hf_accinf.methods.dvemb.AdamDisplacement`), unprojected, with the exact batch Hessian, the
     GGN, the empirical Fisher (= DVEmb unprojected, checked against ``score_run``'s ``dvemb``);
   * DVEmb projected to ``k`` in ``--projection_dim``;
   * exact Adam-IE embeddings projected, ``R Delta^j_T`` by one ``k``-vector adjoint pass
     (:mod:`hf_accinf.engine.sketch`): a random ``R`` (``--sketch_dim``, rung f) and the leading singular
     subspace of the training rows' final gradients (``--subspace_dim``, rung g);
   * the fix, ``adam-ie-sketch`` from ``score_run``: exact Adam-IE tracked in a random ``k``-dimensional sketch
     (rung s, each ``--method_dim``) and in the leading subspace of the last epoch's training gradients (rung sg,
     ``--sketch_basis gradients``, each ``--basis_dim``), its embeddings written as a forward form's;
   * TracIn;

3. prints one table per case: Kendall tau and Pearson r against truth(0), Kendall tau against rung a on all rows,
   the product's own reference check where it runs one (``trust.reference`` of scores.json: DVEmb and the sketch),
   the numbers the estimator keeps (per row, and in all), and seconds (the reference check's pass aside).

    python scripts/diagnose_dvemb.py --threads 1                     # both cases, every rung (~15 min each)
    python scripts/diagnose_dvemb.py --threads 1 --rungs a,d2,e,s --projection_dim 512 --method_dim 64 256  # the fix
    python scripts/diagnose_dvemb.py --cases vit --truth_rows 12     # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from hf_accinf import AccInfTrainer, RecordingArguments, RunReader, ScoreArguments, score_run
from hf_accinf.curvature.model import ModelBatch
from hf_accinf.inputs.collate import eval_collator
from hf_accinf.evaluation.metrics import kendall_tau
from hf_accinf.losses import clip_coefficient
from hf_accinf.methods.dvemb import AdamDisplacement, DVEmbRule
from hf_accinf.methods.output_hessian import fisher_product, ggn_product
from hf_accinf.methods.projection import BasisProjection, GradientProjection
from hf_accinf.methods.registry import build_method
from hf_accinf.engine.sketch import sketched_embeddings
from hf_accinf.problem import problem_from_run
from hf_accinf.scoring.verify import leave_one_out_effects
from hf_accinf.trajectory.replay import Replay


# Gauge tensors (an attention key bias: softmax ignores it) random-walk under Adam's eps in float32 and miss the
# default replay tolerance (1e-4; up to 2e-2 over a short last interval) on long AdamW runs (DESIGN.md section 6b); they do not change any output.
REPLAY_TOLERANCE = 5e-2
RECIPE = dict(optim="adamw_torch", lr_scheduler_type="linear", warmup_steps=0.1, max_grad_norm=1.0, weight_decay=0.01)


def vit_case(rows: int):
    from hf_accinf.examples import digits_dataset, tiny_vit

    return ("ViT 2x32 on 8x8 digits", tiny_vit(), digits_dataset(rows, seed=0),
            digits_dataset(rows, seed=0, offset=rows), None)


def bert_case(rows: int):
    from hf_accinf.examples import synthetic_text_dataset

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return ("BERT 1x16 on synthetic tokens", BertForSequenceClassification(config), synthetic_text_dataset(rows, seed=0),
            synthetic_text_dataset(rows, seed=1), None)


# builder, AdamW learning rate, training rows (and as many evaluation rows), epochs: ~250 steps of batch 16
CASES = {"vit": (vit_case, 1e-3, 768, 5), "bert": (bert_case, 3e-3, 512, 8)}


@contextlib.contextmanager
def curvature_swapped(kind: str):
    """``ModelBatch.hvp`` replaced by the GGN or the empirical Fisher product (``hessian``: unchanged)."""
    original = ModelBatch.hvp
    if kind != "hessian":
        ModelBatch.hvp = {"ggn": ggn_product, "fisher": fisher_product}[kind]
    try:
        yield
    finally:
        ModelBatch.hvp = original


def collapsed_scores(run_dir: Path, train, evaluation, collate, kind: str) -> np.ndarray:
    """The DVEmb recursion unprojected (``x' = (1 - d) x - D_t clip(C x) + [j in B_t] w_j D_t clip(g_j)``, C the
    curvature ``kind``) in its adjoint form: ``u_t = (1 - d) u_{t+1} - clip(C (D_t u_{t+1}))`` (C and the clip map
    are symmetric), ``s_j += w_j u_{t+1} . D_t clip(g_j)``, one backward pass computing ``D_t`` as it goes."""
    run = RunReader(run_dir)
    built = run.build_model()
    problem = problem_from_run(run, torch.float64, modules=["all"], model=built, train_dataset=train,
                               collate_fn=eval_collator(built, None, collate), states=replay_states(run, train, collate))
    rule = DVEmbRule(problem, projection_dim=0)
    curvature, trajectory, spec = problem.curvature, problem.trajectory, problem.optimizer
    inputs, labels = curvature.evaluation_inputs(built, run.manifest.head.module, evaluation, collate)
    adjoint = curvature.objective_grad(problem.final_parameters(), inputs, labels)
    displacement = AdamDisplacement(problem, rule.beta1, rule.beta2, rule.eps, torch.zeros_like(rule.decay_rate))
    product = {"hessian": ModelBatch.hvp, "ggn": ggn_product, "fisher": fisher_product}[kind]
    scores = torch.zeros(problem.num_samples, dtype=torch.float64)
    for step in reversed(range(trajectory.num_steps)):
        batch = curvature.at_step(step)
        clip = clip_coefficient(float(trajectory.grad_norm[step]), spec.max_grad_norm)
        direction = displacement.at(step, batch.batch_grad, clip)
        decay = float((problem.learning_rates(step) * rule.decay_rate).mean())
        gradients = batch.row_grads(torch.arange(len(batch.row_weight)))
        updates = rule._clip_map(gradients, batch.batch_grad, clip, step) * direction
        scores.index_add_(0, trajectory.batch(step), batch.row_weight * (updates @ adjoint))
        curved = product(batch, rule._clip_map((direction * adjoint)[None], batch.batch_grad, clip, step))[0]
        adjoint = (1 - decay) * adjoint - curved
    return scores.numpy()


def sketched_scores(run_dir: Path, train, evaluation, collate, dim: int, subspace: bool = False) -> np.ndarray:
    """``(R Delta^j_T) . (R g_val)``: exact Adam-IE (exact removal) embeddings at ``k = dim`` by one ``k``-vector
    adjoint pass (:func:`hf_accinf.engine.sketch.sketched_embeddings`)."""
    run = RunReader(run_dir)
    built = run.build_model()
    problem = problem_from_run(run, torch.float64, modules=["all"], model=built, train_dataset=train,
                               collate_fn=eval_collator(built, None, collate), states=replay_states(run, train, collate))
    rule = build_method(problem, "adam-ie")
    head = run.manifest.head.module
    if subspace:  # the leading right singular vectors of the training rows' gradients at theta_T
        rows, row_labels = problem.curvature.evaluation_inputs(built, head, train, collate)
        gradients = problem.curvature.example_grads(problem.final_parameters(), rows, row_labels)
        projection = BasisProjection(torch.linalg.svd(gradients, full_matrices=False).Vh[:dim])
    else:
        projection = GradientProjection(rule.param_dim, dim, seed=0)
    embeddings = sketched_embeddings(rule, problem, projection, progress=False)
    inputs, labels = problem.curvature.evaluation_inputs(built, head, evaluation, collate)
    return (embeddings @ projection(problem.curvature.objective_grad(problem.final_parameters(), inputs, labels))).numpy()


def kept_numbers(key: str, dim: int, parameters: int, rows: int, recorded_rows: int) -> tuple[str, int]:
    """What an estimator keeps beyond the model, per training row and in all (numbers): the exact adjoint one
    ``3P`` adjoint (Adam); DVEmb ``k`` per row and two ``k``-vectors per recorded batch row (its factors); the sketch
    ``k`` per row, ``k`` per recorded batch row (the cached injections) and the ``k x 3P`` adjoint block (its own
    count: carried in chunks under the memory budget), with the gradients basis also the range finder's ``2k x P``."""
    if key in ("a", "a1"):
        return "-", 3 * parameters
    if key in ("d2", "e"):
        return str(dim), dim * rows + 2 * dim * recorded_rows
    if key == "s":
        return str(dim), dim * rows + dim * recorded_rows + dim * 3 * parameters
    if key == "sg":  # and the range finder's 2k x P
        return str(dim), dim * rows + dim * recorded_rows + dim * 3 * parameters + 2 * dim * parameters
    return "", 0


def replay_states(run: RunReader, train, collate) -> Replay:
    """``theta_t`` by replay, as ``score_run`` builds it, at :data:`REPLAY_TOLERANCE`."""
    built = run.build_model()
    return Replay(run, train, eval_collator(built, None, collate), model=built, tolerance=REPLAY_TOLERANCE)


def train_case(case, lr: float, run_dir: Path, epochs: int, batch: int) -> tuple[float, float]:
    name, model, train, evaluation, collate = case
    args = TrainingArguments(output_dir=str(run_dir) + "-out", per_device_train_batch_size=batch, learning_rate=lr,
                             num_train_epochs=epochs, use_cpu=True, report_to=[], save_strategy="no",
                             disable_tqdm=True, seed=0, logging_strategy="no", **RECIPE)
    trainer = AccInfTrainer(model=model, args=args, train_dataset=train, data_collator=collate,
                            recording=RecordingArguments(run_dir=str(run_dir), checkpoint_every=10, overwrite=True))
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(evaluation), 128):
            part = evaluation[start:start + 128]
            inputs = {k: torch.as_tensor(v) for k, v in part.items() if k != "labels"}
            correct += int((model(**inputs).logits.argmax(-1) == torch.as_tensor(part["labels"])).sum())
    return seconds, correct / len(evaluation)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", default="vit,bert")
    parser.add_argument("--rows", type=int, default=0, help="training rows (and as many evaluation rows); 0: the case's")
    parser.add_argument("--epochs", type=int, default=0, help="0: the case's")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--truth_rows", type=int, default=30)
    parser.add_argument("--projection_dim", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--sketch_dim", type=int, nargs="*", default=[64],
                        help="k of the sketched exact Adam-IE embeddings (k whole-model HVPs per step)")
    parser.add_argument("--subspace_dim", type=int, nargs="*", default=[256],
                        help="k of the exact Adam-IE embeddings in the leading singular subspace of the training rows' "
                             "final gradients")
    parser.add_argument("--method_dim", type=int, nargs="*", default=[64, 256],
                        help="k of the fix, the adam-ie-sketch method run by score_run (rung s)")
    parser.add_argument("--basis_dim", type=int, nargs="*", default=[64, 256],
                        help="k of adam-ie-sketch with --sketch_basis gradients (rung sg)")
    parser.add_argument("--rungs", default="all", help="comma-separated rung keys to run (default all)")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{options.threads} thread(s). Command: python scripts/diagnose_dvemb.py --threads {options.threads} "
          f"--cases {options.cases} --rows {options.rows} --epochs {options.epochs} --batch {options.batch} "
          f"--truth_rows {options.truth_rows} --projection_dim {' '.join(map(str, options.projection_dim))} "
          f"--sketch_dim {' '.join(map(str, options.sketch_dim))} "
          f"--subspace_dim {' '.join(map(str, options.subspace_dim))} "
          f"--method_dim {' '.join(map(str, options.method_dim))} --basis_dim {' '.join(map(str, options.basis_dim))} "
          f"--rungs {options.rungs}", flush=True)
    for key in options.cases.split(","):
        builder, lr, rows, epochs = CASES[key]
        rows, epochs = options.rows or rows, options.epochs or epochs
        case = builder(rows)
        name, model, train, evaluation, collate = case
        parameters = sum(p.numel() for p in model.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            train_seconds, accuracy = train_case(case, lr, run_dir, epochs, options.batch)
            run = RunReader(run_dir)
            steps = run.num_steps
            chosen = torch.randperm(rows, generator=torch.Generator().manual_seed(0))[: options.truth_rows].tolist()
            rows_count, rows = rows, chosen
            began = time.perf_counter()
            replay = Replay(run, train, collate, tolerance=REPLAY_TOLERANCE)
            effects = leave_one_out_effects(run, train, collate, evaluation, rows, collate, progress=False)
            base, zero, half = effects.base_loss, effects.zero.numpy(), effects.half.numpy()
            truth_seconds = time.perf_counter() - began
            print(f"\n## {name}: P = {parameters}, {rows_count} rows, {steps} AdamW steps (lr {lr:g}), held-out "
                  f"accuracy {accuracy:.2f}, eval loss {float(base):.3f}; training {train_seconds:.1f} s, truth "
                  f"{len(rows)} rows x 2 weights {truth_seconds:.1f} s; linearity ceiling tau "
                  f"{kendall_tau(2 * half, zero):.3f}; replay error {effects.replay_error or 0.0:.2g}\n", flush=True)
            print("| rung | estimator | Kendall tau | Pearson r | tau vs rung a (all rows) | reference check "
                  "(scores.json) | k | numbers kept per row / in all | seconds |\n"
                  "|---|---|---|---|---|---|---|---|---|", flush=True)
            reference = {}
            recorded_rows = int(run.trajectory().row_offsets[-1])
            checks: dict[str, dict] = {}

            def report(rung, label, compute, dim=0):
                if options.rungs != "all" and rung not in options.rungs.split(","):
                    return None
                began = time.perf_counter()
                checks.pop("last", None)
                try:
                    scores = np.asarray(compute())
                except Exception as error:  # noqa: BLE001 - a rung the package refuses: say so in the table
                    print(f"| {rung} | {label} | failed: {type(error).__name__}: {str(error)[:120]} | | | | | | |",
                          flush=True)
                    return None
                check = checks.get("last")
                seconds = time.perf_counter() - began - (check["seconds"] if check else 0.0)  # the check aside
                estimate = scores[rows]
                reference.setdefault("a", scores)
                check = f"{check['kendall_tau']:.3f}" + (" (low)" if check["low"] else "") if check else ""
                per_row, total = kept_numbers(rung, dim or parameters, parameters, rows_count, recorded_rows)
                kept = f"{per_row} / {total / 1e6:.2f} M" if total else ""
                print(f"| {rung} | {label} | {kendall_tau(estimate, zero):.3f} | "
                      f"{stats.pearsonr(estimate, zero).statistic:.3f} | {kendall_tau(scores, reference['a']):.3f} | "
                      f"{check} | {dim or ''} | {kept} | {seconds:.1f} |", flush=True)
                return scores

            def scored(method, form="adjoint", **extra):
                arguments = ScoreArguments(run_dir=str(run_dir), method=method, modules=["all"], form=form,
                                           dtype="float64", trust_probes=0, output_dir=str(Path(tmp) / "scores"),
                                           overwrite=True, **extra)
                result = score_run(arguments, train, evaluation, collate_fn=collate, progress=False,
                                   states=replay_states(run, train, collate))
                if result.trust and result.trust.get("reference"):
                    checks["last"] = result.trust["reference"]
                return result.scores.double().numpy()

            def swapped(kind, **extra):
                with curvature_swapped(kind):
                    return scored("adam-ie", **extra)

            report("a", "Adam-IE adjoint, exact removal (reference)", lambda: scored("adam-ie"))
            report("a1", "Adam-IE adjoint, first-order removal", lambda: scored("adam-ie", removal="first-order"))
            report("c", "Adam per step, GGN (true output Hessian), first-order", lambda: swapped("ggn", removal="first-order"))
            report("c1", "Adam per step, empirical Fisher, first-order", lambda: swapped("fisher", removal="first-order"))
            report("b", "collapsed Adam (D_t), exact batch Hessian", lambda: collapsed_scores(run_dir, train, evaluation, collate, "hessian"))
            report("d", "collapsed Adam (D_t), GGN", lambda: collapsed_scores(run_dir, train, evaluation, collate, "ggn"))
            report("d1", "collapsed Adam (D_t), empirical Fisher", lambda: collapsed_scores(run_dir, train, evaluation, collate, "fisher"))
            report("d2", "DVEmb unprojected (score_run)", lambda: scored("dvemb", projection_dim=0, reference_check="off"))
            # The product's reference check (one more exact adjoint pass) runs on the first k of each method only.
            for dim in options.projection_dim:
                report("e", f"DVEmb k = {dim}", lambda dim=dim: scored(
                    "dvemb", projection_dim=dim, reference_check="auto" if dim == options.projection_dim[0] else "off"),
                    dim)
            for dim in options.sketch_dim:
                report("f", f"exact Adam-IE sketched, k = {dim} (engine/sketch.py)",
                       lambda dim=dim: sketched_scores(run_dir, train, evaluation, collate, dim))
            for dim in options.subspace_dim:
                report("g", f"exact Adam-IE in the span of the final training gradients, k = {dim}",
                       lambda dim=dim: sketched_scores(run_dir, train, evaluation, collate, dim, subspace=True))
            for dim in options.method_dim:
                report("s", f"the fix: adam-ie-sketch, k = {dim} (score_run, forward form)",
                       lambda dim=dim: scored("adam-ie-sketch", form="auto", projection_dim=dim, reference_check=(
                           "auto" if dim == options.method_dim[0] else "off")), dim)
            for dim in options.basis_dim:
                report("sg", f"the fix: adam-ie-sketch --sketch_basis gradients, k = {dim} (score_run)",
                       lambda dim=dim: scored("adam-ie-sketch", form="auto", projection_dim=dim, sketch_basis="gradients",
                                              reference_check="auto" if dim == options.basis_dim[0] else "off"), dim)
            report("t", "TracIn", lambda: scored("tracin", form="auto"))
            print(f"\npeak resident memory of this process so far: "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
