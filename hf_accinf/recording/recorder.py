"""``TrajectoryRecorder``: the ``TrainerCallback`` that turns each optimizer step into one record of the run.

At every optimizer step it gathers the global batch from all processes (rows, per-row loss weights,
labels, head inputs, the random states of the micro-batches), checks it, and hands one step record to the
:class:`~.writer.RunWriter`; it saves sparse checkpoints (model and optimizer state) and the manifest. It
reads the Trainer through the narrow :class:`RecordingSource` protocol.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Protocol

import torch
from accelerate.utils import gather
from transformers import TrainerCallback

from ..config import RecordingArguments
from ..errors import AccInfError
from ..losses import clip_coefficient, cross_entropy_rows, target_distribution
from ..scope import HeadSelection
from ..trajectory import schema
from ..trajectory.replay import exact_weights
from ..trajectory.schema import Manifest
from ..optimizers import check_optimizer, optimizer_kind
from .capture import (HeadCapture, host_micro_batches, measure_row_weights, optimizer_checkpoint, replay_state,
                      stack_replay_states, to_host)
from .manifest import build_manifest, check_same_run
from .writer import RunWriter

logger = logging.getLogger(__name__)

LOGITS = "logits"  # gathered with the step's rows to compute the recorded loss (not itself recorded)


def base_optimizer(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)


def gather_rows(local: dict[str, torch.Tensor], accelerator) -> dict[str, torch.Tensor]:
    """Every process's ``local`` tensors concatenated along their first dimension in process order (on the
    CPU), by tensor gathers: the lengths first, then each key padded to the longest (NCCL gathers tensors on
    the process's device, gloo on the CPU)."""
    device = accelerator.device
    lengths = to_host([gather(torch.tensor([len(value) for value in local.values()], device=device))])[0]
    lengths = lengths.view(accelerator.num_processes, len(local)).tolist()
    padded = {}
    for column, (key, value) in enumerate(local.items()):
        longest = max(length[column] for length in lengths)
        buffer = torch.zeros((longest, *value.shape[1:]), dtype=value.dtype, device=device)
        buffer[:len(value)] = value
        padded[key] = buffer
    everything = dict(zip(padded, to_host(list(gather(padded).values()))))
    result = {}
    for column, (key, value) in enumerate(everything.items()):
        longest = len(value) // accelerator.num_processes
        result[key] = torch.cat([value[rank * longest:rank * longest + length[column]]
                                 for rank, length in enumerate(lengths)])
    return result


class RecordingSource(Protocol):
    """What the recorder reads of the Trainer (:class:`~.trainer.AccInfTrainer` provides it)."""

    accelerator: object  # accelerate.Accelerator: processes, unwrap_model, wait_for_everyone
    args: object  # transformers.TrainingArguments
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    train_dataset: object
    recording: RecordingArguments
    run_dir: Path
    head_selection: HeadSelection
    capture: HeadCapture
    resuming: bool
    last_grad_norm: torch.Tensor | float  # the pre-clip norm of the step (a tensor on the training device)


class TrajectoryRecorder(TrainerCallback):
    """Turns each optimizer step of an :class:`AccInfTrainer` into one record of the run directory."""

    def __init__(self, trainer: RecordingSource):
        self.trainer = trainer
        self.writer: RunWriter | None = None
        self.epoch: int | None = None
        self.checked_weights = False
        self.tolerance = 1e-3  # of the loss-weight fit and the head-gradient check; a mixed-precision run's own
        # rounding raises it (schema.MIXED_PRECISION_TOLERANCE, set in on_train_begin)
        self.weight_snap: float | None = None  # mixed precision: measured weights snapped to 1 / k within it

    @property
    def is_main(self) -> bool:
        return self.trainer.accelerator.is_main_process

    # -- lifecycle -------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        optimizer = base_optimizer(trainer.optimizer)
        check_optimizer(optimizer)
        manifest = build_manifest(trainer, optimizer)
        self.tolerance = max(1e-3, schema.MIXED_PRECISION_TOLERANCE.get(manifest.training.precision, 0.0))
        self.weight_snap = schema.MIXED_PRECISION_ROUNDOFF.get(manifest.training.precision)
        run_dir = trainer.run_dir
        if self.is_main:
            if trainer.resuming:
                if not (run_dir / schema.MANIFEST_NAME).is_file():
                    raise AccInfError(f"Resuming, but {run_dir} holds no recorded run to continue.")
                existing = Manifest.from_dict(json.loads((run_dir / schema.MANIFEST_NAME).read_text()))
                check_same_run(existing, manifest)
                self._check_resumed_model(run_dir, existing, state.global_step)
                self.writer = RunWriter(run_dir, existing)
                self.writer.truncate(state.global_step)
            else:
                if run_dir.exists() and any(run_dir.iterdir()):
                    if not trainer.recording.overwrite:
                        raise AccInfError(
                            f"The run directory {run_dir} is not empty. Choose another run_dir, pass "
                            "RecordingArguments(overwrite=True), or resume with train(resume_from_checkpoint=...)."
                        )
                    shutil.rmtree(run_dir)
                self.writer = RunWriter(run_dir, manifest)
                self.writer.save_manifest()
                self.writer.save_checkpoint(0, self._model_state(), self._optimizer_state())
        trainer.accelerator.wait_for_everyone()
        trainer.capture.attach()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch = int(math.floor(state.epoch + 1e-6)) if self.epoch is None else self.epoch + 1

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        record = self._step_record(state.global_step)
        if self.is_main:
            head = self.writer.manifest.head
            head.input_shape = list(record[schema.HEAD_INPUT].shape[1:])
            head.input_dtype = str(record[schema.HEAD_INPUT].dtype).replace("torch.", "")
            self.writer.append(record)

    def on_step_end(self, args, state, control, **kwargs):
        if self.is_main and state.global_step % self.trainer.recording.checkpoint_every == 0:
            self.writer.flush()
            self.writer.save_checkpoint(state.global_step, self._model_state(), self._optimizer_state())

    def on_save(self, args, state, control, **kwargs):
        if self.is_main:
            self.writer.flush()
            # A run checkpoint at every Trainer checkpoint: a resume from it can be verified (_check_resumed_model),
            # with the optimizer state, since replay starts from any run checkpoint (the end of training included).
            self.writer.save_checkpoint(state.global_step, self._model_state(), self._optimizer_state())

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.capture.detach()
        if self.is_main:
            self.writer.flush()
            self.writer.save_checkpoint(state.global_step, self._model_state(), self._optimizer_state())
            self.writer.finish()
        self.trainer.accelerator.wait_for_everyone()

    def _check_resumed_model(self, run_dir: Path, existing: Manifest, step: int) -> None:
        """The resumed model must equal the run's own weights before ``step`` (transformers may restore a
        checkpoint only in part, e.g. when key names differ, and training would silently continue elsewhere)."""
        if step not in existing.checkpoints:
            logger.warning("The run holds no checkpoint at the resume step %d: the resumed weights cannot be "
                           "compared with the recorded ones.", step)
            return
        path = run_dir / schema.CHECKPOINTS_DIR / schema.checkpoint_dir_name(step) / schema.MODEL_WEIGHTS_NAME
        recorded = schema.load_tensors(path)
        current = self._model_state()
        differing = [
            name for name, value in current.items()
            if name in recorded and value.is_floating_point()
            and not torch.allclose(value.detach().cpu().to(recorded[name].dtype), recorded[name], rtol=1e-5, atol=1e-6)
        ]
        missing = sorted(set(recorded) - set(current))
        if differing or missing:
            raise AccInfError(
                f"The resumed model does not match the run's own weights at step {step}: {len(differing)} tensors "
                f"differ (e.g. {differing[:3]}), {len(missing)} missing. The Trainer checkpoint was not restored "
                "completely (its key names may not match this model class). Load the weights yourself, e.g. from "
                f"{path}, or record a new run; continuing would record a different training."
            )

    # -- one optimizer step ------------------------------------------------------------------------
    def _step_record(self, step: int) -> dict:
        trainer = self.trainer
        world = trainer.accelerator.num_processes
        smoothing = trainer.args.label_smoothing_factor
        optimizer = base_optimizer(trainer.optimizer)
        state_keys = optimizer_kind(type(optimizer).__name__).state_keys
        head, per_param = list(trainer.head_selection.head.named_parameters()), 2 + len(state_keys)
        head_tensors = [tensor for _, param in head for tensor in
                        (param, param.grad, *(optimizer.state.get(param, {}).get(key) for key in state_keys))]
        # One host transfer for the step: the micro-batches' captures and the head's parameters, gradients and
        # optimizer state (asynchronous on CUDA, one synchronisation).
        norm = trainer.last_grad_norm
        norm_tensor = norm if isinstance(norm, torch.Tensor) else None
        batches, (*head_tensors, norm_tensor) = host_micro_batches(trainer.capture.take(), *head_tensors, norm_tensor)
        norm = float(norm_tensor) if norm_tensor is not None else float(norm)
        self._check_finite(step, [batch.logits for batch in batches], head_tensors[1::per_param])
        local = {schema.ROW_INDEX: torch.cat([batch.rows for batch in batches]),
                 schema.ROW_WEIGHT: torch.cat([measure_row_weights(batch, smoothing, self.tolerance) / world
                                               for batch in batches]),
                 schema.LABELS: torch.cat([batch.labels for batch in batches]),
                 schema.HEAD_INPUT: torch.cat([batch.head_input for batch in batches]),
                 LOGITS: torch.cat([batch.logits for batch in batches]),
                 **stack_replay_states([replay_state(batch) for batch in batches])}
        if self.weight_snap is not None:  # rounded logit gradients: weights measured to the unit roundoff only
            local[schema.ROW_WEIGHT] = exact_weights(local[schema.ROW_WEIGHT], self.weight_snap)
        gathered = gather_rows(local, trainer.accelerator) if world > 1 else local
        if not self.is_main:
            return {}
        rows, weights, labels, head_input, logits = (gathered[key] for key in (
            schema.ROW_INDEX, schema.ROW_WEIGHT, schema.LABELS, schema.HEAD_INPUT, LOGITS))
        max_norm = trainer.args.max_grad_norm
        clip = clip_coefficient(norm, max_norm)
        losses = cross_entropy_rows(logits.double(), target_distribution(labels, logits.shape[-1], smoothing))
        record = {
            schema.STEP: torch.tensor(step),
            schema.EPOCH: torch.tensor(self.epoch or 0),
            schema.ROW_INDEX: rows.long(),
            schema.ROW_WEIGHT: weights.double(),
            schema.LABELS: labels.long(),
            schema.HEAD_INPUT: head_input,
            schema.LEARNING_RATE: torch.tensor([float(g["lr"]) for g in optimizer.param_groups], dtype=torch.float64),
            schema.GRAD_NORM: torch.tensor(norm, dtype=torch.float64),
            schema.CLIP_COEF: torch.tensor(clip, dtype=torch.float64),
            schema.LOSS: (weights.double() * losses).sum(),  # weights are global: they sum over all processes
            **{key: gathered[key] for key in schema.MICRO_KEYS if key in gathered},
        }
        step_count = 0
        for index, (name, param) in enumerate(head):
            value, grad, *states = head_tensors[index * per_param:(index + 1) * per_param]
            record[schema.PARAM_PREFIX + name] = value
            record[schema.GRAD_PREFIX + name] = grad if grad is not None else torch.zeros_like(value)
            step_count = int(optimizer.state.get(param, {}).get("step", 0))
            for key, state in zip(state_keys, states):
                record[f"{schema.STATE_PREFIX}{name}.{key}"] = state if state is not None else torch.zeros_like(value)
        record[schema.OPTIMIZER_STEP_COUNT] = torch.tensor(step_count)
        if not self.checked_weights:
            self._check_weights(record, world)
            self.checked_weights = True
        return record

    def _check_finite(self, step: int, logits: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
        """Stop at the first non-finite learning rate, logit or head gradient (all processes see the same);
        ``logits`` and the head's ``grads`` on the CPU."""
        optimizer = base_optimizer(self.trainer.optimizer)
        problems = []
        if not all(math.isfinite(float(group["lr"])) for group in optimizer.param_groups):
            problems.append("learning rate")
        if not all(torch.isfinite(value).all() for value in logits):
            problems.append("loss (logits)")
        if not all(torch.isfinite(grad).all() for grad in grads if grad is not None):
            problems.append("head gradient")
        if problems:
            if self.is_main:
                self.writer.flush()
            raise AccInfError(
                f"Training produced a non-finite {' and '.join(problems)} at optimizer step {step}: the run diverged "
                "and cannot be scored. The run directory keeps the steps before it, marked incomplete. Lower the "
                "learning rate, enable clipping (max_grad_norm) or fix the data, then record again."
            )

    def _check_weights(self, record: dict, world: int) -> None:
        """The recorded rows, weights and head inputs must reproduce the head gradient the optimizer saw."""
        head = self.trainer.head_selection.head
        params = {name: p.detach().double().cpu() for name, p in head.named_parameters()}
        params = {name: p.requires_grad_(True) for name, p in params.items()}
        was_training = head.training
        head.eval()
        try:
            replica = copy.deepcopy(head).cpu().double()
            logits = torch.func.functional_call(replica, params, (record[schema.HEAD_INPUT].double(),))
        finally:
            head.train(was_training)
        target = target_distribution(record[schema.LABELS], logits.shape[-1], self.trainer.args.label_smoothing_factor)
        losses = cross_entropy_rows(logits, target)
        total = (record[schema.ROW_WEIGHT] * losses).sum()
        expected = torch.autograd.grad(total, list(params.values()), allow_unused=True)
        clip = record[schema.CLIP_COEF]
        for (name, _), grad in zip(params.items(), expected):
            if grad is None:
                continue
            observed = record[schema.GRAD_PREFIX + name].double() / clip
            if (observed - grad).norm() > self.tolerance * max(grad.norm().item(), 1e-8) + 1e-6:
                raise AccInfError(
                    f"Replaying the head on the recorded inputs does not reproduce the gradient of '{name}' that the "
                    "optimizer used. The head must be a deterministic function of one input (no dropout inside it; "
                    "choose e.g. 'classifier.out_proj'), and the loss the model's own cross-entropy."
                )

    def _model_state(self) -> dict[str, torch.Tensor]:
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        return {name: tensor for name, tensor in model.state_dict().items()}

    def _optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        return optimizer_checkpoint(model, base_optimizer(self.trainer.optimizer))
