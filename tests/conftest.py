"""Shared fixtures: tiny offline models and a one-call recorded training run.

The Hugging Face caches (hub, datasets, transformers) point into one temporary directory per test run, set
before anything imports ``datasets`` (which reads them at import): no test reads or writes the user's cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile

# This file is imported twice (as pytest's conftest and as tests.conftest): both must name one directory.
if "HF_ACCINF_TEST_CACHE" not in os.environ:
    os.environ["HF_ACCINF_TEST_CACHE"] = tempfile.mkdtemp(prefix="hf-accinf-tests-")
HF_CACHE = os.environ["HF_ACCINF_TEST_CACHE"]
os.environ.update(HF_HOME=HF_CACHE, HF_DATASETS_CACHE=os.path.join(HF_CACHE, "datasets"),
                  HF_HUB_CACHE=os.path.join(HF_CACHE, "hub"), TRANSFORMERS_CACHE=os.path.join(HF_CACHE, "hub"),
                  HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from hf_accinf import AccInfTrainer, RecordingArguments  # noqa: E402
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


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped where torch sees none; scripts/gpu_check.sh runs them)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: torch {torch.__version__} sees none (run scripts/gpu_check.sh "
                                   "on a GPU machine)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def tmp_run(tmp_path):
    return tmp_path / "run"


def pytest_unconfigure(config):
    shutil.rmtree(HF_CACHE, ignore_errors=True)
