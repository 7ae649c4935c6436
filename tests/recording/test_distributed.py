"""Two real processes (gloo on CPU) under `accelerate launch`: the recorded global batches are exactly
the rows the two processes' datasets served, grouped by optimizer step."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from hf_accinf import RunReader
from tests.launch import LAUNCH, run_command

SCRIPT = Path(__file__).parents[1] / "scripts" / "record_distributed.py"


def _launch(out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_command([*LAUNCH, str(SCRIPT), str(out_dir), *extra], check=False)


@pytest.mark.slow
def test_two_processes_record_the_global_batches_they_consumed(tmp_path):
    result = _launch(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [json.loads((tmp_path / f"served-{rank}.json").read_text()) for rank in (0, 1)]
    assert [log["world_size"] for log in logs] == [2, 2]
    run = RunReader(tmp_path / "run")
    assert run.manifest.training.world_size == 2
    trajectory = run.trajectory()

    # Split what each process's dataset served into its micro-batches, then group by optimizer step
    # (2 micro-batches per step; 7 per process and epoch, so the last step of an epoch has one).
    per_process = []
    for log in logs:
        served, batches = log["served"], []
        for size in log["sizes"]:
            batches.append(served[:size])
            served = served[size:]
        assert not served
        per_process.append(batches)
    expected, micro_per_epoch = [], 7
    for epoch in range(2):
        for first in range(0, micro_per_epoch, 2):
            ids = [epoch * micro_per_epoch + i for i in range(first, min(first + 2, micro_per_epoch))]
            expected.append(sorted(row for batches in per_process for i in ids for row in batches[i]))
    assert trajectory.num_steps == len(expected) == 8
    for step, rows in enumerate(expected):
        assert sorted(trajectory.batch(step).tolist()) == rows
    # even_batches pads each epoch's 25 rows per process to 28: 6 repeated rows per epoch, kept with multiplicity.
    epoch0 = torch.cat([trajectory.batch(t) for t in range(4)])
    assert len(epoch0) == 56 and len(set(epoch0.tolist())) == 50
    # What the Trainer really applied: BERT's loss is a micro-batch mean that ignores num_items_in_batch, yet the
    # Trainer treats it as normalised over the step: it multiplies it by the world size (2) and skips the division by
    # gradient accumulation (2); DDP then averages over the 2 processes. Each row weighs 2 / 4 / 2 = 1/4, not 1/16.
    torch.testing.assert_close(trajectory.row_weight, torch.full_like(trajectory.row_weight, 1 / 4))
    # The recorded loss is the objective whose gradient the optimizer applied, sum_i w_i l_i over both processes'
    # rows (recomputed from the recorded head inputs and head parameters), not that times the world size.
    for step in range(trajectory.num_steps):
        rows = trajectory.rows_of(step)
        logits = trajectory.head_input[rows].double() @ trajectory.params["weight"][step].double().T + trajectory.params["bias"][step].double()
        losses = torch.nn.functional.cross_entropy(logits, trajectory.labels[rows], reduction="none")
        torch.testing.assert_close(trajectory.loss[step].double(), (trajectory.row_weight[rows] * losses).sum(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_processes_that_do_not_form_one_group_are_refused(tmp_path):
    result = _launch(tmp_path, "--no-cpu")
    assert result.returncode != 0
    assert "did not join one process group" in result.stderr
