"""A BERT fine-tuned whole with the HF default AdamW recipe replays, is scored whole-model, and a wrong
collator is still refused: the replay is judged where influence lives (DESIGN.md section 6b).

The run: a tiny BERT (2 layers, hidden 32, absolute positions, dropout off), AdamW with warm-up, linear
decay, clipping 1.0 and weight decay 0.01, padded rows. Its attention key biases are gauge tensors: their
float32 gradient is rounding noise that Adam divides by ``eps``, a random walk that a replay under another
rounding does not reproduce. Replays under the recorded thread count are bitwise here, so the walk is
made explicit: the checkpoint at step 10 gets random key biases and a random first Adam moment for them
(what a run whose rounding differs from the replay's leaves there; Adam's ``1 / eps`` gain then moves the
key biases by whole units in the next interval). The check before this change, one norm over all
parameters, refuses that run; the outputs, every other parameter and the optimizer state agree to round-off.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification, default_data_collator

from hf_accinf import AccInfError, RunReader
from hf_accinf.config import ScoreArguments
from hf_accinf.examples import synthetic_text_dataset
from hf_accinf.problem import problem_from_run
from hf_accinf.scoring import score_run
from hf_accinf.trajectory import schema
from hf_accinf.trajectory.replay import REPLAY_TOLERANCE, Replay, _by_key, _normwise, available_threads
from tests.conftest import record_run

ROWS = 24  # 12 steps of 8 rows over 4 epochs: checkpoints 0, 5, 10, 12
DRIFT_AT = 10  # the checkpoint whose gauge tensors are moved
KEY_BIASES = ("bert.encoder.layer.0.attention.self.key.bias", "bert.encoder.layer.1.attention.self.key.bias")


def padded_text(rows: int, seed: int) -> Dataset:
    """Synthetic token rows of 8 to 12 real tokens, zero-padded to 12 with an attention mask."""
    batch = synthetic_text_dataset(rows, length=12, seed=seed)[:]
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    for row, length in enumerate(np.random.default_rng(seed).integers(8, 13, size=rows).tolist()):
        ids[row, length:], mask[row, length:] = 0, 0
    labels = ((ids == 7).sum(1) > (ids == 9).sum(1)).long()
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                              "labels": labels.tolist()}).with_format("torch")


def bert_default_recipe(run_dir, data, threads: int = 1, epochs: int = 4, hidden: int = 32, layers: int = 2,
                        checkpoint_every: int = 5) -> None:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, position_embedding_type="absolute")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        record_run(BertForSequenceClassification(config), data, run_dir, recording={"checkpoint_every": checkpoint_every},
                   per_device_train_batch_size=8, num_train_epochs=epochs, learning_rate=2e-3, warmup_steps=4,
                   lr_scheduler_type="linear", weight_decay=0.01, max_grad_norm=1.0)  # optim: adamw_torch
    finally:
        torch.set_num_threads(before)


def move_gauge(run_dir, step: int, names) -> None:
    """Random key biases and first Adam moments for them in the checkpoint at ``step``."""
    generator = torch.Generator().manual_seed(0)
    run = RunReader(run_dir)
    for path, keys, size in ((run._checkpoint_path(step), names, 1e-3),
                             (run._checkpoint_path(step).with_name(schema.OPTIMIZER_STATE_NAME),
                              [f"{name}::exp_avg" for name in names], 1e-5)):
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        for key in keys:
            tensors[key] = tensors[key] + size * torch.randn(tensors[key].shape, generator=generator)
        save_file(tensors, str(path), metadata=metadata)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The recorded run as trained (``clean``) and with the key biases' random walk at step 10 (``drifted``)."""
    root = tmp_path_factory.mktemp("adamw")
    data = padded_text(ROWS, seed=0)
    bert_default_recipe(root / "clean", data)
    shutil.copytree(root / "clean", root / "drifted")
    move_gauge(root / "drifted", DRIFT_AT, KEY_BIASES)
    return RunReader(root / "clean"), RunReader(root / "drifted"), data


def whole_norm_errors(replay: Replay, start: int, stop: int) -> tuple[float, float]:
    """The check before gauge tensors were known: one norm over every parameter (and every state tensor)."""
    replay._load(replay._checkpoint_state(start))
    for step in range(start, stop):
        replay.step(step)
    weights, state = replay._snapshot()
    recorded_weights, recorded_state = replay._checkpoint_state(stop)
    parameters = _normwise(weights, recorded_weights, replay._checkpoint_state(start)[0])[1]
    states = max(_normwise(_by_key(state)[key], value)[1] for key, value in _by_key(recorded_state).items())
    return parameters, states


def test_the_recipe_and_its_gauge_tensors(runs):
    clean, _, data = runs
    manifest = clean.manifest
    assert manifest.optimizer_class == "AdamW" and manifest.training.max_grad_norm == 1.0
    assert {group.weight_decay for group in manifest.param_groups} == {0.0, 0.01}
    lr = clean.trajectory().lr[:, 0]
    assert lr.argmax() == 4 and lr[-1] < lr[4] / 4  # warm-up, then linear decay
    assert (clean.trajectory().clip_coef < 1).any()  # clipping at 1.0 acted
    assert Replay(clean, data).gauge_parameters() == KEY_BIASES


def test_a_gauge_random_walk_is_reported_not_refused(runs):
    _, drifted, data = runs
    replay = Replay(drifted, data)
    report = replay.check()
    assert report.ok and report.gauge == KEY_BIASES
    by_start = {interval.start: interval for interval in report.intervals}
    for start in (DRIFT_AT - 5, DRIFT_AT):  # the intervals that end and start at the moved checkpoint
        interval = by_start[start]
        assert interval.gauge_rel > 0.5  # the gauge tensors are far from the checkpoint, relative to their movement
        assert interval.output_rel < 1e-6 and interval.parameter_rel < 1e-5 and interval.state_rel < 1e-5
        old_parameters, old_states = whole_norm_errors(replay, start, interval.stop)
        assert max(old_parameters, old_states) > REPLAY_TOLERANCE  # refused by one norm over every tensor
    assert by_start[DRIFT_AT].gauge_max_abs > 1.0  # Adam's 1/eps gain on the moved moment
    as_dict = report.to_dict()
    assert as_dict["gauge"] == list(KEY_BIASES) and as_dict["ok"] and as_dict["gauge_max_rel"] > 0.5
    assert {"output_rel", "gauge_rel", "gauge_max_abs"} <= set(as_dict["intervals"][0])
    replay.parameters_at(DRIFT_AT + 2)  # served without refusal


def test_whole_model_adjoint_scores_leave_the_gauge_out_and_ignore_its_walk(runs, tmp_path):
    clean, drifted, data = runs
    evaluation = padded_text(6, seed=1)
    results = []
    for run in (clean, drifted):
        args = ScoreArguments(run_dir=str(run.run_dir), modules=["all"], method="adam-ie", form="adjoint",
                              trust_probes=0, output_dir=str(tmp_path / run.run_dir.name))
        results.append(score_run(args, data, evaluation, progress=False))
    for result in results:
        assert result.form == "adjoint" and result.gauge == KEY_BIASES and result.replay["ok"]
        saved = json.loads((result.output_dir / "scores.json").read_text())
        names = [name for name, _ in clean.build_model().named_parameters()]
        assert saved["scope"] == [name for name in names if name not in KEY_BIASES]
        assert saved["gauge"] == list(KEY_BIASES) and saved["replay"]["gauge"] == list(KEY_BIASES)
        assert torch.isfinite(result.scores).all() and result.scores.abs().max() > 0
    # The walk changes no output, so it changes no score beyond the round-off it leaves in the other tensors.
    torch.testing.assert_close(results[1].scores, results[0].scores, rtol=1e-6, atol=1e-6 * results[0].scores.abs().max().item())
    problem = problem_from_run(drifted, modules=["bert.encoder.layer.0.attention.self.key"], train_dataset=data)
    assert problem.gauge == KEY_BIASES[:1] and problem.scope.parameters == ("bert.encoder.layer.0.attention.self.key.weight",)


def truncating(features, max_length: int = 10):
    """Other preprocessing of the same rows: truncated to 10 tokens."""
    batch = default_data_collator(features)
    return {key: value[:, :max_length] if key != "labels" else value for key, value in batch.items()}


def padding_to_16(features):
    """Other padding of the same rows, masked: the logits do not change beyond round-off."""
    batch = default_data_collator(features)
    pad = torch.zeros(len(batch["input_ids"]), 4, dtype=torch.long)
    return {**batch, "input_ids": torch.cat([batch["input_ids"], pad], 1),
            "attention_mask": torch.cat([batch["attention_mask"], pad], 1)}


def test_other_preprocessing_is_refused_by_the_output_check_and_harmless_padding_is_not(runs):
    clean, _, data = runs
    # Truncation passes the cheap per-step checks (loss and gradient norm within 1e-3) ...
    report = Replay(clean, data, truncating).check()
    assert not report.ok
    assert all(interval.output_rel > REPLAY_TOLERANCE and interval.parameter_rel > REPLAY_TOLERANCE
               for interval in report.intervals), report.to_dict()
    # ... and is refused at the first checkpoint, naming the outputs and the option.
    with pytest.raises(AccInfError, match=r"interval \[0, 5\).*outputs .*--replay_tolerance.*collator"):
        Replay(clean, data, truncating).parameters_at(3)
    report = Replay(clean, data, padding_to_16).check()
    assert report.ok and all(interval.output_rel < 1e-6 for interval in report.intervals), report.to_dict()


def test_the_thread_count_is_recorded_and_replayed(runs, tmp_path, monkeypatch):
    clean, _, data = runs
    assert clean.manifest.numerics["torch_threads"] == 1  # the tests train with one thread
    # A run trained with two threads replays bit for bit from a process running one.
    bert_default_recipe(tmp_path / "two", data.select(range(16)), threads=2, epochs=1)  # two steps
    two = RunReader(tmp_path / "two")
    assert two.manifest.numerics["torch_threads"] == 2 and torch.get_num_threads() == 1
    replay = Replay(two, data.select(range(16)))
    seen = []
    original = Replay._step
    monkeypatch.setattr(Replay, "_step", lambda self, step, scale: (seen.append(torch.get_num_threads()),
                                                                     original(self, step, scale)))
    final = replay.train()
    assert set(seen) == {min(2, available_threads())} and torch.get_num_threads() == 1
    recorded = two.load_checkpoint(two.num_steps)
    if seen[0] == 2:
        assert all(torch.equal(final[name], recorded[name]) for name in recorded)


def test_the_tolerance_and_the_memory_budget_reach_the_replay(runs, tmp_path):
    from hf_accinf.trajectory.replay import REPLAY_TOLERANCE as DEFAULT

    _, drifted, data = runs
    assert ScoreArguments().replay_tolerance == DEFAULT
    evaluation = padded_text(4, seed=1)
    common = dict(run_dir=str(drifted.run_dir), modules=["all"], method="adam-ie", form="adjoint", trust_probes=0)
    # The drifted run's round-off (~1e-7 after the walk) is beyond a tolerance of 1e-12.
    with pytest.raises(AccInfError, match=r"interval \[10, 12\).*tolerance 1e-12, --replay_tolerance"):
        score_run(ScoreArguments(**common, replay_tolerance=1e-12, output_dir=str(tmp_path / "a")), data, evaluation,
                  progress=False)
    # 1073 bytes, shared by the replay's cache and the model backend's blocks: refused by the first to need it.
    with pytest.raises(AccInfError, match=r"memory_budget=536 bytes.*--memory_budget_gb"):
        score_run(ScoreArguments(**common, memory_budget_gb=1e-6, output_dir=str(tmp_path / "b")), data, evaluation,
                  progress=False)
    curvature = problem_from_run(drifted, modules=["all"], train_dataset=data, memory_budget=12346,
                                 replay_tolerance=0.5).curvature
    assert (curvature.states.memory_budget, curvature.states.tolerance, curvature.memory_budget) == (6173, 0.5, 6173)


def test_runs_checkpointed_at_every_step_leave_the_same_gauge_out(tmp_path):
    """A run recorded before replay existed but checkpointed at every step is served by its checkpoints
    (``CheckpointStates``): its gauge tensors are found and left out the same way."""
    from hf_accinf.problem import CheckpointStates, default_states

    data = padded_text(8, seed=2)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    record_run(BertForSequenceClassification(config), data, tmp_path / "run", recording={"checkpoint_every": 1},
               num_train_epochs=2, learning_rate=1e-3)
    manifest_path = tmp_path / "run" / schema.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["schema_version"] = 1
    manifest_path.write_text(json.dumps(manifest))
    old = RunReader(tmp_path / "run")
    states = default_states(old, data)
    assert isinstance(states, CheckpointStates) and states.gauge_parameters() == KEY_BIASES
    problem = problem_from_run(old, modules=["all"], train_dataset=data)
    assert problem.gauge == KEY_BIASES and not set(KEY_BIASES) & set(problem.scope.parameters)
