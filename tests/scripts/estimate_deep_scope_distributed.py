"""Run under `accelerate launch --multi_gpu --num_processes 2 ... RUN_DIR DATASET_DIR OUT`: each process
propagates its shard of rows for a deep scope (the last block and above, the whole model run per step);
the main process saves the gathered embeddings of both methods."""

import sys
from pathlib import Path

import torch
from datasets import load_from_disk
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parents[2]))

from hf_accinf import RunReader  # noqa: E402
from hf_accinf.engine import ShardContext  # noqa: E402
from hf_accinf.problem import problem_from_run  # noqa: E402
from tests.engine.helpers import estimate  # noqa: E402


def main(run_dir: str, dataset_dir: str, out_file: str) -> None:
    torch.set_num_threads(1)
    shard = ShardContext.from_accelerate(cpu=True)
    assert shard.world_size == 2, shard.world_size
    problem = problem_from_run(RunReader(run_dir), modules=["last:1"], train_dataset=load_from_disk(dataset_dir))
    results = {"world_size": torch.tensor(shard.world_size)}
    for method in ("sgd-ie", "acc-sgd-ie"):
        result = estimate(problem, method, schedule="sweep", shard=shard, progress=False)
        results[method] = result.embeddings
    if shard.is_main:
        save_file({k: v.contiguous() for k, v in results.items()}, out_file)
    shard.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
