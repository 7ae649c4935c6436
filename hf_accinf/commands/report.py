"""``hf-accinf report``: Markdown and HTML with PNG plots of a scored dataset's columns
(:mod:`hf_accinf.report`)."""

from __future__ import annotations

import sys

from ..report import ReportArguments, build_report
from ._scored import ScoredDataArguments
from .parsing import build_parser, parse
from .runner import run_command

NAME = "report"
DESCRIPTION = "Write report.md/report.html with plots: score distributions, top rows, agreement, trust, truth."


def make_parser(subparsers=None):
    return build_parser(NAME, DESCRIPTION, (ScoredDataArguments, ReportArguments), subparsers)


def main(argv: list[str] | None = None, parser=None) -> int:
    data, args = parse(parser or make_parser(), argv)
    report = build_report(data.load(), args)
    print(f"wrote {report.markdown}, {report.html} and {len(report.images)} plots")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(sys.modules[__name__], sys.argv[1:]))
