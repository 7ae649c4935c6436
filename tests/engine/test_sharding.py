"""Two real processes each own half of the samples; gathered results equal the single-process ones."""

import pytest
import torch
from safetensors.torch import load_file

from hf_accinf.engine import CorrectionPolicy, ShardContext, estimate_influence
from hf_accinf.methods.registry import build_method
from tests.launch import ROOT, launch_two_processes
from tests.scripts.estimate_distributed import SHARDED_METHODS, sharded_problem


def test_shard_ranges_cover_every_sample_once():
    for world in (1, 2, 3, 7):
        ranges = [ShardContext(rank, world).sample_range(23) for rank in range(world)]
        covered = [i for lo, hi in ranges for i in range(lo, hi)]
        assert covered == list(range(23))


@pytest.mark.slow
def test_two_processes_reproduce_the_single_process_embeddings(tmp_path):
    out = tmp_path / "sharded.safetensors"
    launch_two_processes(ROOT / "tests/scripts/estimate_distributed.py", out)
    sharded = load_file(out)
    assert int(sharded["world_size"]) == 2
    problems = {run: sharded_problem(run) for run in ("sgd", "adam")}
    for method, (run, options) in SHARDED_METHODS.items():
        problem = problems[run]
        for schedule in ("sweep", "propagator"):
            policy = CorrectionPolicy("random", p=0.5, seed=1) if method.startswith("acc-") else None
            rule = build_method(problem, method, **options)
            single = estimate_influence(problem, rule, policy=policy, schedule=schedule, progress=False)
            torch.testing.assert_close(sharded[f"{method}/{schedule}"], single.embeddings, rtol=1e-12, atol=1e-15)
