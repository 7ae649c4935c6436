"""``hf-accinf prune``: drop the most harmful rows of a scored dataset (or keep the top k) and write the
pruned dataset with its provenance, a card and a parquet copy (:mod:`hf_accinf.data.prune`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..data.hub import write_scored_dataset
from ..data.prune import PruneArguments, prune_dataset
from ._scored import ScoredDataArguments
from .parsing import build_parser, parse
from .runner import run_command

NAME = "prune"
DESCRIPTION = "Drop the most harmful fraction of rows (or keep the top k) by a score column or a mix of columns."


@dataclass
class PruneOutputArguments:
    output_dir: str = field(default=None, metadata={"help": "Where to write the pruned dataset (dataset/, data.parquet, README.md)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an output directory written earlier by hf_accinf."})

    def __post_init__(self) -> None:
        from ..errors import AccInfError

        if not self.output_dir:
            raise AccInfError("Pass --output_dir: where to write the pruned dataset.")


def make_parser(subparsers=None):
    return build_parser(NAME, DESCRIPTION, (ScoredDataArguments, PruneArguments, PruneOutputArguments), subparsers)


def main(argv: list[str] | None = None, parser=None) -> int:
    data, prune, output = parse(parser or make_parser(), argv)
    dataset = data.load()
    pruned = prune_dataset(dataset, prune)
    target = write_scored_dataset(pruned, output.output_dir, overwrite=output.overwrite)
    print(f"kept {len(pruned)} of {len(dataset)} rows ({len(dataset) - len(pruned)} dropped by "
          f"{', '.join(prune.columns) or 'the score column'}); wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(sys.modules[__name__], sys.argv[1:]))
