"""``hf-accinf train``: the quickstart job, a tiny ViT fine-tuned on scikit-learn's bundled digits (no download),
recorded with :class:`~hf_accinf.AccInfTrainer`. (To be replaced by training from a YAML config.)"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import RecordingArguments
from .parsing import build_parser, parse

NAME = "train"
DESCRIPTION = "record a training run (default: tiny ViT on bundled digits)"
QUICKSTART_JOB = "quickstart_job.json"


@dataclass
class TrainJobArguments:
    """The embedded default job: a tiny ViT fine-tuned on scikit-learn's bundled digits (no download)."""

    output_dir: str = field(default="runs/quickstart", metadata={"help": "Where the Trainer and the run directory write."})
    num_rows: int = field(default=400, metadata={"help": "Training rows taken from the digits (at most 1797)."})
    num_train_epochs: float = field(default=5.0, metadata={"help": "Epochs."})
    hidden_size: int = field(default=64, metadata={"help": "Width of the tiny ViT."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per process."})
    learning_rate: float = field(default=0.05, metadata={"help": "Peak learning rate."})
    optim: str = field(default="sgd", metadata={"help": "TrainingArguments.optim (sgd; adamw_torch awaits the Adam family)."})
    optim_args: str = field(default="momentum=0.9", metadata={"help": "TrainingArguments.optim_args."})
    weight_decay: float = field(default=0.01, metadata={"help": "Weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0 disables)."})
    seed: int = field(default=0, metadata={"help": "Seed of model initialisation and data order."})


def make_parser(subparsers=None):
    return build_parser(NAME, DESCRIPTION, (TrainJobArguments, RecordingArguments), subparsers)


def main(argv: list[str] | None = None) -> int:
    from transformers import TrainingArguments

    from ..examples import digits_dataset, tiny_vit
    from ..recording import AccInfTrainer
    from .summary import summary

    job, recording = parse(make_parser(), argv)[:2]
    if recording.run_dir is None:  # the job's own directory: a rerun replaces it
        recording.run_dir, recording.overwrite = str(Path(job.output_dir) / "accinf"), True
    args = TrainingArguments(
        output_dir=job.output_dir, num_train_epochs=job.num_train_epochs,
        per_device_train_batch_size=job.per_device_train_batch_size, learning_rate=job.learning_rate,
        optim=job.optim, optim_args=job.optim_args, weight_decay=job.weight_decay, max_grad_norm=job.max_grad_norm, seed=job.seed,
        use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no", logging_steps=10,
    )
    trainer = AccInfTrainer(
        model=tiny_vit(seed=job.seed, hidden_size=job.hidden_size), args=args, train_dataset=digits_dataset(job.num_rows, seed=job.seed),
        recording=recording,
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        Path(recording.run_dir, QUICKSTART_JOB).write_text(json.dumps(asdict(job), indent=2))
        print(summary(recording.run_dir))
    return 0


if __name__ == "__main__":
    from ..cli import run_command

    sys.exit(run_command(NAME, sys.argv[1:]))
