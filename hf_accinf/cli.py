"""The ``hf-accinf`` command: ``train`` records a run, ``score`` estimates influence, ``evaluate`` compares
scores with ground truth, ``summary`` describes a run directory. Parsing lives here only.

Every subcommand parses dataclasses with ``HfArgumentParser``; ``--config x.yaml`` supplies defaults
that command-line flags override.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser

from .config import RecordingArguments, ScoreArguments

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
    if recording.run_dir is None:  # the job's own directory: a rerun replaces it
        recording.run_dir, recording.overwrite = str(Path(job.output_dir) / "accinf"), True
    args = TrainingArguments(
        output_dir=job.output_dir, num_train_epochs=job.num_train_epochs,
        per_device_train_batch_size=job.per_device_train_batch_size, learning_rate=job.learning_rate,
        optim=job.optim, optim_args=job.optim_args, weight_decay=job.weight_decay, max_grad_norm=job.max_grad_norm, seed=job.seed,
        use_cpu=not _has_accelerator(), report_to=[], save_strategy="no", logging_steps=10,
    )
    trainer = AccInfTrainer(
        model=tiny_vit(seed=job.seed, hidden_size=job.hidden_size), args=args, train_dataset=digits_dataset(job.num_rows, seed=job.seed),
        recording=recording,
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        Path(recording.run_dir, QUICKSTART_JOB).write_text(json.dumps(asdict(job), indent=2))
        print(summary(recording.run_dir))
    return Path(recording.run_dir)


def _quickstart_datasets(run_dir: str):
    from .errors import AccInfError
    from .examples import digits_dataset

    job_file = Path(run_dir, QUICKSTART_JOB)
    if not job_file.is_file():
        raise AccInfError(
            f"{run_dir} was not recorded by `hf-accinf train`: pass --train_data and --eval_data "
            "(datasets saved with Dataset.save_to_disk)."
        )
    job = json.loads(job_file.read_text())
    train = digits_dataset(job["num_rows"], seed=job["seed"])
    held_out = digits_dataset(400, seed=job["seed"], offset=job["num_rows"])
    return train, held_out


@dataclass
class ScoreDataArguments:
    train_data: str | None = field(default=None, metadata={"help": "Training dataset (load_from_disk path); default: the quickstart's."})
    eval_data: str | None = field(default=None, metadata={"help": "Evaluation dataset (load_from_disk path); default: held-out digits."})
    cpu: bool = field(default=False, metadata={"help": "Under accelerate launch on CPU: join one gloo group."})


def score(argv: list[str]):
    from datasets import load_from_disk

    from .engine import ShardContext
    from .scoring import score_run

    args, data = _parse(HfArgumentParser((ScoreArguments, ScoreDataArguments)), argv)
    if data.train_data or data.eval_data:
        if not (data.train_data and data.eval_data):
            raise SystemExit("pass both --train_data and --eval_data")
        train, held_out = load_from_disk(data.train_data), load_from_disk(data.eval_data)
        train, held_out = train.with_format("torch"), held_out.with_format("torch")
    else:
        train, held_out = _quickstart_datasets(args.run_dir)
    shard = ShardContext.from_accelerate(cpu=data.cpu or not _has_accelerator())
    try:
        result = score_run(args, train, held_out, shard)
    finally:
        shard.close()
    if result is not None:
        order = torch.argsort(result.scores)
        print(f"{args.method} ({args.removal} removal, {result.schedule} schedule) on {len(result.scores)} rows "
              f"in {result.seconds:.2f} s; wrote {result.output_dir}")
        print(f"most harmful rows (removing them lowers eval loss): {order[:5].tolist()} "
              f"scores {[f'{v:.2e}' for v in result.scores[order[:5]].tolist()]}")
        print(f"most helpful rows: {order.flip(0)[:5].tolist()} "
              f"scores {[f'{v:.2e}' for v in result.scores[order.flip(0)[:5]].tolist()]}")
    return result


def _has_accelerator() -> bool:
    return torch.cuda.is_available()


def summary(run_dir: str | Path) -> str:
    from .modules import describe_scopes
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
        describe_scopes(run.build_model()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "train": "record a training run (default: tiny ViT on bundled digits)",
        "score": "estimate every training row's influence from a recorded run",
        "evaluate": "compare a score column with ground truth (RMSE, Kendall tau, Jaccard@k)",
        "summary": "describe a run directory",
    }
    if not argv or argv[0] not in commands:
        parser = argparse.ArgumentParser(prog="hf-accinf", description="Trajectory-aware influence for HF classifiers.")
        parser.add_argument("command", choices=sorted(commands), help="; ".join(f"{k}: {v}" for k, v in commands.items()))
        parser.parse_args(argv[:1])
        return 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        train(rest)
    elif command == "score":
        score(rest)
    elif command == "evaluate":
        from .evaluation.compare import main as evaluate

        return evaluate(rest)
    elif command == "summary":
        if len(rest) != 1:
            print("usage: hf-accinf summary RUN_DIR", file=sys.stderr)
            return 2
        print(summary(rest[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
