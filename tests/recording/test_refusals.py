"""Recorder refusals not covered elsewhere: optimizer options no estimator models, fp16, and a run whose loss
turns non-finite (not only a NaN learning rate)."""

import json

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from hf_accinf import AccInfError, AccInfTrainer, RecordingArguments, RunReader
from hf_accinf.examples import synthetic_text_dataset, tiny_bert
from tests.conftest import record_run


def _trainer(run_dir, optimizer=None, **training):
    model = tiny_bert()
    args = TrainingArguments(output_dir=str(run_dir) + "-out", use_cpu=True, report_to=[], save_strategy="no",
                             disable_tqdm=True, per_device_train_batch_size=8, num_train_epochs=1, **training)
    optimizers = (optimizer(model.parameters()), None) if optimizer else (None, None)
    return AccInfTrainer(model=model, args=args, train_dataset=synthetic_text_dataset(16), optimizers=optimizers,
                         recording=RecordingArguments(run_dir=str(run_dir)))


@pytest.mark.parametrize("optimizer", [
    lambda params: torch.optim.AdamW(params, lr=1e-3, amsgrad=True),
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.5),
], ids=["amsgrad", "sgd-dampening"])
def test_unmodelled_optimizer_options_are_refused_before_training(tmp_run, optimizer):
    with pytest.raises(AccInfError, match=r"with (amsgrad|dampening) is not modelled"):
        _trainer(tmp_run, optimizer).train()
    assert not (tmp_run / "manifest.json").exists()


def test_fp16_is_refused(tmp_run):
    with pytest.raises(AccInfError, match="fp16 mixed precision is not supported"):
        _trainer(tmp_run, fp16=True)


def test_a_run_whose_loss_turns_non_finite_stops_naming_the_step(tmp_run):
    class PoisonWeights(TrainerCallback):  # the model diverges: its logits, and so the loss, become NaN
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    model.bert.embeddings.word_embeddings.weight.fill_(float("nan"))

    with pytest.raises(AccInfError, match=r"non-finite loss \(logits\).* at optimizer step 2"):
        record_run(tiny_bert(), synthetic_text_dataset(40), tmp_run, callbacks=[PoisonWeights()], optim="sgd")
    assert json.loads((tmp_run / "manifest.json").read_text())["num_steps"] == 2  # the steps before it, kept
    with pytest.raises(AccInfError, match="incomplete"):
        RunReader(tmp_run)


@pytest.mark.parametrize("flag,engine", [("is_fsdp_enabled", "FSDP"), ("is_deepspeed_enabled", "DeepSpeed"),
                                         ("is_fsdp_xla_enabled", "FSDP")])
def test_sharded_training_is_refused_when_the_trainer_is_built(tmp_run, monkeypatch, flag, engine):
    """FSDP and DeepSpeed cannot be enabled on this CPU-only machine (FSDP needs a distributed GPU run, DeepSpeed
    is not installed): the Trainer's own flags, which it sets from accelerate's plugins, are set as they would be."""
    from transformers import Trainer

    built = Trainer.__init__

    def sharded(self, *args, **kwargs):
        built(self, *args, **kwargs)
        setattr(self, flag, True)

    monkeypatch.setattr(Trainer, "__init__", sharded)
    with pytest.raises(AccInfError, match=f"{engine}.*not supported.*Train with DDP"):
        _trainer(tmp_run)
    assert not tmp_run.exists()  # refused before anything is written
