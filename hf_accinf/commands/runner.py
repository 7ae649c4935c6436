"""The error policy and logging of every ``hf-accinf`` command, whether it runs under :mod:`hf_accinf.cli` or as
``python -m hf_accinf.commands.<name>``: a user error (:class:`~hf_accinf.errors.AccInfError`, a bad argument)
prints its message and exits 2; ``--debug`` shows the traceback instead. INFO logs of the package are shown
on the main process."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from types import ModuleType

from ..errors import AccInfError


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


def run_command(command: ModuleType, argv: list[str], debug: bool = False,
                parser: argparse.ArgumentParser | None = None) -> int:
    """Run ``command`` (a module of :mod:`hf_accinf.commands`) on ``argv`` under the error policy; ``parser``: its
    parser as registered with the ``hf-accinf`` command (default: its own)."""
    debug = debug or "--debug" in argv
    argv = [item for item in argv if item != "--debug"]
    configure_logging()
    try:
        return int(command.main(argv, parser) or 0)
    except SystemExit as exit_:  # --help, or argparse's own usage errors (already printed)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    except AccInfError as error:
        if debug:
            raise
        print(f"hf-accinf {command.NAME}: error: {error}", file=sys.stderr)
        return 2
