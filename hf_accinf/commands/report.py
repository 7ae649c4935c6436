"""``hf-accinf report``: Markdown and HTML with PNG plots of a scored dataset's columns
(:mod:`hf_accinf.report`)."""

from __future__ import annotations

from ..report import ReportArguments, build_report
from ._scored import ScoredDataArguments
from .parsing import build_parser, parse

DESCRIPTION = "Write report.md/report.html with plots: score distributions, top rows, agreement, trust, truth."


def make_parser(subparsers=None):
    return build_parser("report", DESCRIPTION, (ScoredDataArguments, ReportArguments), subparsers)


def run(argv: list[str] | None = None):
    data, args = parse(make_parser(), argv)
    report = build_report(data.load(), args)
    print(f"wrote {report.markdown}, {report.html} and {len(report.images)} plots")
    return report


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    import sys

    from ..cli import run_command

    sys.exit(run_command("report", sys.argv[1:]))
