"""``AccInfTrainer``: a ``transformers.Trainer`` that records its training trajectory while it trains as usual.

The subclass only does what a callback cannot: carry row indices through the dataloader
(:mod:`.capture`) and read the pre-clip gradient norm; it refuses, when it is built, runs that the
estimators cannot model. Everything else happens in :class:`~.recorder.TrajectoryRecorder`, and the
manifest is built by :mod:`.manifest`.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer

from ..config import RecordingArguments
from ..errors import AccInfError
from ..inputs.collate import LABEL_NAMES
from ..scope import select_head
from ..optimizers import MODELLED_HF_OPTIMS
from .capture import ROW_INDEX_KEY, HeadCapture, RowIndexCollator, RowIndexedDataset
from .recorder import TrajectoryRecorder

logger = logging.getLogger(__name__)

def check_loss(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    problem = getattr(config, "problem_type", None)
    num_labels = getattr(config, "num_labels", 2)
    if problem not in (None, "single_label_classification") or num_labels < 2:
        raise AccInfError(
            f"hf_accinf models single-label classification (cross-entropy); this model has problem_type="
            f"{problem!r} and num_labels={num_labels}."
        )


def check_training_labels(dataset) -> None:
    """Refuse multi-label or regression targets (a label vector or float labels) before anything is written."""
    try:
        row = dataset[0]
    except Exception:  # noqa: BLE001 - unreadable rows are checked batch by batch during training
        return
    if not isinstance(row, dict):
        return
    name = next((key for key in LABEL_NAMES if key in row), None)
    if name is None:
        return
    label = torch.as_tensor(row[name])
    if label.numel() != 1 or label.is_floating_point():
        raise AccInfError(
            f"The training labels ('{name}' of row 0: {label.dtype}, shape {tuple(label.shape)}) are not one class "
            "index per row: multi-label (problem_type='multi_label_classification') and regression targets are not "
            "modelled. hf_accinf supports single-label classification with integer class labels."
        )


def check_unsharded(trainer: Trainer) -> None:
    """Refuse FSDP and DeepSpeed runs when the trainer is built: the recorder reads the full parameters,
    gradients and optimizer state of the model in every process, which these engines shard."""
    from accelerate.utils import DistributedType

    distributed = getattr(trainer.accelerator, "distributed_type", None)
    if getattr(trainer, "is_deepspeed_enabled", False) or distributed == DistributedType.DEEPSPEED:
        engine = "DeepSpeed (ZeRO shards the optimizer state, then gradients and parameters, across processes, " \
                 "and steps with its own optimizer)"
    elif getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_fsdp_xla_enabled", False) \
            or distributed == DistributedType.FSDP:
        engine = "FSDP (each process holds a shard of the parameters, gradients and optimizer state)"
    else:
        return
    raise AccInfError(
        f"Recording a run trained with {engine} is not supported: the recorder reads every parameter, the head's "
        "gradient and the optimizer's state directly, for its checkpoints, its per-step record and replay. Train "
        "with DDP instead (`accelerate launch --multi_gpu` or torchrun without fsdp/deepspeed settings), which the "
        "recorder supports."
    )


class AccInfTrainer(Trainer):
    """A ``Trainer`` that records the trajectory into a run directory during an unchanged ``train()``.

    Example:

    >>> trainer = AccInfTrainer(model=model, args=args, train_dataset=train, recording=RecordingArguments(run_dir="run"))
    >>> trainer.train()  # doctest: +SKIP
    >>> RunReader("run").num_steps  # doctest: +SKIP
    """

    def __init__(self, *args, recording: RecordingArguments | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        check_unsharded(self)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.args.world_size != launched:
            raise AccInfError(
                f"This script was launched as {launched} processes, but they did not join one process group "
                f"(world size {self.args.world_size}): each would train alone and record a different run. "
                "On CPU pass TrainingArguments(use_cpu=True) so the processes join one gloo group."
            )
        self.recording = recording or RecordingArguments()
        self.run_dir = Path(self.recording.run_dir or Path(self.args.output_dir) / "accinf")
        self.head_selection = select_head(self.model, self.recording.modules, self.recording.head)
        check_loss(self.model)
        if self.train_dataset is not None:
            check_training_labels(self.train_dataset)
        if self.args.fp16:
            raise AccInfError(
                "fp16 mixed precision is not supported by the recorder: its loss scaling and skipped steps are "
                "not modelled. Train in float32 or with bf16=True."
            )
        optim = getattr(self.args.optim, "value", str(self.args.optim))
        if self.optimizer is None and optim not in MODELLED_HF_OPTIMS:
            warnings.warn(
                f"TrainingArguments(optim='{optim}') builds an optimizer that no hf_accinf method models: the run "
                f"cannot be scored. Use optim={' or '.join(repr(o) for o in MODELLED_HF_OPTIMS)} "
                "('adamw_torch' is the default).", UserWarning, stacklevel=2)
        self.capture = HeadCapture(self.head_selection.head)
        self.resuming = False
        self.last_grad_norm: torch.Tensor | float = math.nan  # a device tensor: read at the optimizer step
        self.add_callback(TrajectoryRecorder(self))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self.resuming = resume_from_checkpoint not in (None, False)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if ROW_INDEX_KEY not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ROW_INDEX_KEY]

    def get_train_dataloader(self):
        dataset, collator = self.train_dataset, self.data_collator
        if not hasattr(dataset, "__len__"):
            raise AccInfError("Recording needs a map-style training dataset with a length (not an IterableDataset).")
        if hasattr(dataset, "add_column"):
            self.train_dataset = dataset.add_column(ROW_INDEX_KEY, list(range(len(dataset))))
        else:
            self.train_dataset = RowIndexedDataset(dataset)
        self.data_collator = RowIndexCollator(collator)
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset, self.data_collator = dataset, collator

    def training_step(self, model, inputs, num_items_in_batch=None):
        rows = inputs.pop(ROW_INDEX_KEY)
        if "labels" not in inputs:
            raise AccInfError("Training batches must carry 'labels' for the recorder to model the loss.")
        self.capture.begin(rows, inputs["labels"])
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.capture.end()
        return loss

    def _clip_grad_norm(self, model):
        norm = super()._clip_grad_norm(model)
        self.last_grad_norm = norm.detach() if isinstance(norm, torch.Tensor) else float(norm)  # no sync here
        return norm
