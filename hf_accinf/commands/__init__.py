"""One module per ``hf-accinf`` subcommand, each of one shape: ``NAME``, ``DESCRIPTION``,
``make_parser(subparsers=None)`` (a standalone parser, or registered as a subcommand of ``subparsers``) and
``main(argv=None, parser=None) -> int``; run as ``python -m hf_accinf.commands.<name>`` under the error policy.

:mod:`hf_accinf.cli` registers these modules; :mod:`.parsing` is what they share (dataclass parsing with
``--config x.yaml``), :mod:`.runner` the error policy and logging.
"""
