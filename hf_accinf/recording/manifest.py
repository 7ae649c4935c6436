"""The run's manifest, built from the Trainer at the start of training: what was trained, on what, how.

Besides the model, the optimizer's parameter groups, the loss, the schedule, the dataset's identity and
the library versions, it records the numerics that replay and scoring need to reproduce the run
(:func:`numerics`: torch threads, device, attention implementation, TF32/cuDNN/deterministic flags,
mixed precision).
"""

from __future__ import annotations

import json
import logging
import platform
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import AccInfError
from ..trajectory import schema
from ..trajectory.schema import (DatasetSpec, HeadSpec, LossSpec, Manifest, ParamGroupSpec, SchedulerSpec,
                                 TrainingSpec)
from ..version import __version__

if TYPE_CHECKING:
    from .recorder import RecordingSource

logger = logging.getLogger(__name__)


def library_versions() -> dict[str, str]:
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


def numerics(model: nn.Module, args, accelerator=None) -> dict:
    """The settings that decide the run's floating-point results, for replay to reproduce them.

    ``autocast_dtype``: the dtype accelerate autocasts the model's forward to (``None``: no autocast), read off
    the ``accelerator`` (``native_amp``) when given, else off ``args``."""
    config = getattr(model, "config", None)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    autocast = getattr(accelerator, "native_amp", precision != "no")
    return {
        "torch_threads": torch.get_num_threads(),
        "device": str(device.type),
        "attn_implementation": getattr(config, "_attn_implementation", None) if config is not None else None,
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "mixed_precision": precision,
        "autocast_dtype": schema.MIXED_PRECISION_DTYPES.get(precision) if autocast else None,
    }


def build_manifest(source: "RecordingSource", optimizer: torch.optim.Optimizer) -> Manifest:
    """The manifest of the run ``source`` (an :class:`~.trainer.AccInfTrainer`) is about to record."""
    trainer, args = source, source.args
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
        loss=LossSpec(num_labels=int(config.num_labels), label_smoothing=float(args.label_smoothing_factor)),
        optimizer_class=type(optimizer).__name__,
        param_groups=groups,
        scheduler=SchedulerSpec(
            class_name=type(trainer.lr_scheduler).__name__ if trainer.lr_scheduler is not None else None,
            lr_scheduler_type=str(args.lr_scheduler_type),
            warmup_steps=args.warmup_steps,
        ),
        training=TrainingSpec(
            max_grad_norm=float(args.max_grad_norm or 0.0),
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            per_device_train_batch_size=args.per_device_train_batch_size,
            world_size=trainer.accelerator.num_processes,
            seed=args.seed,
            data_seed=args.data_seed,
            dataloader_drop_last=args.dataloader_drop_last,
            num_train_epochs=args.num_train_epochs,
            max_steps=args.max_steps,
            optim=str(args.optim),
            learning_rate=args.learning_rate,
            weight_decay=args.weight_decay,
            bf16=args.bf16,
            fp16=args.fp16,
        ),
        dataset=DatasetSpec(
            length=len(dataset),
            fingerprint=getattr(dataset, "_fingerprint", None),
            content_hash=content,
            type=type(dataset).__name__,
            source=trainer.recording.data_source,
        ),
        libraries=library_versions(),
        numerics=numerics(model, args, trainer.accelerator),
        checkpoint_every=trainer.recording.checkpoint_every,
    )


def check_same_run(existing: Manifest, new: Manifest) -> None:
    """Refuse a resume whose model, optimizer, data, head or batch settings differ from the recorded run's."""
    old, current = existing.identity(), new.identity()
    for attribute in old:
        if old[attribute] != current[attribute]:
            raise AccInfError(
                f"Cannot resume into this run directory: its {attribute} differs from this Trainer's. "
                "Resume with the same model, optimizer, data and chosen modules, or record a new run."
            )
