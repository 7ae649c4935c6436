"""Datasets and models named on the command line: ``load_from_disk`` directories, a tokenizer directory,
label and text columns, and a model factory ``package.module:factory``; shared by every command that reads data."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AccInfError


@dataclass
class DataArguments:
    """How a command reads the training and evaluation rows (datasets saved with ``Dataset.save_to_disk``)."""

    train_data: str | None = field(default=None, metadata={"help": "Training dataset (load_from_disk directory), exactly as trained."})
    eval_data: str | None = field(default=None, metadata={"help": "Evaluation dataset (load_from_disk directory)."})
    train_split: str = field(default="train", metadata={"help": "Split of train_data when it is a DatasetDict."})
    eval_split: str | None = field(default=None, metadata={"help": "Split of eval_data when it is a DatasetDict (default: validation, else test)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column of eval_data (default: label, label_ids or labels)."})
    text_columns: list[str] | None = field(
        default=None, metadata={"help": "Raw text columns of eval_data to tokenize with --tokenizer (one, or a pair)."}
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer directory (from_pretrained, offline): dynamic padding and --text_columns."}
    )
    max_length: int | None = field(default=None, metadata={"help": "Truncate tokenized text to this many tokens."})
    model: str | None = field(
        default=None,
        metadata={"help": "package.module:factory, a model class or a function returning the model, when the run's "
                          "class is not importable (e.g. defined in the training script)."},
    )

    def __post_init__(self) -> None:
        if self.text_columns and not self.tokenizer:
            raise AccInfError("--text_columns needs --tokenizer DIR (the tokenizer the model was trained with).")
        if self.text_columns and len(self.text_columns) > 2:
            raise AccInfError(f"--text_columns takes one column or a pair, got {self.text_columns}.")
        if self.model and ":" not in self.model:
            raise AccInfError(f"--model takes package.module:factory, got '{self.model}'.")
        for name in ("train_data", "eval_data", "tokenizer"):
            value = getattr(self, name)
            if value and not Path(value).exists():
                raise AccInfError(f"--{name} {value} does not exist.")


def load_tokenizer(path: str | None):
    if not path:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise AccInfError(f"Cannot load a tokenizer from {path} ({error}); pass a directory saved with save_pretrained.") from None


def load_split(path: str, split: str | None, defaults: tuple[str, ...] = ()):
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(path)
    except (FileNotFoundError, ValueError) as error:
        raise AccInfError(f"{path} is not a dataset saved with save_to_disk ({error}).") from None
    if isinstance(data, DatasetDict):
        names = [split] if split else [name for name in defaults if name in data]
        if not names or names[0] not in data:
            raise AccInfError(f"{path} holds the splits {list(data)}: choose one with --train_split/--eval_split.")
        data = data[names[0]]
    return data


def load_training_data(args: DataArguments):
    """The training rows as given (no preprocessing: they must equal the recorded ones)."""
    return load_split(args.train_data, args.train_split).with_format("torch")


def load_eval_data(args: DataArguments, tokenizer=None):
    """The evaluation rows, labels renamed from ``--label_column`` and text tokenized when asked."""
    data = load_split(args.eval_data, args.eval_split, ("validation", "test", "train"))
    if args.label_column:
        if args.label_column not in data.column_names:
            raise AccInfError(f"--label_column '{args.label_column}' is not a column of {args.eval_data}: {data.column_names}.")
        if args.label_column != "labels":
            data = data.remove_columns([c for c in ("labels",) if c in data.column_names]).rename_column(args.label_column, "labels")
    if args.text_columns:
        missing = [c for c in args.text_columns if c not in data.column_names]
        if missing:
            raise AccInfError(f"--text_columns {missing} are not columns of {args.eval_data}: {data.column_names}.")
        columns = args.text_columns

        def tokenize(batch):
            return tokenizer(*[batch[c] for c in columns], truncation=args.max_length is not None, max_length=args.max_length)

        data = data.map(tokenize, batched=True, desc="tokenizing the evaluation set")
    return data.with_format("torch")


def load_model_factory(spec: str | None):
    """``package.module:name`` -> the object (a model class or a factory), with errors that say what to do."""
    if not spec:
        return None
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise AccInfError(f"--model {spec}: cannot import {module_name} ({error}). Put it on PYTHONPATH.") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise AccInfError(f"--model {spec}: {module_name} has no attribute '{attribute}'.") from None
