"""Time ``--verify K``: the batched retraining against the sequential replay it replaced, on a recorded run.

The sequential baseline is what ``--verify`` did before the batched retraining: ``Replay.train`` once for the
base run and once for each of the ``2K`` counterfactuals, one after another, each model then evaluated on
the evaluation set. The batched run is :func:`hf_accinf.scoring.verify.leave_one_out_effects`. Both
retrain the same rows (``--seed``) and the script prints their seconds and the largest difference of their
truths (float32 round-off of two implementations of the same counterfactual).

    hf-accinf train --config configs/quickstart.yaml --output_dir runs/quickstart
    python scripts/bench_verify.py --run_dir runs/quickstart --k 10 50 --sequential 10

Name the machine and its load with the figures: timings on a shared machine are not published.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import torch

from hf_accinf import RunReader
from hf_accinf.inputs.collate import eval_collator
from hf_accinf.inputs.evaluation import evaluation_batches
from hf_accinf.trajectory.recorded_data import load_recorded_data
from hf_accinf.scoring.verify import leave_one_out_effects
from hf_accinf.trajectory.replay import Replay


def sequential_effects(run: RunReader, train, collate, held_out,
                       rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The changes of the mean eval loss at weight 0 and 0.5, retrained one model after another."""
    replay = Replay(run, train, collate)
    model = run.build_model().eval()
    batches = evaluation_batches(model, held_out, collate)

    def loss(weight_scale) -> float:
        model.load_state_dict(replay.train(weight_scale))
        total, count = 0.0, 0
        with torch.no_grad():
            for inputs, labels in batches:
                logits = model(**inputs).logits.double()
                total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum", ignore_index=-100))
                count += int((labels >= 0).sum())
        return total / count

    base = loss(None)
    zero = torch.tensor([loss({int(row): 0.0}) for row in rows]) - base
    half = torch.tensor([loss({int(row): 0.5}) for row in rows]) - base
    return zero, half


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True, help="a run recorded by `hf-accinf train`")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 50], help="rows of the batched verify")
    parser.add_argument("--sequential", type=int, nargs="*", default=[10], help="rows of the sequential baseline")
    parser.add_argument("--memory_budget_gb", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run = RunReader(args.run_dir)
    train, held_out, collate = load_recorded_data(args.run_dir)
    collate = eval_collator(run.build_model(), None, collate)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                      "rows": len(train), "eval_rows": len(held_out), "steps": run.num_steps}))
    batched = {}
    for k in args.k:
        rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:k].sort().values
        began = time.perf_counter()
        effects = leave_one_out_effects(run, train, collate, held_out, rows, collate,
                                        memory_budget=int(args.memory_budget_gb * 2**30))
        batched[k] = effects
        print(json.dumps({"mode": "batched", "k": k, "models": 2 * k + 1, "seconds": time.perf_counter() - began,
                          "models_per_chunk": effects.models_per_chunk, "replay_error": effects.replay_error,
                          "loss_error": effects.loss_error, "peak_rss_gb": _peak_rss_gb()}))
    for k in args.sequential:
        rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:k].sort().values
        began = time.perf_counter()
        zero, half = sequential_effects(run, train, collate, held_out, rows)
        record = {"mode": "sequential", "k": k, "models": 2 * k + 1, "seconds": time.perf_counter() - began}
        if k in batched:
            record["max_truth_difference"] = float(max((zero - batched[k].zero).abs().max(),
                                                       (half - batched[k].half).abs().max()))
            record["max_truth"] = float(batched[k].zero.abs().max())
        record["peak_rss_gb"] = _peak_rss_gb()
        print(json.dumps(record))


def _peak_rss_gb() -> float:
    """This process's peak resident memory so far (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


if __name__ == "__main__":
    main()
