"""``hf-accinf score``: every training row's influence on an evaluation loss, from a recorded run.

Works as a plain command and under ``accelerate launch`` (each process scores its shard of rows).
Every argument and input is checked before the long work (see :func:`hf_accinf.scoring.score_run`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ScoreArguments
from ..data.loading import DataArguments, load_eval_data, load_model_factory, load_tokenizer, load_training_data
from ..errors import AccInfError
from .parsing import build_parser, parse

NAME = "score"
DESCRIPTION = "estimate every training row's influence from a recorded run"
QUICKSTART_JOB = "quickstart_job.json"  # written by the quickstart `hf-accinf train`


@dataclass
class LaunchArguments:
    cpu: bool = field(default=False, metadata={"help": "Under accelerate launch on CPU: join one gloo group."})


def make_parser(subparsers=None):
    return build_parser(NAME, DESCRIPTION, (ScoreArguments, DataArguments, LaunchArguments), subparsers)


def _quickstart_datasets(run_dir: str):
    from ..examples import digits_dataset

    job_file = Path(run_dir, QUICKSTART_JOB)
    if not job_file.is_file():
        raise AccInfError(
            f"{run_dir} was not recorded by the quickstart `hf-accinf train`: pass --train_data and --eval_data "
            "(datasets saved with Dataset.save_to_disk)."
        )
    job = json.loads(job_file.read_text())
    return digits_dataset(job["num_rows"], seed=job["seed"]), digits_dataset(400, seed=job["seed"], offset=job["num_rows"])


def main(argv: list[str] | None = None) -> int:
    from ..engine import ShardContext
    from ..scoring import score_run

    from ..trajectory.schema import load_manifest

    args, data, launch = parse(make_parser(), argv)[:3]
    load_manifest(args.run_dir)  # a wrong run directory is named before any data is read
    if data.train_data or data.eval_data:
        if not (data.train_data and data.eval_data):
            raise AccInfError("Pass both --train_data and --eval_data (or neither, for the quickstart run).")
        tokenizer = load_tokenizer(data.tokenizer)
        train, held_out = load_training_data(data), load_eval_data(data, tokenizer)
    else:
        tokenizer = load_tokenizer(data.tokenizer)
        train, held_out = _quickstart_datasets(args.run_dir)
    model = load_model_factory(data.model)
    shard = ShardContext.from_accelerate(cpu=launch.cpu or not torch.cuda.is_available())
    try:
        result = score_run(args, train, held_out, shard, model=model, tokenizer=tokenizer)
    finally:
        shard.close()
    if result is not None:
        order = torch.argsort(result.scores)
        print(f"{args.method} ({args.removal} removal, {result.form} form, {result.schedule} schedule) on "
              f"{len(result.scores)} rows in {result.seconds:.2f} s; wrote {result.output_dir}")
        if result.trust is not None:
            print(f"trust: tangent growth {result.trust['growth']:.3g} over the run "
                  f"({'EXPANSIVE, above' if result.trust['expansive'] else 'below'} {result.trust['threshold']:g})")
        print(f"most harmful rows (removing them lowers eval loss): {order[:5].tolist()} "
              f"scores {[f'{v:.2e}' for v in result.scores[order[:5]].tolist()]}")
        print(f"most helpful rows: {order.flip(0)[:5].tolist()} "
              f"scores {[f'{v:.2e}' for v in result.scores[order.flip(0)[:5]].tolist()]}")
    return 0


if __name__ == "__main__":
    from ..cli import run_command

    sys.exit(run_command(NAME, sys.argv[1:]))
