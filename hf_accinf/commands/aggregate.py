"""``hf-accinf aggregate --output_dir D``: combine the partitions of ``hf-accinf score --num_partitions P`` into
the normal set of scores (``scores.safetensors``, embeddings, ``scores.json``) and the dataset column, as ``score``
writes them for one job. Every partition must be there, scored with the same run and arguments
(:func:`hf_accinf.scoring.partitions.aggregate_partitions` names the missing ones)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .parsing import build_parser, parse
from .runner import run_command

NAME = "aggregate"
DESCRIPTION = "combine the partitions of `hf-accinf score --num_partitions P` into one set of scores"


@dataclass
class AggregateArguments:
    output_dir: str = field(metadata={"help": "The --output_dir every partition was scored into."})
    train_data: str | None = field(default=None, metadata={"help": (
        "The training dataset (load_from_disk directory), exactly as trained, for the dataset column (default: the "
        "run's recorded data source, for runs recorded by `hf-accinf train`; without either, no dataset column).")})
    train_split: str = field(default="train", metadata={"help": "Split of train_data when it is a DatasetDict."})
    overwrite: bool = field(default=False, metadata={"help": "Replace scores of other arguments already in output_dir."})


def make_parser(subparsers=None):
    return build_parser(NAME, DESCRIPTION, (AggregateArguments,), subparsers)


def _training_rows(args: AggregateArguments, run_dir: str):
    """The scored run's training rows for the dataset column, or ``None`` (said why) when there are none to read."""
    from ..inputs.sources import DataArguments, load_training_data
    from ..trajectory import RunReader
    from ..trajectory.recorded_data import load_recorded_data
    from ..trajectory.schema import load_manifest

    if args.train_data:
        train = load_training_data(DataArguments(train_data=args.train_data, train_split=args.train_split))
        if Path(run_dir).is_dir():
            RunReader(run_dir).check_dataset(train)
        return train
    if not Path(run_dir).is_dir() or not load_manifest(run_dir).dataset.source:
        print(f"no dataset column: the run ({run_dir}) is not here or records no data source; pass --train_data")
        return None
    return load_recorded_data(run_dir)[0]


def main(argv: list[str] | None = None, parser=None) -> int:
    from ..data.columns import write_dataset_column
    from ..scoring.partitions import aggregate_partitions

    (args,) = parse(parser or make_parser(), argv)[:1]
    artifact = aggregate_partitions(args.output_dir, args.overwrite)
    train = _training_rows(args, artifact.summary.run.run_dir)
    if train is not None and hasattr(train, "save_to_disk"):
        write_dataset_column(train, artifact)
    parts = artifact.summary.extra.get("partitions", {})
    order = torch.argsort(artifact.scores)
    print(f"{artifact.method}: {parts.get('count')} partitions ({parts.get('combine')}) combined into "
          f"{len(artifact.scores)} rows; wrote {artifact.path}")
    print(f"most harmful rows (removing them lowers eval loss): {order[:5].tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(sys.modules[__name__], sys.argv[1:]))
