"""Two real processes each own half of the samples; gathered results equal the single-process ones."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
import torch
from safetensors.torch import load_file

from hf_accinf.engine import CorrectionPolicy, ShardContext, estimate_influence
from hf_accinf.methods.registry import build_method
from tests.engine.helpers import make_problem
from tests.scripts.estimate_distributed import SHARDED_METHODS

ROOT = Path(__file__).parents[2]


def test_shard_ranges_cover_every_sample_once():
    for world in (1, 2, 3, 7):
        ranges = [ShardContext(rank, world).sample_range(23) for rank in range(world)]
        covered = [i for lo, hi in ranges for i in range(lo, hi)]
        assert covered == list(range(23))


@pytest.mark.slow
def test_two_processes_reproduce_the_single_process_embeddings(tmp_path):
    out = tmp_path / "sharded.safetensors"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "tests/scripts/estimate_distributed.py"), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = load_file(out)
    assert int(sharded["world_size"]) == 2
    problem = make_problem(num_samples=23, batch_size=5, epochs=3)
    for method, options in SHARDED_METHODS.items():
        for schedule in ("sweep", "propagator"):
            policy = CorrectionPolicy("random", p=0.5, seed=1) if method.startswith("acc-") else None
            rule = build_method(problem, method, **options)
            single = estimate_influence(problem, rule, policy=policy, schedule=schedule, progress=False)
            torch.testing.assert_close(sharded[f"{method}/{schedule}"], single.embeddings, rtol=1e-12, atol=1e-15)
