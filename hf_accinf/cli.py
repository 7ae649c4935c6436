"""The ``hf-accinf`` command: one subparser per command module of :mod:`hf_accinf.commands` (each registers
itself with ``make_parser(subparsers)``), the version, and the error policy of :mod:`.commands.runner`.
"""

from __future__ import annotations

import argparse
import sys

from transformers import HfArgumentParser

from .commands import aggregate, evaluate, prune, push, report, score, summary, train
from .commands.runner import run_command
from .version import __version__

COMMANDS = {command.NAME: command for command in (train, score, aggregate, evaluate, summary, prune, push, report)}


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The ``hf-accinf`` parser and its subparsers (``HfArgumentParser``s, one per command)."""
    parser = argparse.ArgumentParser(
        prog="hf-accinf", description="Trajectory-aware training-data influence for Hugging Face classifiers.",
        epilog="Each command has --help and takes --config x.yaml; --debug shows tracebacks.",
    )
    parser.add_argument("--version", action="version", version=f"hf-accinf {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=HfArgumentParser)
    subparsers.required = True
    for command in COMMANDS.values():
        command.make_parser(subparsers)
    return parser, subparsers


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [item for item in argv if item != "--debug"]
    parser, subparsers = build_parser()
    if not argv or argv[0] not in COMMANDS:  # --help, --version, or no or an unknown command
        try:
            parser.parse_args(argv[:1])
        except SystemExit as exit_:
            return int(exit_.code or 0)
        return 2
    return run_command(COMMANDS[argv[0]], argv[1:], debug, subparsers.choices[argv[0]])


if __name__ == "__main__":
    sys.exit(main())
