"""``hf-accinf score`` under ``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo): the README's
whole-model command (``--method adam-ie --modules all --form adjoint``) on an AdamW run, launched, equals the
same command in one process to 1e-10 in float64."""

import json

import pytest
import torch

from hf_accinf.cli import main
from hf_accinf.examples import digits_dataset, tiny_vit
from hf_accinf.scoring import load_scores
from tests.conftest import record_run
from tests.launch import ROOT, launch_two_processes


@pytest.mark.slow
def test_launched_whole_model_adjoint_score_equals_one_process(tmp_path):
    train, held_out = digits_dataset(48), digits_dataset(20, offset=48)
    record_run(tiny_vit(hidden_size=16), train, tmp_path / "run", learning_rate=1e-3, warmup_steps=0.2,
               per_device_train_batch_size=16, num_train_epochs=1)
    train.save_to_disk(str(tmp_path / "train"))
    held_out.save_to_disk(str(tmp_path / "eval"))
    command = ["score", "--run_dir", str(tmp_path / "run"), "--train_data", str(tmp_path / "train"),
               "--eval_data", str(tmp_path / "eval"), "--method", "adam-ie", "--modules", "all", "--form", "adjoint",
               "--trust_probes", "0", "--dtype", "float64"]
    launch_two_processes(ROOT / "tests/scripts/score_launched.py", "--cli", tmp_path, *command, "--cpu", "true",
                         "--output_dir", tmp_path / "launched")
    notes = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert notes == [{"status": 0, "world_size": 2}] * 2  # one group of two, both exited cleanly
    assert main([*command, "--output_dir", str(tmp_path / "single")]) == 0
    written = json.loads((tmp_path / "launched" / "scores.json").read_text())
    assert (written["method"], written["form"], written["modules"]) == ("adam-ie", "adjoint", ["all"])
    single = load_scores(tmp_path / "single")
    assert single.abs().max() > 0
    torch.testing.assert_close(load_scores(tmp_path / "launched"), single, rtol=1e-10, atol=1e-12 * float(single.abs().max()))
