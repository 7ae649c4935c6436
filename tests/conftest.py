"""Shared fixtures: tiny offline models and a one-call recorded training run."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from transformers import TrainingArguments

from hf_accinf import AccInfTrainer, RecordingArguments

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: one thread; two are 15-35x slower on a shared 2-core machine


def record_run(model, dataset, run_dir, recording: dict | None = None, resume=None, callbacks=(), **training):
    """Train ``model`` on ``dataset`` with an AccInfTrainer recording into ``run_dir``; return the trainer."""
    defaults = dict(
        output_dir=str(run_dir) + "-out", per_device_train_batch_size=8, num_train_epochs=2, use_cpu=True,
        report_to=[], save_strategy="no", disable_tqdm=True, seed=0, logging_strategy="no",
    )
    defaults.update(training)
    trainer = AccInfTrainer(
        model=model, args=TrainingArguments(**defaults), train_dataset=dataset,
        recording=RecordingArguments(run_dir=str(run_dir), **(recording or {})), callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def record_digits_run(out, rows: int, epochs: int = 2):
    """A tiny ViT trained with SGD (momentum, decay, clipping) on ``rows`` digits, recorded into ``out/accinf``;
    the training rows and 400 held-out digits saved under ``out/train`` and ``out/eval``."""
    from hf_accinf.examples import digits_dataset, tiny_vit

    train, held_out = digits_dataset(rows, seed=0), digits_dataset(400, seed=0, offset=rows)
    train.save_to_disk(str(out / "train"))
    held_out.save_to_disk(str(out / "eval"))
    record_run(tiny_vit(seed=0, hidden_size=64), train, out / "accinf", optim="sgd", optim_args="momentum=0.9",
               learning_rate=0.05, weight_decay=0.01, max_grad_norm=1.0, per_device_train_batch_size=32,
               num_train_epochs=epochs)
    return out / "accinf", ["--train_data", str(out / "train"), "--eval_data", str(out / "eval")]


def free_port() -> int:
    """A TCP port nobody listens on, for one launched process group."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def tmp_run(tmp_path):
    return tmp_path / "run"
