"""Run under `accelerate launch --multi_gpu --num_processes 2`: each process propagates its shard of
samples; the gathered embeddings of every (method, schedule) are saved by the main process."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parents[2]))

from hf_accinf.engine import CorrectionPolicy, ShardContext, estimate_influence  # noqa: E402
from hf_accinf.methods.registry import build_method  # noqa: E402
from tests.engine.helpers import make_problem  # noqa: E402
from tests.methods.helpers import make_adam_problem  # noqa: E402

# method: (the run it needs, its options)
SHARDED_METHODS = {"sgd-ie": ("sgd", {}), "acc-sgd-ie": ("sgd", {}), "acc-dvemb": ("sgd", {"projection_dim": 5}),
                   "adam-ie": ("adam", {}), "acc-adam-ie": ("adam", {"removal": "first-order"})}


def sharded_problem(run: str):
    """The SGD (momentum, clipping, a repeated row) or AdamW (warm-up and decay, clipping) problem of 23 samples."""
    if run == "sgd":
        return make_problem(num_samples=23, batch_size=5, epochs=3)
    return make_adam_problem("AdamW", num_samples=23, batch_size=5, epochs=3)


def main(out_file: str) -> None:
    shard = ShardContext.from_accelerate(cpu=True)
    assert shard.world_size == 2, shard.world_size
    problems = {run: sharded_problem(run) for run in ("sgd", "adam")}
    results = {"world_size": torch.tensor(shard.world_size)}
    for method, (run, options) in SHARDED_METHODS.items():
        problem = problems[run]
        for schedule in ("sweep", "propagator"):
            policy = CorrectionPolicy("random", p=0.5, seed=1) if method.startswith("acc-") else None
            rule = build_method(problem, method, **options)
            result = estimate_influence(problem, rule, policy=policy, schedule=schedule, shard=shard, progress=False)
            results[f"{method}/{schedule}"] = result.embeddings
    if shard.is_main:
        save_file({k: v.contiguous() for k, v in results.items()}, out_file)
    shard.close()


if __name__ == "__main__":
    main(sys.argv[1])
