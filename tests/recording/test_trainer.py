"""The recorder: batches really consumed, weights really applied, resume, and early refusals."""

import json

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from hf_accinf import AccInfError, AccInfTrainer, RecordingArguments, RunReader
from hf_accinf.trajectory import schema
from hf_accinf.examples import digits_dataset, synthetic_text_dataset, tiny_bert, tiny_vit
from tests.conftest import record_run


def _epochs(trajectory):
    for epoch in trajectory.epoch.unique().tolist():
        steps = (trajectory.epoch == epoch).nonzero().flatten()
        yield torch.cat([trajectory.batch(int(t)) for t in steps])


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_each_epoch_is_a_permutation(tmp_run, kind, drop_last):
    if kind == "bert":
        model, data = tiny_bert(), synthetic_text_dataset(num_rows=53)
    else:
        model, data = tiny_vit(), digits_dataset(num_rows=53)
    record_run(model, data, tmp_run, dataloader_drop_last=drop_last, num_train_epochs=3)
    trajectory = RunReader(tmp_run).trajectory()
    epochs = list(_epochs(trajectory))
    assert len(epochs) == 3
    kept = 53 - 53 % 8 if drop_last else 53
    for rows in epochs:
        assert len(rows) == kept and len(set(rows.tolist())) == kept  # no row twice, none outside the dataset
        assert set(rows.tolist()) <= set(range(53))
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled every epoch


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_recorded_weights_and_inputs_reproduce_every_head_gradient(tmp_run, kind):
    """sum_i w_i grad l_i(head(x_i)) on the recorded rows equals the recorded (unclipped) head gradient.

    BERT's classification loss is a batch mean, ViT's a sum over num_items_in_batch: under gradient
    accumulation with an uneven last micro-batch the Trainer weighs their rows differently, and the
    measured weights must follow what really happened in both cases.
    """
    if kind == "bert":
        model, data = tiny_bert(), synthetic_text_dataset(num_rows=45)
    else:
        model, data = tiny_vit(), digits_dataset(num_rows=45)
    record_run(model, data, tmp_run, gradient_accumulation_steps=2, max_grad_norm=0.5, learning_rate=1e-3)
    run = RunReader(tmp_run)
    trajectory = run.trajectory()
    head = torch.nn.Linear(*reversed(trajectory.params["weight"].shape[1:])).double()
    for step in range(trajectory.num_steps):
        rows = trajectory.rows_of(step)
        params = {name: values[step].double().requires_grad_(True) for name, values in trajectory.params.items()}
        logits = torch.func.functional_call(head, params, (trajectory.head_input[rows].double(),))
        losses = torch.nn.functional.cross_entropy(logits, trajectory.labels[rows], reduction="none")
        grads = torch.autograd.grad((trajectory.row_weight[rows] * losses).sum(), list(params.values()))
        for (name, _), grad in zip(params.items(), grads):
            recorded = trajectory.grads[name][step].double() / trajectory.clip_coef[step]
            torch.testing.assert_close(recorded, grad, rtol=1e-4, atol=1e-6)
    assert (trajectory.clip_coef < 1).any()  # clipping was exercised


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt  # a crash: no on_train_end, the run directory stays incomplete


def test_resume_continues_without_duplicates_or_gaps(tmp_path):
    data = synthetic_text_dataset(num_rows=40)
    straight = record_run(tiny_bert(), data, tmp_path / "straight", num_train_epochs=3)
    common = dict(num_train_epochs=3, save_strategy="steps", save_steps=7, output_dir=str(tmp_path / "out"))
    # The first run dies at step 11, after an HF checkpoint at step 7; steps 7..10 must not be duplicated.
    with pytest.raises(KeyboardInterrupt):
        record_run(tiny_bert(), data, tmp_path / "resumed", callbacks=[StopAt(11)], recording={"checkpoint_every": 5}, **common)
    assert json.loads((tmp_path / "resumed" / "manifest.json").read_text())["num_steps"] == 10  # flushed at 5, 7, 10
    with pytest.raises(AccInfError, match="incomplete"):
        RunReader(tmp_path / "resumed")
    record_run(tiny_bert(), data, tmp_path / "resumed", resume=str(tmp_path / "out" / "checkpoint-7"), recording={"checkpoint_every": 5}, **common)
    a, b = RunReader(tmp_path / "straight"), RunReader(tmp_path / "resumed")
    assert b.num_steps == a.num_steps == straight.state.global_step == 15
    ta, tb = a.trajectory(), b.trajectory()
    assert torch.equal(ta.row_offsets, tb.row_offsets) and torch.equal(ta.row_index, tb.row_index)
    assert torch.equal(ta.epoch, tb.epoch)
    assert torch.equal(ta.lr, tb.lr)
    assert torch.equal(ta.params["weight"], tb.params["weight"])  # resume is bit-exact
    # Every run checkpoint, those written at the Trainer's own saves included (7, 14, and the last step), holds
    # the optimizer state that replay starts from.
    assert {7, 14, 15} <= set(b.manifest.checkpoints)
    for step in b.manifest.checkpoints:  # step 0: AdamW has no state yet, but the file is there
        assert bool(b.load_optimizer_state(step)[0]) == (step > 0), step


def test_unknown_module_lists_the_available_ones(tmp_run):
    with pytest.raises(AccInfError, match="No module .* matches 'clasifier'.*bert.pooler.dense"):
        record_run(tiny_bert(), synthetic_text_dataset(16), tmp_run, recording={"modules": ["clasifier"]})


def test_module_outside_the_head_is_refused(tmp_run):
    with pytest.raises(AccInfError, match="no head module|not inside"):
        record_run(tiny_bert(), synthetic_text_dataset(16), tmp_run, recording={"modules": ["classifier", "bert.pooler.dense"]})


def test_unmodelled_optimizer_is_refused_before_training(tmp_run):
    with pytest.raises(AccInfError, match="do not model the optimizer Adagrad"):
        record_run(tiny_bert(), synthetic_text_dataset(16), tmp_run, optim="adagrad")
    assert not (tmp_run / "manifest.json").exists()


def test_non_empty_run_directory_is_refused(tmp_run):
    tmp_run.mkdir()
    (tmp_run / "something").write_text("x")
    with pytest.raises(AccInfError, match="not empty"):
        record_run(tiny_bert(), synthetic_text_dataset(16), tmp_run)


def test_regression_head_is_refused(tmp_run):
    model = tiny_bert(num_labels=1)
    with pytest.raises(AccInfError, match="single-label classification"):
        AccInfTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_run), use_cpu=True, report_to=[]),
                      train_dataset=synthetic_text_dataset(8), recording=RecordingArguments(run_dir=str(tmp_run)))


def test_manifest_records_the_run(tmp_run):
    data = synthetic_text_dataset(24)
    record_run(tiny_bert(), data, tmp_run, weight_decay=0.01, recording={"checkpoint_every": 2})
    manifest = json.loads((tmp_run / "manifest.json").read_text())
    assert manifest["schema_version"] == schema.SCHEMA_VERSION and manifest["status"] == "complete"
    assert manifest["optimizer_class"] == "AdamW"
    decays = {g["weight_decay"] for g in manifest["param_groups"]}
    assert decays == {0.0, 0.01}  # HF's decay / no-decay groups
    groups = manifest["head"]["param_groups"]
    assert manifest["param_groups"][groups["weight"]]["weight_decay"] == 0.01
    assert manifest["param_groups"][groups["bias"]]["weight_decay"] == 0.0
    assert manifest["dataset"]["length"] == 24 and manifest["dataset"]["fingerprint"] == data._fingerprint
    reloaded = synthetic_text_dataset(24).with_format(None)  # same rows, another fingerprint and format
    assert manifest["dataset"]["content_hash"] == schema.content_hash(reloaded)
    assert manifest["dataset"]["content_hash"] != schema.content_hash(data.select(list(range(1, 24)) + [0]))
    assert manifest["checkpoints"] == [0, 2, 4, 6]
    assert manifest["training"]["world_size"] == 1 and manifest["libraries"]["transformers"]


def test_resume_with_other_training_settings_is_refused(tmp_path):
    data = synthetic_text_dataset(num_rows=24)
    common = dict(save_strategy="steps", save_steps=2, output_dir=str(tmp_path / "out"))
    record_run(tiny_bert(), data, tmp_path / "run", **common)
    with pytest.raises(AccInfError, match="training settings differs"):
        record_run(tiny_bert(), data, tmp_path / "run", resume=str(tmp_path / "out" / "checkpoint-2"),
                   max_grad_norm=0.5, **common)


def test_resume_past_the_recorded_steps_is_refused(tmp_path):
    from hf_accinf.recording.writer import RunWriter
    from hf_accinf.trajectory import schema

    data = synthetic_text_dataset(num_rows=24)
    record_run(tiny_bert(), data, tmp_path / "run")
    manifest = schema.Manifest.from_dict(json.loads((tmp_path / "run" / "manifest.json").read_text()))
    with pytest.raises(AccInfError, match="holds only steps 0..5"):
        RunWriter(tmp_path / "run", manifest).truncate(7)


def test_a_diverging_run_stops_naming_the_step(tmp_run):
    class PoisonLearningRate(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step == 2:
                for group in optimizer.param_groups:
                    group["lr"] = float("nan")

    with pytest.raises(AccInfError, match="non-finite learning rate at optimizer step 2"):
        record_run(tiny_bert(), synthetic_text_dataset(40), tmp_run, callbacks=[PoisonLearningRate()], optim="sgd")
    assert json.loads((tmp_run / "manifest.json").read_text())["num_steps"] == 2  # the steps before it, kept
    with pytest.raises(AccInfError, match="incomplete"):
        RunReader(tmp_run)


def test_multi_label_targets_are_refused_before_anything_is_written(tmp_run):
    data = synthetic_text_dataset(8).map(lambda row: {"labels": [float(row["labels"]), 1.0 - float(row["labels"])]})
    with pytest.raises(AccInfError, match="not one class index per row: multi-label"):
        AccInfTrainer(model=tiny_bert(), args=TrainingArguments(output_dir=str(tmp_run) + "-out", use_cpu=True, report_to=[]),
                      train_dataset=data, recording=RecordingArguments(run_dir=str(tmp_run)))
    assert not tmp_run.exists()


def test_resuming_a_model_that_was_not_restored_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    data = synthetic_text_dataset(num_rows=24)
    common = dict(save_strategy="steps", save_steps=2, output_dir=str(tmp_path / "out"))
    with pytest.raises(KeyboardInterrupt):
        record_run(tiny_bert(), data, tmp_path / "run", callbacks=[StopAt(3)], recording={"checkpoint_every": 10}, **common)
    # transformers restores what the checkpoint's keys match; here the body stays as initialised elsewhere.
    weights = tmp_path / "out" / "checkpoint-2" / "model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if k.startswith("bert.embeddings.word_embeddings"))
    state[key] = state[key] + 0.5
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(AccInfError, match="does not match the run's own weights at step 2.*bert.embeddings.word_embeddings"):
        record_run(tiny_bert(), data, tmp_path / "run", resume=str(tmp_path / "out" / "checkpoint-2"),
                   recording={"checkpoint_every": 10}, **common)
