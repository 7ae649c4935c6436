"""Shared by the LDS and ``prune --check`` tests: a tiny recorded digits run saved with its data, and the
evaluation losses of a model, the oracle's side of every comparison."""

from __future__ import annotations

from pathlib import Path

import torch

from hf_accinf.examples import digits_dataset, tiny_vit
from tests.conftest import record_run

SGD = dict(optim="sgd", optim_args="momentum=0.9", learning_rate=0.05, max_grad_norm=1.0, weight_decay=0.01,
           per_device_train_batch_size=8)


def saved_digits_run(root: Path, train_rows: int, eval_rows: int) -> list[str]:
    """A tiny ViT trained with SGD (momentum, decay, clipping) on ``train_rows`` digits, recorded into ``root/run``,
    the rows saved under ``root/train`` and the next ``eval_rows`` under ``root/eval``; returns the data flags."""
    train, held_out = digits_dataset(train_rows), digits_dataset(eval_rows, offset=train_rows)
    train.save_to_disk(str(root / "train"))
    held_out.save_to_disk(str(root / "eval"))
    record_run(tiny_vit(), train, root / "run", **SGD)
    return ["--train_data", str(root / "train"), "--eval_data", str(root / "eval")]


def eval_losses(run, parameters: dict[str, torch.Tensor], eval_data) -> torch.Tensor:
    """Each evaluation row's cross-entropy (float64) of the run's model with ``parameters``, in eval mode."""
    model = run.build_model().eval()
    model.load_state_dict(parameters)
    with torch.no_grad():
        logits = model(pixel_values=eval_data[:]["pixel_values"]).logits
    return torch.nn.functional.cross_entropy(logits.double(), eval_data[:]["labels"], reduction="none")
