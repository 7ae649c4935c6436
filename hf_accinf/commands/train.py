"""``hf-accinf train``: fine-tune the user's model on the user's data from a YAML config, recording it.

The arguments are four dataclasses parsed by ``HfArgumentParser`` (:class:`ModelArguments`,
:class:`~hf_accinf.inputs.sources.DataSource`, ``TrainingArguments`` passed through unchanged, and
:class:`~hf_accinf.config.RecordingArguments`); ``--config x.yaml`` supplies defaults that flags
override. The data source goes into the manifest (``dataset.source``) so that ``score``, ``prune``,
``report`` and ``push`` reload the same rows with :func:`~hf_accinf.trajectory.recorded_data.load_recorded_data`.
Every input is checked (config keys, model directory, columns, labels) before the model loads.

>>> main(["--config", "configs/quickstart.yaml"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback, TrainingArguments

from ..config import RecordingArguments
from ..inputs import sources
from ..inputs.sources import DataSource
from ..errors import AccInfError
from .parsing import build_parser, parse
from .runner import run_command

logger = logging.getLogger("hf_accinf.train")

NAME = "train"
DESCRIPTION = "Fine-tune a model on your data from a YAML config (--config) and flags, recording its trajectory."


@dataclass
class ModelArguments:
    """Which model to train: pretrained weights, or a configuration built from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained model: a local directory, package:<module>/<dir> inside an installed package, "
                          "or a Hub id already in the local cache (offline)."},
    )
    model_type: str | None = field(
        default=None, metadata={"help": "Build a new model of this type from its config class (e.g. vit, bert, convnext)."}
    )
    model_config: dict | None = field(
        default=None, metadata={"help": "Config values to set (YAML mapping), e.g. dropout probabilities or sizes."}
    )
    num_labels: int | None = field(default=None, metadata={"help": "Number of classes (default: from the data)."})

    def __post_init__(self) -> None:
        if (self.model_name_or_path is None) == (self.model_type is None):
            raise AccInfError("Set exactly one of model_name_or_path (pretrained) and model_type (a new model).")
        if self.num_labels is not None and self.num_labels < 2:
            raise AccInfError(f"num_labels must be at least 2, got {self.num_labels}.")


def make_parser(subparsers: argparse._SubParsersAction | None = None) -> argparse.ArgumentParser:
    return build_parser(NAME, DESCRIPTION, (ModelArguments, DataSource, TrainingArguments, RecordingArguments),
                        subparsers)


def parse_arguments(argv: list[str], parser: argparse.ArgumentParser | None = None
                    ) -> tuple[ModelArguments, DataSource, TrainingArguments, RecordingArguments]:
    model_args, source, training, recording = parse(parser or make_parser(), argv)[:4]
    if source.dataset is None:
        raise AccInfError("Set dataset: embedded:digits, embedded:rotten_tomatoes, a data file or a save_to_disk directory.")
    return model_args, source, training, recording


# -- model ---------------------------------------------------------------------------------------
def load_config(model_args: ModelArguments):
    """The model's config (read from its directory, or new for ``model_type``) with ``model_config`` applied."""
    from transformers import AutoConfig

    if model_args.model_type is not None:
        try:
            config = AutoConfig.for_model(model_args.model_type)
        except ValueError as error:
            raise AccInfError(f"Unknown model_type {model_args.model_type!r}: {error}") from error
    else:
        spec = model_args.model_name_or_path
        if sources.looks_local(spec) and not Path(sources.resolve_path(spec)).expanduser().is_dir():
            raise AccInfError(f"Model directory {spec} does not exist: pass a directory written by save_pretrained, "
                              "package:<module>/<dir>, or set model_type to build a new model.")
        try:
            config = AutoConfig.from_pretrained(sources.resolve_path(spec))
        except OSError as error:
            raise AccInfError(f"Could not load the model config of {spec!r} (offline: local files and cache only): "
                              f"{error}") from error
    for key, value in (model_args.model_config or {}).items():
        if not hasattr(config, key):
            raise AccInfError(f"model_config key {key!r} is not an attribute of {type(config).__name__}.")
        setattr(config, key, value)
    return config


def model_class_for(source: DataSource):
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if source.modality == "text" else AutoModelForImageClassification


def build_model(model_args: ModelArguments, config, source: DataSource, seed: int):
    auto = model_class_for(source)
    torch.manual_seed(seed)  # the new head (and a new model) start from the run's seed
    if model_args.model_type is not None:
        return auto.from_config(config)
    return auto.from_pretrained(sources.resolve_path(model_args.model_name_or_path), config=config)


def set_labels(config, names: list[str] | None, num_labels: int) -> None:
    names = names or [str(i) for i in range(num_labels)]
    config.num_labels = num_labels
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
    config.problem_type = "single_label_classification"


def complete_source(source: DataSource, model_args: ModelArguments, config) -> DataSource:
    """Fill the preprocessing the model decides: tokenizer and length, or image size, channels, normalization."""
    if source.modality == "text":
        if model_args.model_type is not None and source.tokenizer is None:
            raise AccInfError("A new text model (model_type) needs tokenizer: a tokenizer directory.")
        source.tokenizer = source.tokenizer or model_args.model_name_or_path
        source.max_length = source.max_length or 128
    else:
        source.image_size = source.image_size or int(getattr(config, "image_size", 0) or 0) or None
        source.num_channels = source.num_channels or int(getattr(config, "num_channels", 3))
        if not source.image_size:
            raise AccInfError("Set image_size: the model config does not say which image size it takes.")
        if source.image_mean is None and model_args.model_name_or_path is not None:
            source.image_mean, source.image_std = _processor_normalization(model_args.model_name_or_path)
    if source.dataset and not source.dataset.startswith((sources.EMBEDDED_PREFIX, sources.PACKAGE_PREFIX)):
        if Path(source.dataset).expanduser().exists():
            source.dataset = str(Path(source.dataset).expanduser().resolve())
    return source


def _processor_normalization(spec: str) -> tuple[list[float] | None, list[float] | None]:
    path = Path(sources.resolve_path(spec)) / "preprocessor_config.json"
    if not path.is_file():
        return None, None
    import json

    values = json.loads(path.read_text())
    return values.get("image_mean"), values.get("image_std")


def num_labels_of(model_args: ModelArguments, names: list[str] | None, splits: list, column: str) -> int:
    if model_args.num_labels is not None:
        return model_args.num_labels
    if names:
        return len(names)
    return int(max(np.asarray(list(split[column]), dtype=np.int64).max() for split in splits)) + 1


def load_data(model_args: ModelArguments, source: DataSource, main_process: bool):
    """Rows, checked labels, model inputs: ``(train, eval or None, tokenizer or None, class names, num_labels)``."""
    if main_process:
        logger.info("loading data %s (%s split)", source.dataset, source.split)
    raw_train, raw_eval = sources.raw_splits(source)
    splits = [raw_train] + ([raw_eval] if raw_eval is not None else [])
    names = sources.label_names_of(source, raw_train)
    num_labels = num_labels_of(model_args, names, splits, source.label_column)
    tokenizer = sources.load_tokenizer(source.tokenizer) if source.modality == "text" else None
    labelled = [sources.labels_as_ids(split, source, names, num_labels) for split in splits]
    if main_process:
        logger.info("preprocessing %s rows (%s)", " + ".join(str(len(split)) for split in labelled),
                    f"tokenizer {source.tokenizer}, max_length {source.max_length}" if tokenizer is not None
                    else f"images resized to {source.image_size}x{source.image_size}, {source.num_channels} channel(s)")
    processed = [sources.preprocess(split, source, tokenizer) for split in labelled]
    return processed[0], processed[1] if len(processed) > 1 else None, tokenizer, names, num_labels


# -- progress ------------------------------------------------------------------------------------
class PhaseLog(TrainerCallback):
    """A line when training starts (rows, epochs, steps) and one with the time left after the first steps."""

    def __init__(self, rows: int, run_dir: str, probe_steps: int = 5):
        self.rows, self.run_dir, self.probe_steps = rows, run_dir, probe_steps
        self.started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            logger.info("training: %d rows x %g epochs = %d optimizer steps of %d rows, recording into %s",
                        self.rows, args.num_train_epochs, state.max_steps,
                        args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size, self.run_dir)
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step == min(self.probe_steps, state.max_steps - 1):
            pace = (time.perf_counter() - self.started) / state.global_step
            logger.info("%d of %d steps in %.1f s: about %.0f s of training left",
                        state.global_step, state.max_steps, pace * state.global_step, pace * (state.max_steps - state.global_step))


def _ensure_logging() -> None:
    package = logging.getLogger("hf_accinf")
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)
    if not package.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[hf-accinf] %(message)s"))
        package.addHandler(handler)


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.asarray(prediction.predictions).argmax(-1) == np.asarray(prediction.label_ids)).mean())}


# -- the command -----------------------------------------------------------------------------------
def train(argv: list[str], parser: argparse.ArgumentParser | None = None):
    """Parse, check, load, train with recording, evaluate; return the trainer."""
    from ..recording import AccInfTrainer

    model_args, source, training, recording = parse_arguments(argv, parser)
    _ensure_logging()
    main_process = training.process_index == 0
    config = load_config(model_args)
    complete_source(source, model_args, config)
    train_set, eval_set, tokenizer, names, num_labels = load_data(model_args, source, main_process)
    set_labels(config, names, num_labels)

    model = build_model(model_args, config, source, training.seed)
    if main_process:
        logger.info("model %s: %s with %.1fM parameters, %d classes", model_args.model_name_or_path or model_args.model_type,
                    type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6, num_labels)
    if recording.run_dir is None:  # the job's own directory: a rerun of the same config replaces it
        recording.run_dir, recording.overwrite = str(Path(training.output_dir) / "accinf"), True
    recording.data_source = source.to_dict()
    trainer = AccInfTrainer(
        model=model, args=training, train_dataset=train_set, eval_dataset=eval_set,
        data_collator=sources.collator_for(source, tokenizer), processing_class=tokenizer,
        compute_metrics=accuracy, recording=recording, callbacks=[PhaseLog(len(train_set), recording.run_dir)],
    )
    trainer.train()
    if eval_set is not None:
        if main_process:
            logger.info("evaluating on %d rows", len(eval_set))
        metrics = trainer.evaluate()
        if main_process:
            logger.info("evaluation accuracy %.3f, loss %.4f", metrics.get("eval_accuracy", float("nan")),
                        metrics.get("eval_loss", float("nan")))
    if main_process:
        logger.info("recorded %s; next: hf-accinf score --run_dir %s", recording.run_dir, recording.run_dir)
    return trainer


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    train(list(sys.argv[1:] if argv is None else argv), parser)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(sys.modules[__name__], sys.argv[1:]))
