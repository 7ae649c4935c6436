"""The cleansing check end to end on the quickstart recipe (tiny ViT on scikit-learn's digits, SGD with momentum):
inject label noise, train with recording, score with each method, then retrain with the same recipe without the
rows each score column flags, without as many random rows, and on all rows; report test accuracy and the noisy
rows' recall among the flagged ones (the paper's section 6.5, on an HF model).

    python scripts/cleanse.py --output_dir runs/cleanse            # ~ a few minutes on 2 CPU cores
    python scripts/cleanse.py --num_rows 160 --num_train_epochs 3   # smaller
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from transformers import HfArgumentParser, Trainer, TrainingArguments

from hf_accinf import AccInfTrainer, RecordingArguments, ScoreArguments, score_run
from hf_accinf.data.cleanse import cleansing_check, inject_label_noise
from hf_accinf.data.columns import attach_scores
from hf_accinf.data.hub import write_scored_dataset
from hf_accinf.examples import digits_dataset, tiny_vit
from hf_accinf.scoring.artifacts import column_name


@dataclass
class CleanseArguments:
    output_dir: str = field(default="runs/cleanse", metadata={"help": "Run directory, scores, scored dataset and the report."})
    num_rows: int = field(default=300, metadata={"help": "Training rows (digits)."})
    num_eval_rows: int = field(default=200, metadata={"help": "Clean validation rows the scores are computed against."})
    num_test_rows: int = field(default=500, metadata={"help": "Clean test rows the retrained models are measured on."})
    label_noise: float = field(default=0.2, metadata={"help": "Fraction of training labels moved to another class (0: none)."})
    drop_fraction: float = field(default=0.2, metadata={"help": "Fraction of rows each ranking removes."})
    methods: list[str] = field(default_factory=lambda: ["acc-sgd-ie", "sgd-ie"], metadata={"help": "Scoring methods; one column each."})
    random_draws: int = field(default=3, metadata={"help": "Random removals averaged."})
    num_train_epochs: float = field(default=4.0, metadata={"help": "Epochs of the recipe."})
    learning_rate: float = field(default=0.05, metadata={"help": "Learning rate of the recipe."})
    hidden_size: int = field(default=32, metadata={"help": "Width of the tiny ViT."})
    seed: int = field(default=0, metadata={"help": "Seed of data split, noise, initialisation and order."})


def training_arguments(args: CleanseArguments, output_dir: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=args.num_train_epochs, per_device_train_batch_size=32,
        learning_rate=args.learning_rate, optim="sgd", optim_args="momentum=0.9", weight_decay=0.01, max_grad_norm=1.0,
        seed=args.seed, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )


def run(args: CleanseArguments) -> dict:
    out = Path(args.output_dir)
    train = digits_dataset(args.num_rows, seed=args.seed)
    evaluation = digits_dataset(args.num_eval_rows, seed=args.seed, offset=args.num_rows)
    test = digits_dataset(args.num_test_rows, seed=args.seed, offset=args.num_rows + args.num_eval_rows)
    noisy = None
    if args.label_noise > 0:
        train, noisy = inject_label_noise(train, args.label_noise, num_labels=10, seed=args.seed)
    recording = RecordingArguments(run_dir=str(out / "run"), overwrite=True)
    AccInfTrainer(model=tiny_vit(seed=args.seed, hidden_size=args.hidden_size), args=training_arguments(args, out / "trainer"),
                  train_dataset=train, recording=recording).train()
    scored = train
    for method in args.methods:
        scores_dir = out / f"scores-{method}"
        score_run(ScoreArguments(run_dir=recording.run_dir, method=method, output_dir=str(scores_dir), overwrite=True),
                  train, evaluation)  # the script owns its output directory: a rerun replaces it
        scored = attach_scores(scored, scores_dir)
    write_scored_dataset(scored, out / "scored", overwrite=True)

    def recipe(rows) -> float:
        trainer = Trainer(model=tiny_vit(seed=args.seed, hidden_size=args.hidden_size),
                          args=training_arguments(args, out / "retrain"), train_dataset=rows)
        trainer.train()
        prediction = trainer.predict(test)
        return float((prediction.predictions.argmax(-1) == np.asarray(prediction.label_ids)).mean())

    report = cleansing_check(scored, [column_name(m) for m in args.methods], args.drop_fraction, recipe,
                             noisy_rows=noisy, random_draws=args.random_draws, seed=args.seed)
    result = {"arguments": asdict(args), "noisy_rows": None if noisy is None else noisy.tolist(), **report.to_dict()}
    (out / "cleansing.json").write_text(json.dumps(result, indent=2))
    text = (f"Cleansing check: {args.num_rows} digits rows, label noise {args.label_noise}, each ranking removes "
            f"{args.drop_fraction:.0%} of the rows; tiny ViT retrained with the same recipe.\n\n{report.to_markdown()}\n")
    (out / "cleansing.md").write_text(text)
    print(text)
    return result


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(CleanseArguments).parse_args_into_dataclasses(args=argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
