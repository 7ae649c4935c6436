"""Shared by ``prune``, ``push`` and ``report``: parsing with ``--config x.yaml``, and the scored dataset to work on.

The input is a dataset directory (``save_to_disk``) plus, optionally, scoring output directories whose
scores are attached as columns with their provenance (:func:`hf_accinf.data.columns.attach_scores`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from ..data.columns import DATASET_DIR, attach_scores, load_scored_dataset
from ..errors import AccInfError


@dataclass
class ScoredDataArguments:
    """The scored dataset a command reads."""

    dataset: str | None = field(default=None, metadata={"help": "Dataset directory: score's <output_dir>/dataset, a prune "
                                                                "or report output, or any save_to_disk directory. Default: "
                                                                "<first --scores_dir>/dataset."})
    scores_dir: list[str] | None = field(default=None, metadata={"help": "Scoring output directories (scores.safetensors, "
                                                                         "scores.json) to attach as columns with provenance."})

    def load(self):
        if self.dataset is None and not self.scores_dir:
            raise AccInfError("Pass --dataset (a save_to_disk directory) or --scores_dir (a scoring output directory).")
        source = self.dataset or str(Path(self.scores_dir[0]) / DATASET_DIR)
        dataset = load_scored_dataset(source)
        for directory in self.scores_dir or []:
            dataset = attach_scores(dataset, directory)
        return dataset


def parse(parser: HfArgumentParser, argv: list[str] | None):
    """Dataclasses from ``argv``; ``--config x.yaml`` (or ``--config=x.yaml``) gives defaults the flags override."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            raise AccInfError(f"--config {path}: no such file.")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise AccInfError(f"--config {path} must be a YAML mapping of argument names to values.")
        unknown = sorted(set(values) - {action.dest for action in parser._actions})
        if unknown:
            raise AccInfError(f"--config {path}: unknown key(s) {unknown}; see --help for the argument names.")
        parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(args=rest)[: len(parser.dataclass_types)]  # less the --config namespace


def new_parser(name: str, description: str, dataclasses: tuple, subparsers=None) -> HfArgumentParser:
    """An ``HfArgumentParser`` for ``dataclasses``, standalone or as subcommand ``name`` of ``subparsers``."""
    if subparsers is not None:
        previous, subparsers._parser_class = subparsers._parser_class, HfArgumentParser  # argparse < 3.12 takes no parser_class
        try:
            parser = subparsers.add_parser(name, help=description, description=description, dataclass_types=dataclasses)
        finally:
            subparsers._parser_class = previous
    else:
        parser = HfArgumentParser(dataclasses, prog=f"hf-accinf {name}", description=description)
    parser.add_argument("--config", default=None, help="YAML file of argument defaults; flags given here override it.")
    return parser


def run_main(body, argv) -> int:
    """Run ``body(argv)``; a user error prints its message and returns 2."""
    import sys

    try:
        body(argv)
    except AccInfError as error:
        print(f"hf-accinf: error: {error}", file=sys.stderr)
        return 2
    return 0
