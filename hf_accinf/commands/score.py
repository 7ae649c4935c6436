"""``hf-accinf score``: every training row's influence on an evaluation loss, from a recorded run.

Works as a plain command and under ``accelerate launch`` (each process scores its shard of rows).
Every argument and input is checked before the long work (see :func:`hf_accinf.scoring.score_run`).
:func:`~hf_accinf.scoring.score_run` writes the score files; this command then writes ``<output_dir>/dataset``,
the training dataset with the score column (:func:`hf_accinf.data.columns.write_dataset_column`), and
records where the evaluation rows came from in ``scores.json``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from ..config import ScoreArguments
from ..devices import resolve_device
from ..inputs.sources import DataArguments, load_eval_data, load_model_factory, load_tokenizer, load_training_data
from ..trajectory.recorded_data import load_recorded_data
from ..errors import AccInfError
from .parsing import build_parser, parse
from .runner import run_command

NAME = "score"
DESCRIPTION = "estimate every training row's influence from a recorded run"


@dataclass
class LaunchArguments:
    cpu: bool = field(default=False, metadata={"help": "An alias of --device cpu (under accelerate launch on CPU the "
                                                       "processes then join one gloo group)."})


def make_parser(subparsers=None):
    return build_parser(NAME, DESCRIPTION, (ScoreArguments, DataArguments, LaunchArguments), subparsers)


def main(argv: list[str] | None = None, parser=None) -> int:
    from ..data.columns import write_dataset_column
    from ..engine import ShardContext
    from ..scoring import score_run

    args, data, launch = parse(parser or make_parser(), argv)[:3]
    if launch.cpu:
        if args.device not in ("auto", "cpu"):
            raise AccInfError(f"--cpu is an alias of --device cpu; it contradicts --device {args.device}: pass one.")
        args.device = "cpu"
    resolve_device(args.device)  # --device cuda without a GPU is refused before any data is read
    train, held_out, collate, tokenizer, evaluation = load_scoring_data(data, args.run_dir)
    model = load_model_factory(data.model)
    shard = ShardContext.from_accelerate(cpu=args.device == "cpu" or not torch.cuda.is_available())
    try:
        result = score_run(args, train, held_out, shard, collate_fn=collate, model=model, tokenizer=tokenizer,
                           evaluation_source=evaluation)
    finally:
        shard.close()
    if result is not None and args.num_partitions > 1:
        part = result.summary.extra["partition"]
        print(f"partition {args.partition} of {args.num_partitions} ({result.method}, {result.form} form; "
              f"{'rows %d:%d' % tuple(part['rows']) if part['combine'] == 'rows' else 'its steps, every row'}) in "
              f"{result.seconds:.2f} s; wrote its shard into {result.output_dir}. When every partition is written: "
              f"hf-accinf aggregate --output_dir {result.output_dir}")
    elif result is not None:
        if hasattr(train, "save_to_disk"):
            write_dataset_column(train, result.artifact())
        order = torch.argsort(result.scores)
        print(f"{result.method} ({args.removal} removal, {result.form} form, {result.schedule} schedule) on "
              f"{len(result.scores)} rows in {result.seconds:.2f} s; wrote {result.output_dir}")
        if result.verify is not None:
            check = result.verify
            print(f"verify on {check['k']} rows retrained out: Kendall tau {check['kendall_tau']:.3f}, Pearson r "
                  f"{check['pearson_r']:.3f}, sign agreement {check['sign_agreement']:.2f} (linearity ceiling tau "
                  f"{check['linearity_ceiling']['kendall_tau']:.3f})")
        if result.lds is not None:
            from ..scoring.lds import describe as describe_lds

            print("\n".join(describe_lds(result.lds)))
        trust = result.trust
        reference = (trust or {}).get("reference")
        if reference is not None:
            print(f"reference check: Kendall tau {reference['kendall_tau']:.3f}, Pearson r {reference['pearson_r']:.3f} "
                  f"against the exact {reference['reference']} on {reference['rows']} rows"
                  + (f" (LOW, below {reference['threshold']:g}: do not act on these scores)" if reference["low"] else ""))
        if trust is not None and "growth" in trust:
            verdict = f"({'EXPANSIVE, above' if trust['expansive'] else 'below'} {trust['threshold']:g})"
            if trust.get("kind") == "adjoint-probes" and trust.get("objective_growth") is not None:
                print(f"trust: the objective gradient grew {trust['objective_growth']:.3g}x backward over the run "
                      f"{verdict}; {trust['probes']} random probes {trust['growth']:.3g}x")
            else:
                print(f"trust: tangent growth {trust['growth']:.3g} over the run {verdict}")
        print(f"most harmful rows (removing them lowers eval loss): {order[:5].tolist()} "
              f"scores {[f'{v:.2e}' for v in result.scores[order[:5]].tolist()]}")
        print(f"most helpful rows: {order.flip(0)[:5].tolist()} "
              f"scores {[f'{v:.2e}' for v in result.scores[order.flip(0)[:5]].tolist()]}")
    return 0


def load_scoring_data(data: DataArguments, run_dir: str):
    """``(train, held_out, collate_fn, tokenizer, evaluation source)`` of a run: ``--train_data``/``--eval_data``,
    or the data source ``hf-accinf train`` recorded in the run's manifest."""
    from ..trajectory.schema import load_manifest

    manifest = load_manifest(run_dir)  # a wrong run directory is named before any data is read
    collate = None
    if data.train_data or data.eval_data:
        if not (data.train_data and data.eval_data):
            raise AccInfError("Pass both --train_data and --eval_data (or neither, for a run recorded by "
                              "`hf-accinf train`, whose data source the manifest records).")
        tokenizer = load_tokenizer(data.tokenizer)
        train, held_out = load_training_data(data), load_eval_data(data, tokenizer)
        evaluation = f"--eval_data {data.eval_data}" + (f" (split {data.eval_split})" if data.eval_split else "")
    else:
        tokenizer = load_tokenizer(data.tokenizer)
        train, held_out, collate = load_recorded_data(run_dir)
        if held_out is None:
            raise AccInfError(f"{run_dir} records no evaluation split: pass --train_data and --eval_data.")
        evaluation = _recorded_evaluation(manifest, run_dir)
    return train, held_out, collate, tokenizer, evaluation


def _recorded_evaluation(manifest, run_dir: str) -> str:
    """The evaluation rows reloaded from the run's recorded data source, in words."""
    dataset = manifest.dataset
    source = (dataset.get("source") if isinstance(dataset, dict) else getattr(dataset, "source", None)) or {}
    if not isinstance(source, dict):
        source = source.to_dict()
    split = (f"split '{source['eval_split']}'" if source.get("eval_split") else
             f"rows held out of split '{source.get('split', 'train')}' (split seed {source.get('split_seed', 0)})")
    return f"{source.get('dataset')}, {split}, as recorded in {run_dir}/manifest.json by hf-accinf train"


if __name__ == "__main__":
    sys.exit(run_command(sys.modules[__name__], sys.argv[1:]))
