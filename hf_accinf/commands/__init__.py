"""Subcommands of ``hf-accinf``: one module each, exposing ``make_parser()`` and ``main()``."""
