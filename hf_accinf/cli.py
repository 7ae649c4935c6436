"""The ``hf-accinf`` command: ``train`` records a run, ``summary`` describes one. Parsing lives here only.

Every subcommand parses dataclasses with ``HfArgumentParser``; ``--config x.yaml`` supplies defaults
that command-line flags override.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from .config import RecordingArguments


@dataclass
class TrainJobArguments:
    """The embedded default job: a tiny ViT fine-tuned on scikit-learn's bundled digits (no download)."""

    output_dir: str = field(default="runs/quickstart", metadata={"help": "Where the Trainer and the run directory write."})
    num_rows: int = field(default=400, metadata={"help": "Training rows taken from the digits (at most 1797)."})
    num_train_epochs: float = field(default=5.0, metadata={"help": "Epochs."})
    hidden_size: int = field(default=64, metadata={"help": "Width of the tiny ViT."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per process."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate."})
    optim: str = field(default="adamw_torch", metadata={"help": "TrainingArguments.optim: adamw_torch or sgd."})
    weight_decay: float = field(default=0.01, metadata={"help": "Weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0 disables)."})
    seed: int = field(default=0, metadata={"help": "Seed of model initialisation and data order."})


def _parse(parser: HfArgumentParser, argv: list[str]):
    config = None
    if "--config" in argv:
        position = argv.index("--config")
        config = argv[position + 1]
        argv = argv[:position] + argv[position + 2 :]
    if config:
        parser.set_defaults(**yaml.safe_load(Path(config).read_text()))
    return parser.parse_args_into_dataclasses(args=argv)


def train(argv: list[str]) -> Path:
    from transformers import TrainingArguments

    from .examples import digits_dataset, tiny_vit
    from .recording import AccInfTrainer

    job, recording = _parse(HfArgumentParser((TrainJobArguments, RecordingArguments)), argv)
    recording.run_dir = recording.run_dir or str(Path(job.output_dir) / "accinf")
    args = TrainingArguments(
        output_dir=job.output_dir, num_train_epochs=job.num_train_epochs,
        per_device_train_batch_size=job.per_device_train_batch_size, learning_rate=job.learning_rate,
        optim=job.optim, weight_decay=job.weight_decay, max_grad_norm=job.max_grad_norm, seed=job.seed,
        use_cpu=not _has_accelerator(), report_to=[], save_strategy="no", logging_steps=10,
    )
    trainer = AccInfTrainer(
        model=tiny_vit(seed=job.seed, hidden_size=job.hidden_size), args=args, train_dataset=digits_dataset(job.num_rows, seed=job.seed),
        recording=recording,
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        print(summary(recording.run_dir))
    return Path(recording.run_dir)


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()


def summary(run_dir: str | Path) -> str:
    from .trajectory import RunReader

    run = RunReader(run_dir)
    manifest, trajectory = run.manifest, run.trajectory()
    sizes = trajectory.row_offsets.diff()
    files = [p for p in Path(run_dir).rglob("*") if p.is_file()]
    disk = sum(p.stat().st_size for p in files)
    lines = [
        f"run directory   {run_dir}  ({len(files)} files, {disk / 2**20:.2f} MiB)",
        f"model           {manifest.model_class.rsplit('.', 1)[-1]}  head '{manifest.head.module}' "
        f"(chosen: {', '.join(manifest.head.chosen)}; input {list(trajectory.head_input.shape[1:])})",
        f"optimizer       {manifest.optimizer_class}, {len(manifest.param_groups)} parameter groups, "
        f"max_grad_norm {manifest.training['max_grad_norm']}",
        f"steps           {manifest.num_steps} optimizer steps over {int(trajectory.epoch.max()) + 1} epochs, "
        f"{int(sizes.min())}-{int(sizes.max())} rows per step, world size {manifest.training['world_size']}",
        f"dataset         {manifest.dataset['length']} rows, fingerprint {manifest.dataset['fingerprint']}",
        f"learning rate   {float(trajectory.lr[:, 0].max()):.3g} peak, {float(trajectory.lr[-1, 0]):.3g} last",
        f"clipped steps   {int((trajectory.clip_coef < 1).sum())} of {manifest.num_steps}",
        f"training loss   {float(trajectory.loss[0]):.4f} first step, {float(trajectory.loss[-1]):.4f} last step",
        f"checkpoints     {manifest.checkpoints}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": "record a training run (default: tiny ViT on bundled digits)", "summary": "describe a run directory"}
    if not argv or argv[0] not in commands:
        parser = argparse.ArgumentParser(prog="hf-accinf", description="Trajectory-aware influence for HF classifiers.")
        parser.add_argument("command", choices=sorted(commands), help="; ".join(f"{k}: {v}" for k, v in commands.items()))
        parser.parse_args(argv[:1])
        return 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        train(rest)
    elif command == "summary":
        if len(rest) != 1:
            print("usage: hf-accinf summary RUN_DIR", file=sys.stderr)
            return 2
        print(summary(rest[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
