"""ACC at whole-model scale: which affordable ACC variant, if any, beats the classical whole-model adjoint.

Issue 18, deliverable 6; DESIGN.md sections 3 ("Stage-limited ACC", the hybrid), 4, 5 and 6b. A tiny HF
ViT (from a config, dropout off) is trained WHOLE on scikit-learn's 8x8 digits with the HF AdamW recipe
(10% warm-up, linear decay, clipping 1.0, weight decay 0.01) for 10+ epochs, so that rows recur often
enough for ACC's correction to matter (``--case text``: a tiny BERT on synthetic token sequences from
:func:`hf_accinf.examples.synthetic_text_dataset` instead). ``--truth_rows`` random rows are retrained out by replay at weight 0
and 0.5 (:func:`hf_accinf.scoring.verify.leave_one_out_effects`, one batched retraining): the exact change
of the mean evaluation loss, and the linearity ceiling ``truth(0)`` vs ``2 truth(0.5)``. Every estimator
goes through the product (:func:`hf_accinf.scoring.run.score_run`), timed:

* (0) the classical whole-model adjoint (``hf-accinf score`` defaults: adam-ie, exact removal, adjoint);
* (a) the stage-limited hybrid: acc-adam-ie, ``correction=stage`` on the first ``--stage_epochs`` epochs,
  ``form=adjoint`` on the whole model (forward form on the corrected prefix: ``N x 3P`` states there);
* (b) (0) + [ACC-DVEmb - DVEmb] on the whole model at each ``--projection_dim`` (the projected ACC correction);
* (c) (0) + [ACC-Adam-IE - Adam-IE] on the last block (``last:1``, both forward form: the same objective);
* references: ACC-Adam-IE on the whole model in the forward form (ACC at every occurrence, what (a)-(c)
  approximate; affordable only because the model is tiny) and ACC-Adam-IE on the head alone.

For each: Kendall tau against the truth with a 95% bootstrap interval, and the paired bootstrap interval
of tau(variant) - tau(0) over the same resampled rows (a variant "clearly" beats (0) only when that interval
lies above 0). Everything printed comes from one run.

    python scripts/bench_acc.py --threads 1                      # small default: ~100 rows, 10 epochs
    python scripts/bench_acc.py --threads 1 --rows 128 --truth_rows 40 --epochs 12 --lr 1e-3 --seeds 0 1 2
    python scripts/bench_acc.py --threads 1 --case text --rows 160 --truth_rows 40 --epochs 15 --lr 3e-3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fidelity  # noqa: E402  (the fidelity benchmark's cases, training and agreement figures)

from hf_accinf import RunReader, ScoreArguments, score_run  # noqa: E402
from hf_accinf.scoring.plan import _state_bytes  # noqa: E402
from hf_accinf.evaluation.metrics import kendall_tau  # noqa: E402
from hf_accinf.scoring.verify import bootstrap_interval, leave_one_out_effects  # noqa: E402

RESAMPLES = 2000


def paired_difference(estimate: np.ndarray, baseline: np.ndarray, truth: np.ndarray, seed: int) -> list[float]:
    """95% percentile bootstrap interval of tau(estimate, truth) - tau(baseline, truth), rows resampled together."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(truth), size=(RESAMPLES, len(truth)))
    differences = np.array([kendall_tau(estimate[p], truth[p]) - kendall_tau(baseline[p], truth[p]) for p in picks])
    differences = differences[np.isfinite(differences)]
    return [float(np.percentile(differences, 2.5)), float(np.percentile(differences, 97.5))]


def score(run_dir: Path, case, scratch: Path, dtype: str, **arguments) -> tuple[np.ndarray, float]:
    """Every training row's score by :func:`score_run` with ``arguments``, and its seconds."""
    options = ScoreArguments(run_dir=str(run_dir), output_dir=str(scratch), overwrite=True, trust_probes=0,
                             dtype=dtype, **arguments)
    began = time.perf_counter()
    result = score_run(options, case.train, case.eval, collate_fn=case.collate_fn, progress=False)
    return result.scores.double().numpy(), time.perf_counter() - began


def text_case(rows: int, seed: int) -> bench_fidelity.Case:
    """A tiny BERT (1 layer x 16, from a config, dropout off) on synthetic token sequences (offline)."""
    from transformers import BertConfig, BertForSequenceClassification

    from hf_accinf.examples import synthetic_text_dataset

    data = synthetic_text_dataset(2 * rows, seed=seed)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return bench_fidelity.Case("BERT 1x16 on synthetic text", BertForSequenceClassification(config),
                               data.select(range(rows)), data.select(range(rows, 2 * rows)))


CASES = {"image": bench_fidelity.image_case, "text": text_case}


def measure(options, seed: int) -> list[str]:
    bench_fidelity.RECIPES["adamw"]["learning_rate"] = options.lr
    case = CASES[options.case](options.rows, seed=seed)
    classes = case.model.config.num_labels
    parameters = sum(p.numel() for p in case.model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, scratch = Path(tmp) / "run", Path(tmp) / "scores"
        train_seconds = bench_fidelity.train(case, "adamw", run_dir, options.epochs, options.batch)
        run = RunReader(run_dir)
        losses = run.trajectory().loss
        rows = torch.randperm(options.rows, generator=torch.Generator().manual_seed(seed))[: options.truth_rows]
        began = time.perf_counter()
        effects = leave_one_out_effects(run, case.train, case.collate_fn, case.eval, rows, case.collate_fn,
                                        progress=False)
        truth_seconds = time.perf_counter() - began
        zero, half = effects.zero.numpy(), effects.half.numpy()
        picked = rows.numpy()

        variants: dict[str, tuple[np.ndarray, float]] = {}
        variants["(0) classical adjoint, whole model (default)"] = score(run_dir, case, scratch, options.dtype)
        classical, classical_seconds = variants["(0) classical adjoint, whole model (default)"]
        for epochs in options.stage_epochs:
            variants[f"(a) hybrid: ACC on epochs [0, {epochs}), adjoint after"] = score(
                run_dir, case, scratch, options.dtype, method="acc-adam-ie", modules=["all"], form="adjoint",
                correction="stage", stage_epochs=[f"0:{epochs}"])
        for k in options.projection_dim:
            accumulative, seconds_acc = score(run_dir, case, scratch, options.dtype, method="acc-dvemb",
                                              modules=["all"], form="forward", projection_dim=k)
            plain, seconds_plain = score(run_dir, case, scratch, options.dtype, method="dvemb", modules=["all"],
                                         form="forward", projection_dim=k)
            variants[f"(b) (0) + [ACC-DVEmb - DVEmb], k = {k}"] = (
                classical + accumulative - plain, classical_seconds + seconds_acc + seconds_plain)
        accumulative, seconds_acc = score(run_dir, case, scratch, options.dtype, method="acc-adam-ie",
                                          modules=["last:1"], form="forward")
        plain, seconds_plain = score(run_dir, case, scratch, options.dtype, method="adam-ie", modules=["last:1"],
                                     form="forward")
        variants["(c) (0) + [ACC - classical] on the last block"] = (
            classical + accumulative - plain, classical_seconds + seconds_acc + seconds_plain)
        variants["ref: ACC-Adam-IE everywhere, whole model, forward"] = score(
            run_dir, case, scratch, options.dtype, method="acc-adam-ie", modules=["all"], form="forward")
        variants["ref: ACC-Adam-IE on the head alone"] = score(run_dir, case, scratch, options.dtype,
                                                               method="acc-adam-ie", modules=["head"])

        ceiling = bench_fidelity.agreement(2 * half, zero)
        ceiling_interval = bootstrap_interval(zero, 2 * half, seed)
        states = _state_bytes("acc-adam-ie", parameters, options.rows, ScoreArguments(run_dir=str(run_dir)), 4)
        lines = [f"### seed {seed}: {case.name}, {options.rows} rows, {options.epochs} epochs, "
                 f"{run.num_steps} steps, AdamW lr {options.lr:g}", "",
                 f"Training loss {float(losses[0]):.3f} -> {float(losses[-1]):.3f}, mean evaluation loss "
                 f"{effects.base_loss:.3f} (chance ln {classes} = {np.log(classes):.3f}). Training {train_seconds:.1f} s; truth on "
                 f"{len(picked)} rows (weight 0 and 0.5, one batched retraining) {truth_seconds:.1f} s. Linearity "
                 f"ceiling tau {ceiling['tau']:.3f} [{ceiling_interval[0]:.2f}, {ceiling_interval[1]:.2f}]. "
                 f"P = {parameters}; forward-form ACC states N x 3P = {states / 2**20:.1f} MiB in float32.", "",
                 "| estimator | Kendall tau [95% bootstrap] | tau - tau(0) [95% paired bootstrap] | Pearson r | "
                 "seconds | x training |",
                 "|---|---|---|---|---|---|"]
        for name, (scores, seconds) in variants.items():
            estimate = scores[picked]
            figures = bench_fidelity.agreement(estimate, zero)
            interval = bootstrap_interval(estimate, zero, seed)
            difference = figures["tau"] - kendall_tau(classical[picked], zero)
            paired = paired_difference(estimate, classical[picked], zero, seed) if not name.startswith("(0)") else None
            shown = f"{difference:+.3f} [{paired[0]:+.3f}, {paired[1]:+.3f}]" if paired else "0"
            lines.append(f"| {name} | {figures['tau']:.3f} [{interval[0]:.2f}, {interval[1]:.2f}] | {shown} | "
                         f"{figures['r']:.3f} | {seconds:.1f} | {seconds / train_seconds:.1f} |")
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (named with the figures)")
    parser.add_argument("--case", choices=sorted(CASES), default="image",
                        help="image: ViT 2x32 on 8x8 digits; text: BERT 1x16 on synthetic token sequences")
    parser.add_argument("--rows", type=int, default=96, help="training rows (and as many evaluation rows)")
    parser.add_argument("--truth_rows", type=int, default=40, help="rows retrained out by replay")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate")
    parser.add_argument("--stage_epochs", type=int, nargs="+", default=[2, 5],
                        help="(a): ACC on the first this many epochs (one row each)")
    parser.add_argument("--projection_dim", type=int, nargs="+", default=[512, 2048], help="(b): k, one row each")
    parser.add_argument("--dtype", default="float64", help="propagation dtype of every estimator (a correction "
                        "is a difference of two scores: float64 keeps its round-off out of the comparison)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="model/data/row seeds, one table each")
    parser.add_argument("--output", default=None, help="also write the tables (markdown) here")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    header = (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}, {options.threads} thread(s), {options.dtype}. "
              f"Command: python scripts/bench_acc.py --threads {options.threads} --case {options.case} --rows {options.rows} --truth_rows "
              f"{options.truth_rows} --epochs {options.epochs} --batch {options.batch} --lr {options.lr:g} "
              f"--stage_epochs {' '.join(map(str, options.stage_epochs))} --projection_dim "
              f"{' '.join(map(str, options.projection_dim))} --dtype {options.dtype} --seeds "
              f"{' '.join(map(str, options.seeds))}")
    print(header, flush=True)
    lines = [header, ""]
    for seed in options.seeds:
        lines += measure(options, seed) + [""]
        print("\n".join(lines[-14:]), flush=True)
        if options.output:
            Path(options.output).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
