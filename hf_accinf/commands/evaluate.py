"""``hf-accinf evaluate SCORES TRUTH``: agreement of a score column with ground truth (RMSE, Kendall tau, Jaccard@k).

Sources are ``PATH[:NAME]`` as :mod:`hf_accinf.evaluation.compare` reads them (safetensors, saved dataset,
``.npy``, ``.pt``, ``.csv``), one value per training row, in the same row order.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from ..errors import AccInfError
from ..evaluation.compare import DEFAULT_PERCENTS, evaluate_sources, format_report
from .parsing import build_parser, parse
from .runner import run_command

NAME = "evaluate"
DESCRIPTION = "compare a score column with ground truth (RMSE, Kendall tau, Jaccard@k)"


@dataclass
class EvaluateArguments:
    scores: str | None = field(default=None, metadata={"help": "Estimated scores PATH[:NAME] (or the first positional)."})
    truth: str | None = field(default=None, metadata={"help": "Ground truth PATH[:NAME], same row order (or the second positional)."})
    percents: list[float] = field(default_factory=lambda: list(DEFAULT_PERCENTS),
                                  metadata={"help": "k of the two-tailed Jaccard@k%% (default: 10 30 50 70)."})
    json: bool = field(default=False, metadata={"help": "Print the metrics as JSON."})


def make_parser(subparsers=None):
    parser = build_parser(NAME, DESCRIPTION, (EvaluateArguments,), subparsers)
    parser.add_argument("sources", nargs="*", metavar="SOURCE", help="SCORES TRUTH, each PATH[:NAME]")
    return parser


def main(argv: list[str] | None = None, parser=None) -> int:
    arguments, extra = parse(parser or make_parser(), argv)
    sources = list(extra.sources)
    if len(sources) > 2:
        raise AccInfError(f"evaluate takes two sources, SCORES and TRUTH; got {len(sources)}: {sources}.")
    scores = sources[0] if sources else arguments.scores
    truth = sources[1] if len(sources) > 1 else arguments.truth
    if not (scores and truth):
        raise AccInfError("Pass the scores and the ground truth: hf-accinf evaluate SCORES TRUTH (each PATH[:NAME]).")
    percents = [int(k) if float(k).is_integer() else k for k in arguments.percents]
    report = evaluate_sources(scores, truth, percents)
    print(json.dumps(report, indent=2) if arguments.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(sys.modules[__name__], sys.argv[1:]))
