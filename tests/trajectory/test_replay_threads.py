"""Replay as users run it: with more torch threads than the run was recorded with (the suite forces one thread
elsewhere, which would hide a thread-count sensitivity of the replayed dropout masks, reductions or refusals)."""

import torch

from hf_accinf import RunReader
from hf_accinf.examples import synthetic_text_dataset, tiny_bert
from hf_accinf.trajectory.replay import REPLAY_TOLERANCE, Replay
from tests.conftest import record_run


def test_replay_at_two_threads_reproduces_a_run_recorded_at_one(tmp_path):
    """Dropout on, AdamW with decay, warm-up, clipping, accumulation 2; recorded with one thread, replayed with two."""
    data = synthetic_text_dataset(num_rows=24)
    model = tiny_bert()
    assert model.config.hidden_dropout_prob > 0
    record_run(model, data, tmp_path / "run", recording={"checkpoint_every": 3}, gradient_accumulation_steps=2,
               per_device_train_batch_size=4, max_grad_norm=0.5, learning_rate=3e-3, warmup_steps=1, weight_decay=0.01)
    run = RunReader(tmp_path / "run")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        report = Replay(run, data).check()
    finally:
        torch.set_num_threads(threads)
    assert len(report.intervals) == len(run.manifest.checkpoints) - 1 >= 2
    assert report.ok and report.max_rel <= REPLAY_TOLERANCE, report.to_dict()
