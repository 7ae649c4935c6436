"""One module per ``hf-accinf`` subcommand, each with ``make_parser(subparsers=None)`` and ``main(argv) -> int``.

:mod:`hf_accinf.cli` is only the table of these modules; :mod:`.parsing` is what they share
(dataclass parsing with ``--config x.yaml``).
"""
