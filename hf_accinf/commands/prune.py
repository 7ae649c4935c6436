"""``hf-accinf prune``: drop the most harmful rows of a scored dataset (or keep the top k) and write the
pruned dataset with its provenance, a card and a parquet copy (:mod:`hf_accinf.data.prune`).

``--check`` retrains the scored run by replay without the dropped rows (:func:`hf_accinf.scoring.lds.pruning_check`)
and prints the measured against the predicted change of the evaluation loss, recorded in the provenance too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..data.hub import write_scored_dataset
from ..data.prune import PruneArguments, prune_dataset
from ..errors import AccInfError
from ..inputs.sources import DataArguments
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
        if not self.output_dir:
            raise AccInfError("Pass --output_dir: where to write the pruned dataset.")


def make_parser(subparsers=None):
    return build_parser(NAME, DESCRIPTION, (ScoredDataArguments, PruneArguments, PruneOutputArguments, DataArguments),
                        subparsers)


def main(argv: list[str] | None = None, parser=None) -> int:
    from ..data.columns import read_provenance, with_provenance

    data, prune, output, sources = parse(parser or make_parser(), argv)
    dataset = data.load()
    checking = _check_inputs(dataset, prune, sources) if prune.check else None  # refused before any work
    pruned = prune_dataset(dataset, prune)
    if checking is not None:
        from ..scoring.lds import describe_pruning_check

        provenance = read_provenance(pruned)
        provenance["prune"]["check"] = report = checking(provenance["prune"]["dropped_rows"])
        pruned = with_provenance(pruned, provenance)
    target = write_scored_dataset(pruned, output.output_dir, overwrite=output.overwrite)
    print(f"kept {len(pruned)} of {len(dataset)} rows ({len(dataset) - len(pruned)} dropped by "
          f"{', '.join(prune.columns) or 'the score column'}); wrote {target}")
    if checking is not None:
        print("\n".join(describe_pruning_check(report)))
    return 0


def _check_inputs(dataset, prune: PruneArguments, sources: DataArguments):
    """Everything ``--check`` needs, loaded and checked now; returns ``check(dropped_rows) -> report``."""
    import torch
    from safetensors.torch import load_file

    from ..data.columns import read_provenance, score_columns
    from ..inputs.collate import eval_collator
    from ..inputs.sources import load_model_factory
    from ..scoring import artifacts
    from ..scoring.lds import pruning_check
    from ..trajectory import RunReader
    from ..trajectory.schema import content_hash
    from .score import load_scoring_data

    columns = prune.columns or score_columns(dataset)
    if len(columns) != 1:
        raise AccInfError(f"--check predicts the effect of one score column's rows; pass --columns with one of "
                          f"{columns}.")
    provenance = read_provenance(dataset)
    if "prune" in provenance:
        raise AccInfError("--check retrains the run the scores were made on: prune the scored dataset itself (score's "
                          "<output_dir>/dataset), not an already pruned one.")
    scores_dir = (provenance["columns"].get(columns[0]) or {}).get("scores_dir")
    if not scores_dir or not Path(scores_dir).is_dir():
        raise AccInfError(f"--check needs the scoring output of {columns[0]} (its scores.json names the run): pass "
                          "--scores_dir SCORES, or a dataset written by `hf-accinf score`.")
    summary = artifacts.read_summary(scores_dir)
    run_dir = summary.run.run_dir
    train, held_out, collate, tokenizer, _ = load_scoring_data(sources, run_dir)
    run = RunReader(run_dir)
    run.check_dataset(train)
    if len(dataset) != len(train):
        raise AccInfError(f"The dataset has {len(dataset)} rows, the run {len(train)}: --check needs the scored "
                          "training rows in their order.")
    expected = summary.evaluation.content_hash if summary.evaluation else None
    if expected and content_hash(held_out) != expected:
        raise AccInfError(f"The evaluation rows differ from those {scores_dir} was scored on: pass the --eval_data "
                          "given to score.")
    model = load_model_factory(sources.model)
    train_collate = eval_collator(run.build_model(model=model), tokenizer, collate)
    scores = torch.tensor(dataset.with_format("numpy")[columns[0]], dtype=torch.float64)
    query_file = Path(scores_dir) / artifacts.QUERY_SCORES_NAME
    per_query = load_file(str(query_file)) if query_file.is_file() else {}
    budget = int(float((summary.arguments or {}).get("memory_budget_gb", 4.0)) * 2**30)

    def check(dropped: list[int]) -> dict:
        return pruning_check(run, train, train_collate, held_out, scores, dropped, query_scores=per_query.get("scores"),
                             queries=per_query.get("queries"), seed=int((summary.arguments or {}).get("verify_seed", 0)),
                             eval_collate_fn=train_collate, memory_budget=budget, model=model)

    return check


if __name__ == "__main__":
    sys.exit(run_command(sys.modules[__name__], sys.argv[1:]))
