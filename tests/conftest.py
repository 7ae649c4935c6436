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
torch.set_num_threads(2)


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


def free_port() -> int:
    """A TCP port nobody listens on, for one launched process group."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def tmp_run(tmp_path):
    return tmp_path / "run"
