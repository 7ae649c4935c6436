"""The ``hf-accinf`` command: a table of subcommands (one module each, see :mod:`hf_accinf.commands`), the
version, and the error policy: a user error (:class:`~hf_accinf.errors.AccInfError`, a bad argument) prints
its message and exits 2; ``--debug`` shows the traceback instead. INFO logs of the package are shown on
the main process.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from . import __version__
from .errors import AccInfError

COMMANDS = {
    "train": "hf_accinf.commands.train",
    "score": "hf_accinf.commands.score",
    "evaluate": "hf_accinf.commands.evaluate",
    "summary": "hf_accinf.commands.summary",
    "prune": "hf_accinf.commands.prune",
    "push": "hf_accinf.commands.push",
    "report": "hf_accinf.commands.report",
}


def load_command(name: str):
    """The module of subcommand ``name``, imported now; ``None`` when this installation lacks it."""
    path = COMMANDS[name]
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as error:
        if error.name == path:
            return None
        raise


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (it may be replaced, e.g. under pytest)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging() -> None:
    """INFO for hf_accinf on the main process (WARNING on the others), once."""
    main_process = os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"
    logger = logging.getLogger("hf_accinf")
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[hf-accinf] %(message)s"))
        logger.addHandler(handler)


def run_command(name: str, argv: list[str], debug: bool = False) -> int:
    """Run subcommand ``name`` under the error policy."""
    module = load_command(name)
    if module is None:
        print(f"hf-accinf {name} is not available in this installation ({COMMANDS[name]} is missing).", file=sys.stderr)
        return 2
    debug = debug or "--debug" in argv
    argv = [item for item in argv if item != "--debug"]
    configure_logging()
    try:
        return int(module.main(argv) or 0)
    except SystemExit as exit_:  # --help, or argparse's own usage errors (already printed)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    except AccInfError as error:
        if debug:
            raise
        print(f"hf-accinf {name}: error: {error}", file=sys.stderr)
        return 2


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-accinf", description="Trajectory-aware training-data influence for Hugging Face classifiers.",
        epilog="Each command has --help and takes --config x.yaml; --debug shows tracebacks.",
    )
    parser.add_argument("--version", action="version", version=f"hf-accinf {__version__}")
    lines = []
    for name in COMMANDS:
        module = load_command(name)
        lines.append(f"{name}: {module.DESCRIPTION if module else '(not available)'}")
    parser.add_argument("command", choices=list(COMMANDS), help="; ".join(lines))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [item for item in argv if item != "--debug"]
    if not argv or argv[0] not in COMMANDS:
        try:
            _top_parser().parse_args(argv[:1] or [])
        except SystemExit as exit_:
            return int(exit_.code or 0)
        return 2
    return run_command(argv[0], argv[1:], debug)


if __name__ == "__main__":
    sys.exit(main())
