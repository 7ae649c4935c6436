"""Replay rebuilds every parameter and the optimizer state of a recorded run, or refuses with the reason.

Ground truth: the checkpoints (every parameter and optimizer state, at every checkpoint) and the head's
parameters and optimizer state, which the recorder logs densely at every step, independently of replay.
Tolerance: float32 round-off. The replay's loss is ``sum_r w_r l_r`` from the measured weights where the
Trainer used the model's mean loss, so each step's gradient differs from the recorded one by ~1e-7
relative and the difference is carried along the interval; REPLAY_TOLERANCE (1e-4, relative to how far
the interval moved the parameters) leaves three orders of magnitude above what these runs show (~1e-7),
and a wrong dropout mask or row is off by 1e-2 or more.
"""

import json

import pytest
import torch

from hf_accinf import AccInfError, RunReader
from hf_accinf.examples import digits_dataset, synthetic_text_dataset, tiny_bert, tiny_vit
from hf_accinf.trajectory import schema
from hf_accinf.trajectory.replay import REPLAY_TOLERANCE, Replay
from tests.conftest import record_run

BERT_ROWS = 40
VIT_ROWS = 32


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    """Dropout on (BERT's default 0.1), AdamW with weight decay, warm-up then linear decay, clipping, accumulation 2."""
    run_dir = tmp_path_factory.mktemp("bert") / "run"
    data = synthetic_text_dataset(num_rows=BERT_ROWS)
    model = tiny_bert()
    assert model.config.hidden_dropout_prob > 0 and model.config.attention_probs_dropout_prob > 0
    record_run(model, data, run_dir, recording={"checkpoint_every": 4}, gradient_accumulation_steps=2,
               per_device_train_batch_size=4, max_grad_norm=0.5, learning_rate=3e-3, warmup_steps=2,
               lr_scheduler_type="linear", weight_decay=0.01)
    return RunReader(run_dir), data


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """torch SGD with momentum 0.9 (HF optim='sgd'), clipping, 12 steps checkpointed every 8."""
    run_dir = tmp_path_factory.mktemp("vit") / "run"
    data = digits_dataset(num_rows=VIT_ROWS)
    record_run(tiny_vit(), data, run_dir, recording={"checkpoint_every": 8}, optim="sgd", optim_args="momentum=0.9",
               learning_rate=0.05, max_grad_norm=1.0, num_train_epochs=3)
    return RunReader(run_dir), data


def _head_state(run, replay, step):
    prefix = run.manifest.head.module + "."
    trajectory = replay.trajectory
    keys = [key.rpartition(".")[2] for key in trajectory.states if key.startswith(next(iter(trajectory.params)) + ".")]
    params = replay.parameters_at(step)
    state = replay.optimizer_state_at(step)
    for name, values in trajectory.params.items():
        yield f"param {name}", params[prefix + name], values[step]
        for key in keys:
            recorded = trajectory.states[f"{name}.{key}"][step]
            replayed = state.get(prefix + name, {}).get(key, torch.zeros_like(recorded))
            yield f"{key} {name}", replayed, recorded


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_replay_reproduces_every_checkpoint_and_the_dense_head_record(kind, request):
    run, data = request.getfixturevalue(f"{kind}_run")
    replay = Replay(run, data)
    report = replay.check()
    intervals = list(zip(run.manifest.checkpoints, run.manifest.checkpoints[1:]))
    assert [(i.start, i.stop) for i in report.intervals] == intervals and report.ok
    assert all(i.parameter_rel < 1e-5 and i.state_rel < 1e-5 for i in report.intervals), report.to_dict()
    assert report.max_rel <= REPLAY_TOLERANCE
    assert (replay.trajectory.clip_coef < 1).any()  # clipping was exercised
    # Every step, not only checkpoints: the head is recorded densely by the recorder, independently of replay.
    for step in range(run.num_steps):
        for what, replayed, recorded in _head_state(run, replay, step):
            torch.testing.assert_close(replayed, recorded, rtol=1e-5, atol=1e-7, msg=f"step {step}: {what}")
        counts = {keys["step"].item() for keys in replay.optimizer_state_at(step).values() if "step" in keys}
        assert counts <= {float(step)}
    # The whole run replayed from step 0 (no checkpoint in between is loaded) ends at the recorded final weights.
    final, replayed = run.load_checkpoint(run.num_steps), Replay(run, data).train(start=0)
    for name, value in final.items():
        torch.testing.assert_close(replayed[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_checkpoints_hold_the_optimizer_state_and_micro_batches_their_random_state(bert_run):
    run, _ = bert_run
    trajectory = run.trajectory()
    assert run.manifest.schema_version == schema.SCHEMA_VERSION >= schema.REPLAY_SCHEMA_VERSION
    sizes = trajectory.micro_size
    assert len(sizes) == 2 * run.num_steps and sizes.sum() == len(trajectory.row_index)  # accumulation 2
    assert trajectory.rng_cpu.shape == (len(sizes), torch.get_rng_state().numel())
    assert len({bytes(state.numpy()) for state in trajectory.rng_cpu}) == len(sizes)  # dropout advanced it
    tensors, metadata = run.load_optimizer_state(4)
    groups = json.loads(metadata["group_params"])
    model_params = {name for name, _ in run.build_model().named_parameters()}
    assert metadata["optimizer_class"] == "AdamW" and sorted(sum(groups, [])) == sorted(model_params)
    assert {key.partition("::")[0] for key in tensors} == model_params
    assert all(tensors[f"{name}::step"].item() == 4 for name in model_params)


def test_reverse_walk_equals_forward_and_replays_each_sub_interval_once(vit_run, monkeypatch):
    run, data = vit_run
    forward = Replay(run, data)
    expected = [(forward.parameters_at(t), forward.optimizer_state_at(t)) for t in range(run.num_steps + 1)]
    backward = Replay(run, data, memory_budget=6 * forward.state_bytes)  # 8-step intervals do not fit
    calls = []
    original = Replay.step
    monkeypatch.setattr(Replay, "step", lambda self, step, scale=None: (calls.append(step), original(self, step, scale)))
    walked = [(backward.parameters_at(t), backward.optimizer_state_at(t)) for t in reversed(range(run.num_steps + 1))]
    assert 1 < backward._stride < 8
    for (params, state), (want_params, want_state) in zip(walked[::-1], expected):
        assert all(torch.equal(params[name], want_params[name]) for name in want_params)
        assert state.keys() == want_state.keys()
        assert all(torch.equal(state[n][k], want_state[n][k]) for n in want_state for k in want_state[n])
    # Each full interval forward once (its sub-interval starts), then each sub-interval once more.
    assert len(calls) <= 2 * run.num_steps


def test_batch_inputs_are_the_recorded_rows_per_micro_batch(bert_run):
    run, data = bert_run
    replay = Replay(run, data)
    trajectory = run.trajectory()
    for step in (0, run.num_steps - 1):
        batches = replay.batch_inputs(step)
        positions = torch.cat([positions for _, positions in batches])
        assert torch.equal(positions, torch.arange(len(trajectory.batch(step))))
        for inputs, rows in batches:
            expected = data[trajectory.batch(step)[rows].tolist()]["input_ids"]
            assert torch.equal(inputs["input_ids"], expected)


class Rows(torch.utils.data.Dataset):
    """A torch dataset view (no content hash), optionally permuted or with altered token ids."""

    def __init__(self, data, order=None, shift=0):
        self.data, self.order, self.shift = data, order, shift

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        row = dict(self.data[int(self.order[index]) if self.order is not None else index])
        row["input_ids"] = (row["input_ids"] - 5 + self.shift) % 35 + 5
        return row


def test_a_different_dataset_or_dropout_mask_is_refused_with_the_reason(bert_run, monkeypatch):
    run, data = bert_run
    with pytest.raises(AccInfError, match="rows differ"):
        Replay(run, data.shuffle(seed=1))  # a datasets.Dataset: its content hash
    # Datasets without a content hash (torch datasets) are caught by the replay itself.
    monkeypatch.setattr(RunReader, "check_dataset", lambda self, dataset: None)
    Replay(run, Rows(data)).train(stop=2)  # the same rows through a torch dataset replay fine
    with pytest.raises(AccInfError, match=r"interval \[0, 4\).*labels of step 0 differ.*collator"):
        Replay(run, Rows(data, order=torch.randperm(BERT_ROWS, generator=torch.Generator().manual_seed(0)))).check()
    with pytest.raises(AccInfError, match=r"interval \[0, 4\).*the loss of step 0.*collator"):
        Replay(run, Rows(data, shift=1)).check()
    replay = Replay(run, data)
    monkeypatch.setattr(replay.trajectory, "rng_cpu", replay.trajectory.rng_cpu.roll(1, 0))  # other dropout masks
    with pytest.raises(AccInfError, match=r"interval \[0, 4\).*versions differ"):
        replay.parameters_at(3)


def test_schema_1_runs_are_read_but_not_replayed(tmp_path, bert_run):
    run, data = bert_run
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(run.run_dir, copy)
    manifest = json.loads((copy / schema.MANIFEST_NAME).read_text())
    manifest["schema_version"] = 1
    (copy / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    old = RunReader(copy)
    assert old.trajectory().num_steps == run.num_steps
    with pytest.raises(AccInfError, match="schema 1.*Record the run again"):
        Replay(old, data)


def _as_if_trained_on_a_gpu(run: RunReader) -> RunReader:
    """A fresh reader of ``run`` whose trajectory carries CUDA random states, as a GPU run's does."""
    import dataclasses

    copy = RunReader(run.run_dir)
    trajectory = copy.trajectory()
    copy._trajectory = dataclasses.replace(trajectory, rng_cuda=torch.zeros(len(trajectory.rng_cpu), 16, dtype=torch.uint8))
    return copy


def test_replay_unavailable_says_why_before_any_work(bert_run, vit_run, tmp_path):
    from hf_accinf.problem import deep_scope_unavailable
    from hf_accinf.trajectory.replay import replay_unavailable

    (bert, bert_data), (vit, vit_data) = bert_run, vit_run
    assert replay_unavailable(bert) is None and replay_unavailable(vit) is None
    # CUDA random states decide dropout masks: the BERT run has dropout, the ViT run has none.
    gpu_bert, gpu_vit = _as_if_trained_on_a_gpu(bert), _as_if_trained_on_a_gpu(vit)
    assert "GPU with dropout" in replay_unavailable(gpu_bert, "cpu")
    with pytest.raises(AccInfError, match="GPU with dropout.*--device cuda"):
        Replay(gpu_bert, bert_data)
    assert replay_unavailable(gpu_vit, "cpu") is None
    report = Replay(gpu_vit, vit_data).check()
    assert report.max_rel == 0.0  # its random states decide nothing: bit for bit
    assert report.to_dict()["randomness"].startswith("unused (dropout off") and "CUDA random states" in report.randomness
    assert Replay(vit, vit_data).report().to_dict()["randomness"] == "restored: CPU random states on cpu"
    mixed = RunReader(vit.run_dir)
    mixed.manifest.training.fp16 = True  # bf16 runs replay under their autocast (test_replay_precision.py)
    assert "fp16 runs" in replay_unavailable(mixed)
    old = RunReader(vit.run_dir)
    old.manifest.schema_version = 1
    assert "schema 1" in replay_unavailable(old) and "schema 1" in deep_scope_unavailable(old)
    old.manifest.checkpoints = list(range(old.num_steps + 1))  # checkpointed at every step: no replay needed
    assert deep_scope_unavailable(old) is None


def test_a_gpu_run_whose_model_draws_random_numbers_outside_dropout_is_refused_on_the_cpu(vit_run):
    """No dropout in the config or the modules, but a layer that draws noise in training (as layer drop or
    stochastic depth do): the CUDA random states decided it, so a CPU replay is refused, naming --device cuda."""
    from hf_accinf.examples import tiny_vit

    run, data = vit_run
    model = tiny_vit()

    def noisy(module, args, output):
        return output + 1e-3 * torch.randn_like(output) if module.training else output

    model.vit.layernorm.register_forward_hook(noisy)
    with pytest.raises(AccInfError, match="--device cuda"):
        Replay(_as_if_trained_on_a_gpu(run), data, model=model)
    assert Replay(run, data, model=model).randomness.startswith("restored: CPU")  # a CPU run: its states restore it


@pytest.mark.cuda
def test_a_gpu_run_with_dropout_replays_on_the_gpu_with_its_cuda_random_states(tmp_path):
    """Recorded on the GPU with dropout on: the replay restores each micro-batch's CUDA random state on the
    device and reproduces every checkpoint (the masks are the run's own, or the error would be ~1e-2)."""
    run_dir = tmp_path / "run"
    data = synthetic_text_dataset(num_rows=BERT_ROWS)
    model = tiny_bert()
    assert model.config.hidden_dropout_prob > 0
    record_run(model, data, run_dir, recording={"checkpoint_every": 4}, use_cpu=False,
               per_device_train_batch_size=4, learning_rate=3e-3)
    run = RunReader(run_dir)
    assert run.trajectory().rng_cuda is not None
    with pytest.raises(AccInfError, match="--device cuda"):
        Replay(run, data)
    replay = Replay(run, data, device="cuda")
    report = replay.check()
    assert report.ok and report.randomness.startswith("restored: CPU and CUDA"), report.to_dict()


@pytest.mark.cuda
def test_a_gpu_run_without_dropout_replays_on_the_cpu_ignoring_its_cuda_random_states(tmp_path):
    """ViT has no dropout: its GPU run replays on the CPU (other kernels: judged by the replay check). TF32 is
    off while recording, as float32 replay on the CPU cannot follow TF32 rounding."""
    data = digits_dataset(num_rows=VIT_ROWS)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        record_run(tiny_vit(), data, tmp_path / "run", recording={"checkpoint_every": 4}, use_cpu=False, optim="sgd",
                   learning_rate=0.05, max_grad_norm=1.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    run = RunReader(tmp_path / "run")
    assert run.trajectory().rng_cuda is not None
    report = Replay(run, data).check()
    assert report.ok and report.randomness.startswith("unused (dropout off"), report.to_dict()
