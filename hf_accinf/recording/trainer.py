"""``AccInfTrainer``: a ``transformers.Trainer`` that records its training trajectory while it trains as usual.

The subclass only does what a callback cannot: carry row indices through the dataloader
(:mod:`.capture`) and read the pre-clip gradient norm. Everything else happens in
:class:`TrajectoryRecorder`, a ``TrainerCallback`` that, at every optimizer step, gathers the global
batch from all processes and hands one step record to the :class:`~.writer.RunWriter`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import shutil
import warnings
from pathlib import Path

import torch
from accelerate.utils import gather_object
from torch import nn
from transformers import Trainer, TrainerCallback

from .. import __version__
from ..config import RecordingArguments
from ..errors import AccInfError
from ..losses import clip_coefficient, cross_entropy_rows, target_distribution
from ..modules import select_head
from ..trajectory import schema
from ..trajectory.schema import HeadSpec, Manifest, ParamGroupSpec
from .capture import (
    ROW_INDEX_KEY,
    HeadCapture,
    RowIndexCollator,
    RowIndexedDataset,
    measure_row_weights,
    optimizer_checkpoint,
    replay_state,
    stack_replay_states,
)
from .writer import RunWriter

logger = logging.getLogger(__name__)

OPTIMIZER_STATE_KEYS = {"SGD": ("momentum_buffer",), "Adam": ("exp_avg", "exp_avg_sq"), "AdamW": ("exp_avg", "exp_avg_sq")}


def _library_versions() -> dict[str, str]:
    import accelerate
    import datasets
    import safetensors
    import transformers

    return {
        "hf_accinf": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
        "safetensors": safetensors.__version__,
    }


def base_optimizer(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    name = type(optimizer).__name__
    if name not in schema.SUPPORTED_OPTIMIZERS:
        raise AccInfError(
            f"The estimators do not model the optimizer {name}. Train with optim='adamw_torch' (the default), "
            "'adamw_torch_fused' or 'sgd' (TrainingArguments.optim), or pass a torch.optim SGD/Adam/AdamW."
        )
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("maximize") or group.get("dampening", 0):
            raise AccInfError(
                f"{name} with amsgrad, maximize or dampening is not modelled by the estimators; turn them off."
            )


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
    name = next((key for key in ("labels", "label", "label_ids") if key in row), None)
    if name is None:
        return
    label = torch.as_tensor(row[name])
    if label.numel() != 1 or label.is_floating_point():
        raise AccInfError(
            f"The training labels ('{name}' of row 0: {label.dtype}, shape {tuple(label.shape)}) are not one class "
            "index per row: multi-label (problem_type='multi_label_classification') and regression targets are not "
            "modelled. hf_accinf supports single-label classification with integer class labels."
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
        if self.optimizer is None and optim not in schema.MODELLED_HF_OPTIMS:
            warnings.warn(
                f"TrainingArguments(optim='{optim}') builds an optimizer that no hf_accinf method models: the run "
                f"cannot be scored. Use optim={' or '.join(repr(o) for o in schema.MODELLED_HF_OPTIMS)} "
                "('adamw_torch' is the default).", UserWarning, stacklevel=2)
        self.capture = HeadCapture(self.head_selection.head)
        self.resuming = False
        self.last_grad_norm: float = math.nan
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
        self.last_grad_norm = float(norm)
        return norm


class TrajectoryRecorder(TrainerCallback):
    """Turns each optimizer step of an :class:`AccInfTrainer` into one record of the run directory."""

    def __init__(self, trainer: AccInfTrainer):
        self.trainer = trainer
        self.writer: RunWriter | None = None
        self.epoch: int | None = None
        self.checked_weights = False

    @property
    def is_main(self) -> bool:
        return self.trainer.accelerator.is_main_process

    # -- lifecycle -------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        optimizer = base_optimizer(trainer.optimizer)
        check_optimizer(optimizer)
        manifest = self._build_manifest(optimizer)
        run_dir = trainer.run_dir
        if self.is_main:
            if trainer.resuming:
                if not (run_dir / schema.MANIFEST_NAME).is_file():
                    raise AccInfError(f"Resuming, but {run_dir} holds no recorded run to continue.")
                existing = Manifest.from_dict(json.loads((run_dir / schema.MANIFEST_NAME).read_text()))
                self._check_same_run(existing, manifest)
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
        batches = list(trainer.capture.take())
        self._check_finite(step, [batch.logits for batch in batches])
        local = []
        for batch in batches:
            weights = measure_row_weights(batch, smoothing) / world
            local.append((batch.rows, weights, batch.labels, batch.head_input, batch.logits, replay_state(batch)))
        parts = gather_object([local]) if world > 1 else [local]
        micro = [item for process in parts for item in process]
        rows, weights, labels, head_input, logits = (torch.cat([m[k] for m in micro]) for k in range(5))
        if not self.is_main:
            return {}

        optimizer = base_optimizer(trainer.optimizer)
        state_keys = OPTIMIZER_STATE_KEYS[type(optimizer).__name__]
        norm = trainer.last_grad_norm
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
            **stack_replay_states([m[5] for m in micro]),
        }
        step_count = 0
        for name, param in trainer.head_selection.head.named_parameters():
            record[schema.PARAM_PREFIX + name] = param.detach().cpu().clone()
            grad = param.grad
            record[schema.GRAD_PREFIX + name] = (
                grad.detach().cpu().clone() if grad is not None else torch.zeros_like(param, device="cpu")
            )
            param_state = optimizer.state.get(param, {})
            step_count = int(param_state.get("step", 0))
            for key in state_keys:
                value = param_state.get(key)
                record[f"{schema.STATE_PREFIX}{name}.{key}"] = (
                    value.detach().cpu().clone() if value is not None else torch.zeros_like(param, device="cpu")
                )
        record[schema.OPTIMIZER_STEP_COUNT] = torch.tensor(step_count)
        if not self.checked_weights:
            self._check_weights(record, world)
            self.checked_weights = True
        return record

    def _check_finite(self, step: int, logits: list[torch.Tensor]) -> None:
        """Stop at the first non-finite learning rate, logit or head gradient (all processes see the same)."""
        optimizer = base_optimizer(self.trainer.optimizer)
        problems = []
        if not all(math.isfinite(float(group["lr"])) for group in optimizer.param_groups):
            problems.append("learning rate")
        if not all(torch.isfinite(value).all() for value in logits):
            problems.append("loss (logits)")
        grads = [p.grad for p in self.trainer.head_selection.head.parameters() if p.grad is not None]
        if not all(torch.isfinite(grad).all() for grad in grads):
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
            if (observed - grad).norm() > 1e-3 * max(grad.norm().item(), 1e-8) + 1e-6:
                raise AccInfError(
                    f"Replaying the head on the recorded inputs does not reproduce the gradient of '{name}' that the "
                    "optimizer used. The head must be a deterministic function of one input (no dropout inside it; "
                    "choose e.g. 'classifier.out_proj'), and the loss the model's own cross-entropy."
                )

    # -- manifest --------------------------------------------------------------------------------
    def _model_state(self) -> dict[str, torch.Tensor]:
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        return {name: tensor for name, tensor in model.state_dict().items()}

    def _optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        return optimizer_checkpoint(model, base_optimizer(self.trainer.optimizer))

    def _build_manifest(self, optimizer: torch.optim.Optimizer) -> Manifest:
        trainer, args = self.trainer, self.trainer.args
        selection = trainer.head_selection
        model = trainer.accelerator.unwrap_model(trainer.model)
        group_of = {}
        for index, group in enumerate(optimizer.param_groups):
            for param in group["params"]:
                group_of[id(param)] = index
        head_params = dict(selection.head.named_parameters())
        missing = [name for name, p in head_params.items() if id(p) not in group_of]
        if missing:
            raise AccInfError(f"Head parameters {missing} are not trained by the optimizer; choose trained modules.")
        groups = [
            ParamGroupSpec(
                index=index,
                weight_decay=float(group.get("weight_decay", 0.0)),
                initial_lr=float(group.get("initial_lr", group["lr"])),
                betas=[float(b) for b in group["betas"]] if "betas" in group else None,
                eps=float(group["eps"]) if "eps" in group else None,
                momentum=float(group["momentum"]) if "momentum" in group else None,
                dampening=float(group["dampening"]) if "dampening" in group else None,
                nesterov=bool(group["nesterov"]) if "nesterov" in group else None,
                amsgrad=bool(group["amsgrad"]) if "amsgrad" in group else None,
                maximize=bool(group.get("maximize", False)),
            )
            for index, group in enumerate(optimizer.param_groups)
        ]
        dataset = trainer.train_dataset
        config = getattr(model, "config", None)
        content = schema.content_hash(dataset)
        if content is None:
            logger.warning("The training rows cannot be hashed (not tensors, or random transforms): scoring will "
                           "check only the dataset's length.")

        return Manifest(
            model_class=f"{type(model).__module__}.{type(model).__qualname__}",
            model_config=json.loads(config.to_json_string()) if config is not None else {},
            head=HeadSpec(
                module=selection.head_name,
                parameters={name: list(p.shape) for name, p in head_params.items()},
                chosen=list(selection.chosen_parameters),
                input_shape=[],  # set from the first recorded step
                input_dtype="",
                param_groups={name: group_of[id(p)] for name, p in head_params.items()},
            ),
            loss={"kind": "cross_entropy", "label_smoothing": float(args.label_smoothing_factor), "num_labels": int(config.num_labels)},
            optimizer_class=type(optimizer).__name__,
            param_groups=groups,
            scheduler={
                "class": type(trainer.lr_scheduler).__name__ if trainer.lr_scheduler is not None else None,
                "lr_scheduler_type": str(args.lr_scheduler_type),
                "warmup_steps": args.warmup_steps,
            },
            training={
                "max_grad_norm": float(args.max_grad_norm or 0.0),
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "per_device_train_batch_size": args.per_device_train_batch_size,
                "world_size": trainer.accelerator.num_processes,
                "seed": args.seed,
                "data_seed": args.data_seed,
                "dataloader_drop_last": args.dataloader_drop_last,
                "label_smoothing": float(args.label_smoothing_factor),
                "num_train_epochs": args.num_train_epochs,
                "max_steps": args.max_steps,
                "optim": str(args.optim),
                "learning_rate": args.learning_rate,
                "weight_decay": args.weight_decay,
                "bf16": args.bf16,
                "fp16": args.fp16,
                "num_threads": torch.get_num_threads(),  # CPU reductions split by thread: replay uses the same count
            },
            dataset={
                "length": len(dataset),
                "fingerprint": getattr(dataset, "_fingerprint", None),
                "content_hash": content,
                "type": type(dataset).__name__,
                "source": trainer.recording.data_source,
            },
            libraries=_library_versions(),
            checkpoint_every=trainer.recording.checkpoint_every,
        )

    @staticmethod
    def _check_same_run(existing: Manifest, new: Manifest) -> None:
        def identity(manifest: Manifest) -> dict:
            head = {k: v for k, v in manifest.head.__dict__.items() if k not in ("input_shape", "input_dtype")}
            settings = ("max_grad_norm", "gradient_accumulation_steps", "per_device_train_batch_size", "world_size",
                        "dataloader_drop_last", "label_smoothing")
            return {"model_class": manifest.model_class, "optimizer_class": manifest.optimizer_class,
                    "dataset": {k: v for k, v in manifest.dataset.items() if k != "fingerprint"}, "head": head,
                    "training settings": {k: manifest.training.get(k) for k in settings}}

        old, current = identity(existing), identity(new)
        for attribute in old:
            if old[attribute] != current[attribute]:
                raise AccInfError(
                    f"Cannot resume into this run directory: its {attribute} differs from this Trainer's. "
                    "Resume with the same model, optimizer, data and chosen modules, or record a new run."
                )
