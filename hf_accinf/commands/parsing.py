"""Parsing shared by the subcommands: dataclasses through ``HfArgumentParser``, defaults from ``--config x.yaml``.

Command-line flags override the YAML file; a YAML key that is no option of the command is refused by
name (with the closest option), and a dataclass check that fails is reported as an
:class:`~hf_accinf.errors.AccInfError` (the CLI prints it and exits 2).
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from ..errors import AccInfError

CONFIG_HELP = "YAML file of option values (keys are the options below, without dashes); flags given here override it."


def build_parser(name: str, description: str, dataclass_types: tuple, subparsers=None) -> HfArgumentParser:
    """An ``HfArgumentParser`` for ``hf-accinf <name>`` (or a subparser of ``subparsers``) with ``--config``."""
    if subparsers is not None:  # made with parser_class=HfArgumentParser (hf_accinf.cli.build_parser)
        parser = subparsers.add_parser(name, help=description, description=description, dataclass_types=dataclass_types)
    else:
        parser = HfArgumentParser(dataclass_types, prog=f"hf-accinf {name}", description=description)
    parser.add_argument("--config", metavar="YAML", default=None, help=CONFIG_HELP)
    return parser


def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--config x.yaml`` or ``--config=x.yaml`` out of ``argv``."""
    config, rest, index = None, [], 0
    while index < len(argv):
        item = argv[index]
        if item == "--config" or item.startswith("--config="):
            if config is not None:
                raise AccInfError(f"--config given 2 times ({config} and another): pass one YAML file.")
        if item == "--config":
            if index + 1 >= len(argv):
                raise AccInfError("--config needs a YAML file: --config x.yaml")
            config, index = argv[index + 1], index + 2
            continue
        if item.startswith("--config="):
            config = item.split("=", 1)[1]
        else:
            rest.append(item)
        index += 1
    return config, rest


def load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The YAML mapping of ``path``, every key checked against the parser's options."""
    file = Path(path)
    if not file.is_file():
        raise AccInfError(f"The config file {path} does not exist.")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise AccInfError(f"The config file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise AccInfError(f"The config file {path} must hold a mapping of option names to values, not {type(data).__name__}.")
    known = {action.dest for action in parser._actions if action.dest not in ("help", "config")}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise AccInfError(f"Unknown key '{key}' in {path}: it is no option of this command.{hint} "
                              f"See --help for the options.")
    return data


def parse(parser: HfArgumentParser, argv: list[str] | None) -> tuple:
    """The command's dataclasses (and a namespace of its extra arguments, if it has any beyond ``--config``)."""
    config, argv = split_config(list(argv or []))
    if config:
        parser.set_defaults(**load_config(config, parser))
    try:
        outputs = parser.parse_args_into_dataclasses(args=argv)
    except (ValueError, TypeError) as error:  # dataclass checks and unused arguments
        raise AccInfError(str(error)) from None
    extra = outputs[-1] if isinstance(outputs[-1], argparse.Namespace) else None
    if extra is not None:
        vars(extra).pop("config", None)
        if not vars(extra):
            return tuple(outputs[:-1])
    return tuple(outputs)
