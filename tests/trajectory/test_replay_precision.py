"""A bf16 run (``TrainingArguments(bf16=True)``: accelerate autocasts the model's forward to bfloat16, here on
the CPU) is recorded, replayed under the same autocast and scored through the whole model.

Ground truth: the run's own checkpoints and the head's dense record (written by the recorder during
training, independently of replay). The tolerance is the bf16 one (schema.MIXED_PRECISION_TOLERANCE, 1e-2:
a few bf16 unit roundoffs); the same replay without autocast is further off, which shows the autocast is
what reproduces the run.
"""

import pytest
import torch

from hf_accinf import RunReader
from hf_accinf.config import ScoreArguments
from hf_accinf.examples import synthetic_text_dataset, tiny_bert
from hf_accinf.scoring.run import score_run
from hf_accinf.trajectory import schema
from hf_accinf.trajectory.replay import Replay
from tests.conftest import record_run

ROWS = 24


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """Tiny BERT, dropout on, AdamW, clipping, accumulation 2, bf16 autocast on the CPU."""
    run_dir = tmp_path_factory.mktemp("bf16") / "run"
    data = synthetic_text_dataset(num_rows=ROWS)
    record_run(tiny_bert(), data, run_dir, recording={"checkpoint_every": 3}, bf16=True,
               gradient_accumulation_steps=2, per_device_train_batch_size=2, max_grad_norm=0.5, learning_rate=3e-3)
    return RunReader(run_dir), data


def test_the_manifest_records_the_mixed_precision_and_old_manifests_read_as_float32(bf16_run):
    run, _ = bf16_run
    assert run.manifest.training.precision == "bf16"
    assert run.manifest.numerics["mixed_precision"] == "bf16" and run.manifest.numerics["autocast_dtype"] == "bfloat16"
    assert run.manifest.head.input_dtype == "bfloat16"  # the head ran under the autocast
    # Measured from bf16 logit gradients (off by up to ~2e-3), recorded snapped to the Trainer's 1 / k.
    weights = run.trajectory().row_weight
    assert torch.equal(weights, 1.0 / torch.round(1.0 / weights))
    assert schema.TrainingSpec().precision == "no"


def test_a_bf16_run_replays_under_its_autocast_within_the_bf16_tolerance(bf16_run):
    run, data = bf16_run
    replay = Replay(run, data)
    report = replay.check()
    assert report.tolerance == schema.MIXED_PRECISION_TOLERANCE["bf16"] and report.precision == "bf16"
    assert report.ok and len(report.intervals) == len(run.manifest.checkpoints) - 1, report.to_dict()
    assert report.to_dict()["precision"] == "bf16"
    prefix = run.manifest.head.module + "."
    for step in range(run.num_steps):  # the head at every step, against the recorder's dense record
        parameters = replay.parameters_at(step)
        for name, recorded in replay.trajectory.params.items():
            torch.testing.assert_close(parameters[prefix + name], recorded[step], rtol=report.tolerance, atol=1e-6,
                                       msg=f"step {step}: {name}")
    float32 = Replay(run, data, check_steps=False)
    float32.autocast_dtype = None  # the same replay without the Trainer's autocast
    assert float32.check().max_rel > max(report.max_rel, 10 * torch.finfo(torch.float32).eps)


def test_whole_model_scores_of_a_bf16_run(bf16_run, tmp_path):
    run, data = bf16_run
    args = ScoreArguments(run_dir=str(run.run_dir), modules=["all"], method="adam-ie", form="adjoint",
                          trust_probes=0, output_dir=str(tmp_path / "scores"))
    result = score_run(args, data, synthetic_text_dataset(num_rows=6, seed=1), progress=False)
    assert result.replay["ok"] and result.replay["precision"] == "bf16"
    assert result.replay["tolerance"] == schema.MIXED_PRECISION_TOLERANCE["bf16"]
    assert result.scores.shape == (ROWS,) and torch.isfinite(result.scores).all() and result.scores.abs().max() > 0



@pytest.mark.cuda
def test_a_bf16_run_trained_on_the_gpu_replays_on_the_gpu(tmp_path):
    """The GPU check: recorded under CUDA bf16 autocast with dropout, replayed on the GPU with its CUDA random
    states and the same autocast, within the bf16 tolerance."""
    data = synthetic_text_dataset(num_rows=ROWS)
    record_run(tiny_bert(), data, tmp_path / "run", recording={"checkpoint_every": 3}, bf16=True, use_cpu=False,
               gradient_accumulation_steps=2, per_device_train_batch_size=2, max_grad_norm=0.5, learning_rate=3e-3)
    run = RunReader(tmp_path / "run")
    assert run.manifest.numerics["device"] == "cuda" and run.manifest.numerics["autocast_dtype"] == "bfloat16"
    report = Replay(run, data, device="cuda").check()
    assert report.ok and report.precision == "bf16" and report.randomness.startswith("restored: CPU and CUDA"), \
        report.to_dict()


def test_summary_check_replay_names_the_precision(bf16_run, tmp_path):
    from hf_accinf.commands.summary import summary

    run, data = bf16_run
    data.save_to_disk(str(tmp_path / "train"))
    text = summary(run.run_dir, check_replay=True, train_data=str(tmp_path / "train"))
    assert "mixed precision bf16" in text and "within the tolerance 0.01" in text
