"""Run-directory layout and the versioned manifest: the one source of truth of a recorded run.

A run directory holds

    manifest.json                         this schema (JSON, written atomically)
    steps/steps-<start>-<stop>.safetensors per-step records of steps [start, stop)
    checkpoints/step-<t>/model.safetensors full model weights before step t (t = T: after training)
    checkpoints/step-<t>/optimizer.safetensors  the optimizer's state before step t, keyed
                                          "<parameter name>::<state key>", its parameter groups and
                                          each parameter's group in the metadata (schema >= 2)

The step segments hold, for every optimizer step ``t`` (DESIGN.md sections 1, 3, 4 and 6):
the global batch as dataset row indices with their per-row loss weights (all micro-batches of all
processes, repeated rows kept), the labels and the head inputs of those rows as the training forward
computed them, the learning rate of every parameter group, the pre-clip gradient norm and the clip
coefficient, and, densely, the head's parameters, clipped gradients and optimizer state before the step.
From schema 2 on they also hold what a deterministic replay of the whole model needs (DESIGN.md
section 6b): every micro-batch's row count and the random-generator state (CPU, and CUDA when
trained on a GPU) taken just before its forward, which decides its dropout masks. Schema-1 runs
are still read; replay refuses them. Schema 3 types the manifest's loss, training, dataset and
scheduler entries (:class:`LossSpec`, :class:`TrainingSpec`, :class:`DatasetSpec`,
:class:`SchedulerSpec`, the label smoothing stored once, in the loss); :meth:`Manifest.from_dict`
converts the dicts of schema 1 and 2.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import AccInfError
from ..io import write_atomic

SCHEMA_VERSION = 3
TYPED_SCHEMA_VERSION = 3  # first schema whose loss/training/dataset/scheduler entries are typed
REPLAY_SCHEMA_VERSION = 2  # first schema whose runs can be replayed
MANIFEST_NAME = "manifest.json"
STEPS_DIR = "steps"
CHECKPOINTS_DIR = "checkpoints"
MODEL_WEIGHTS_NAME = "model.safetensors"
OPTIMIZER_STATE_NAME = "optimizer.safetensors"
OPTIMIZER_KEY_SEPARATOR = "::"
STATUS_RECORDING = "recording"
STATUS_COMPLETE = "complete"

# Keys of a step segment.
STEP = "step"
EPOCH = "epoch"
ROW_OFFSETS = "row_offsets"
ROW_INDEX = "row_index"
ROW_WEIGHT = "row_weight"
LABELS = "labels"
HEAD_INPUT = "head_input"
LEARNING_RATE = "lr"
GRAD_NORM = "grad_norm"
CLIP_COEF = "clip_coef"
LOSS = "loss"
OPTIMIZER_STEP_COUNT = "optimizer_step_count"
PARAM_PREFIX = "param."
GRAD_PREFIX = "grad."
STATE_PREFIX = "state."
# Per micro-batch keys (schema >= 2): micro_offsets[t]:micro_offsets[t+1] are the micro-batches of
# step t, in the order of the step's rows (process 0's micro-batches first).
MICRO_OFFSETS = "micro_offsets"
MICRO_SIZE = "micro_size"
RNG_CPU = "rng_cpu"
RNG_CUDA = "rng_cuda"
ROW_KEYS = (ROW_INDEX, ROW_WEIGHT, LABELS, HEAD_INPUT)
MICRO_KEYS = (MICRO_SIZE, RNG_CPU, RNG_CUDA)
OFFSET_KEYS = (ROW_OFFSETS, MICRO_OFFSETS)



MIXED_PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
"""The autocast dtype of each ``TrainingArguments`` mixed-precision mode (accelerate autocasts the model's
forward to it; parameters, gradients and optimizer state stay float32)."""
MIXED_PRECISION_TOLERANCE = {"bf16": 1e-2, "fp16": 1e-3}
"""Largest relative error accepted where a mixed-precision run's own rounding enters what is recorded and
replayed (the measured loss weights, the head-gradient check, the replay of an interval). bf16 keeps 8
significand bits (unit roundoff 2**-8 ~ 3.9e-3), fp16 11 (2**-11 ~ 4.9e-4); one step's forward and backward
round every activation and logit gradient to it, so one rounding that differs anywhere (another kernel,
thread count or loss formulation) is of that size and is carried along an interval: a few unit roundoffs,
1e-2 (bf16) and 1e-3 (fp16), still one to two orders below a wrong row or dropout mask (1e-1 to 1 of the
interval's movement)."""
MIXED_PRECISION_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11}
"""Unit roundoff of each mode's autocast dtype: the relative error of the loss weights the recorder measures
from the rounded logit gradients, within which they are snapped to the Trainer's ``1 / k``
(:func:`~hf_accinf.trajectory.replay.exact_weights`; measured on a tiny BERT in bf16 with 2-row
micro-batches: up to 2e-3)."""


TORCH_HASH_ROWS = 4096


def content_hash(dataset) -> str | None:
    """A hash of a dataset's rows in order, stable across save/load, formats and fingerprints.

    A ``datasets.Dataset`` hashes its Arrow rows (column names, types and values; never the schema
    metadata, whose fingerprint changes on reload). A map-style torch dataset hashes the tensors of its
    rows (all of them up to :data:`TORCH_HASH_ROWS`, else that many evenly spaced rows, always the
    first and the last). ``None`` when the rows cannot be read as tensors, arrays or numbers, or read
    differently twice (random transforms).
    """
    import hashlib

    digest = hashlib.sha256()
    if hasattr(dataset, "with_format") and hasattr(dataset, "iter"):
        import pyarrow as pa

        for batch in dataset.with_format("arrow").iter(batch_size=8192):
            table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
            table = table.replace_schema_metadata(None).combine_chunks()
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            digest.update(sink.getvalue().to_pybytes())
        return digest.hexdigest()
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        return None
    import torch

    size = len(dataset)
    count = min(size, TORCH_HASH_ROWS)
    indices = torch.linspace(0, size - 1, count).round().long().unique().tolist() if size else []
    if indices and not _deterministic(dataset, indices[0]):
        return None  # random transforms: the same row reads differently each time
    digest.update(f"rows={size};sampled={len(indices)}".encode())
    for index in indices:
        try:
            row = dataset[index]
        except Exception:  # noqa: BLE001 - any failure means the rows cannot be read: no hash
            return None
        if not _digest_value(digest, row):
            return None
    return digest.hexdigest()


def _deterministic(dataset, index: int) -> bool:
    import hashlib

    digests = []
    for _ in range(2):
        digest = hashlib.sha256()
        try:
            readable = _digest_value(digest, dataset[index])
        except Exception:  # noqa: BLE001 - unreadable rows: no hash
            return False
        if not readable:
            return False
        digests.append(digest.digest())
    return digests[0] == digests[1]


def _digest_value(digest, value) -> bool:
    """Feed one row into ``digest``; ``False`` for a value that is not tensors, arrays, numbers or strings."""
    import numpy as np
    import torch

    if isinstance(value, dict):
        return all(digest.update(str(key).encode()) or _digest_value(digest, value[key]) for key in sorted(value))
    if isinstance(value, (tuple, list)):
        return all(_digest_value(digest, item) for item in value)
    if isinstance(value, (torch.Tensor, np.ndarray, int, float, bool, np.generic)):
        tensor = torch.as_tensor(value).detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return True
    if isinstance(value, (str, bytes)):
        digest.update(value.encode() if isinstance(value, str) else value)
        return True
    return False


def segment_name(start: int, stop: int) -> str:
    return f"steps-{start:08d}-{stop:08d}.safetensors"


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class ParamGroupSpec:
    """Hyperparameters of one optimizer parameter group, as the optimizer held them at the start."""

    index: int
    weight_decay: float
    initial_lr: float
    betas: list[float] | None = None
    eps: float | None = None
    momentum: float | None = None
    dampening: float | None = None
    nesterov: bool | None = None
    amsgrad: bool | None = None
    maximize: bool = False


@dataclass
class HeadSpec:
    """The head module whose inputs are recorded, and the chosen parameters inside it."""

    module: str
    parameters: dict[str, list[int]]
    chosen: list[str]
    input_shape: list[int]
    input_dtype: str
    param_groups: dict[str, int]


@dataclass
class LossSpec:
    """The training loss: cross-entropy over ``num_labels`` classes with label smoothing (DESIGN.md section 1)."""

    num_labels: int
    label_smoothing: float = 0.0
    kind: str = "cross_entropy"


@dataclass
class TrainingSpec:
    """The Trainer's settings that decide the recorded steps (batching, clipping, schedule length, precision)."""

    max_grad_norm: float = 0.0
    gradient_accumulation_steps: int = 1
    per_device_train_batch_size: int | None = None
    world_size: int = 1
    seed: int | None = None
    data_seed: int | None = None
    dataloader_drop_last: bool = False
    num_train_epochs: float | None = None
    max_steps: int | None = None
    optim: str | None = None
    learning_rate: float | None = None
    weight_decay: float | None = None
    bf16: bool = False
    fp16: bool = False

    @property
    def mixed_precision(self) -> bool:
        return bool(self.bf16 or self.fp16)

    @property
    def precision(self) -> str:
        """The run's mixed-precision mode: ``"bf16"``, ``"fp16"`` or ``"no"`` (float32; manifests before
        mixed precision was recorded read as ``"no"``)."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "no"


@dataclass
class DatasetSpec:
    """The training rows: how many, their identity, and where they came from (``source``: a
    ``DataSource`` as a dict, ``None`` when the Trainer got a dataset object)."""

    length: int
    fingerprint: str | None = None
    content_hash: str | None = None  # content_hash of the rows (None: not hashable)
    type: str | None = None
    source: dict[str, Any] | None = None


@dataclass
class SchedulerSpec:
    """The learning-rate scheduler (its class and the Trainer's schedule settings)."""

    class_name: str | None = None
    lr_scheduler_type: str | None = None
    warmup_steps: int | None = None


# The training settings that make two recordings the same run (resume refuses any difference).
IDENTITY_TRAINING_SETTINGS = ("max_grad_norm", "gradient_accumulation_steps", "per_device_train_batch_size",
                              "world_size", "dataloader_drop_last")


@dataclass
class Manifest:
    """Everything an estimator needs to know about a recorded run. Written by the recorder only."""

    model_class: str
    model_config: dict[str, Any]
    head: HeadSpec
    loss: LossSpec
    optimizer_class: str
    param_groups: list[ParamGroupSpec]
    scheduler: SchedulerSpec
    training: TrainingSpec
    dataset: DatasetSpec
    libraries: dict[str, str]
    checkpoint_every: int
    numerics: dict[str, Any] = field(default_factory=dict)  # threads, device, attention, TF32/cuDNN flags, precision
    schema_version: int = SCHEMA_VERSION
    status: str = STATUS_RECORDING
    num_steps: int = 0
    segments: list[list[int]] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        """The manifest of a ``manifest.json``; the untyped entries of schema 1 and 2 are converted."""
        data = dict(data)
        if int(data.get("schema_version", SCHEMA_VERSION)) < TYPED_SCHEMA_VERSION:
            data.update(_typed_entries(data))
        data["head"] = HeadSpec(**data["head"])
        data["param_groups"] = [ParamGroupSpec(**group) for group in data["param_groups"]]
        data["loss"] = LossSpec(**data["loss"])
        data["training"] = TrainingSpec(**data["training"])
        data["dataset"] = DatasetSpec(**data["dataset"])
        data["scheduler"] = SchedulerSpec(**data["scheduler"])
        return cls(**data)

    def identity(self) -> dict[str, Any]:
        """What makes two recordings the same run: model and optimizer class, the training rows (not their
        fingerprint, which changes on reload), the head and its chosen parameters (not the recorded input
        shape), the loss and the batching and clipping settings. Resume refuses a run whose identity
        differs; scoring records the parts that name the rows and the model."""
        head = {k: v for k, v in asdict(self.head).items() if k not in ("input_shape", "input_dtype")}
        dataset = {k: v for k, v in asdict(self.dataset).items() if k != "fingerprint"}
        training = {k: getattr(self.training, k) for k in IDENTITY_TRAINING_SETTINGS}
        return {"model_class": self.model_class, "optimizer_class": self.optimizer_class, "dataset": dataset,
                "head": head, "loss": asdict(self.loss), "training settings": training}

    def group_of(self, param_name: str) -> ParamGroupSpec:
        return self.param_groups[self.head.param_groups[param_name]]


def _known(spec: type, entries: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(spec)}
    return {k: v for k, v in entries.items() if k in names}


def _typed_entries(data: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 and 2 stored loss, training, dataset and scheduler as dicts (the label smoothing twice, the
    scheduler's class under ``class``): their entries in the schema-3 form."""
    loss, training = dict(data["loss"]), dict(data["training"])
    loss.setdefault("label_smoothing", training.get("label_smoothing", 0.0))
    scheduler = dict(data.get("scheduler") or {})
    scheduler["class_name"] = scheduler.pop("class", None)
    return {"loss": _known(LossSpec, loss), "training": _known(TrainingSpec, training),
            "dataset": _known(DatasetSpec, data["dataset"]), "scheduler": _known(SchedulerSpec, scheduler)}


def load_tensors(path: str | os.PathLike) -> dict:
    """``safetensors`` file contents; a damaged or truncated file is named with the fix."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise AccInfError(
            f"{path} is damaged or truncated ({error}); it cannot be read. Record the run again (or, for "
            "scores, score again), or restore the file from a copy."
        ) from None


def save_manifest(run_dir: Path, manifest: Manifest) -> None:
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True)
    write_atomic(Path(run_dir) / MANIFEST_NAME, lambda tmp: Path(tmp).write_text(text))


def load_manifest(run_dir: str | os.PathLike) -> Manifest:
    """Read and validate a manifest; refuse unknown schemas and unfinished runs with a clear message."""
    path = Path(run_dir) / MANIFEST_NAME
    if not path.is_file():
        raise AccInfError(
            f"{run_dir} is not an hf_accinf run directory: it has no {MANIFEST_NAME}. "
            "Record one with AccInfTrainer (or `hf-accinf train`) and pass its run directory."
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AccInfError(
            f"{path} is damaged (not valid JSON: {error}); the run directory cannot be read. Record the run "
            "again, or restore the file from a copy."
        ) from None
    version = data.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise AccInfError(
            f"{run_dir} was written with run-directory schema {version}, newer than this hf_accinf "
            f"understands ({SCHEMA_VERSION}). Upgrade hf_accinf (pip install -U hf_accinf)."
        )
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError) as error:
        raise AccInfError(f"{path} is damaged (missing or unknown entry {error}). Record the run again.") from None
    if manifest.status != STATUS_COMPLETE:
        raise AccInfError(
            f"{run_dir} is incomplete (status '{manifest.status}', {manifest.num_steps} steps recorded): "
            "the training run stopped before it finished. Resume it with "
            "trainer.train(resume_from_checkpoint=...) or record it again."
        )
    return manifest
