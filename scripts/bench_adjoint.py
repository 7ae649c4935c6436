"""Adjoint form against forward form as N grows (DESIGN.md section 6b "Forms"; issue 11, deliverable 3).

    python scripts/bench_adjoint.py [--sizes 1000 10000 100000] [--dtype float32] [--threads 2]

A linear head (``--width`` x ``--classes``, batch 32, 3 epochs, lr 0.05, as section 2 of
``scripts/bench_engine.py``) trained with SGD; SGD-IE scores of one objective by the forward form (the
engine's schedule picked by its cost model, then one dot product per row) and by the adjoint form (one
backward pass), their largest difference, and the trust check's cost (tangent growth, default probes).
The machine is printed first. Every figure comes from this one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from hf_accinf.engine import estimate_influence
from hf_accinf.engine.adjoint import adjoint_scores
from hf_accinf.engine.estimator import make_rule
from hf_accinf.engine.trust import trust_check
from hf_accinf.problem import InfluenceProblem

from bench_engine import BATCH, EPOCHS, linear_head_problem  # scripts/ is on sys.path when a script runs


def head_problem(num_samples: int, width: int, classes: int, dtype: torch.dtype, seed: int = 0) -> InfluenceProblem:
    """The engine benchmark's SGD-trained linear head (same batch, epochs and learning rate)."""
    return linear_head_problem(num_samples, dtype, seed, "SGD", width, classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.platform()}; {args.dtype}")
    print(f"linear head {args.width} x {args.classes}, batch {BATCH}, {EPOCHS} epochs, SGD-IE, one objective")
    print("| N | steps | forward (s) | schedule | adjoint (s) | speed-up | max rel. difference | trust check (s) |")
    print("|---|---|---|---|---|---|---|---|")
    warm = head_problem(2 * BATCH, args.width, args.classes, dtype)  # first calls pay one-off initialization
    estimate_influence(warm, "sgd-ie", progress=False)
    rule, _ = make_rule(warm, "sgd-ie", "exact")
    adjoint_scores(rule, warm, torch.zeros(warm.curvature.dim, dtype=dtype), progress=False)
    trust_check(rule, warm)
    for size in args.sizes:
        problem = head_problem(size, args.width, args.classes, dtype)
        objective = torch.randn(problem.curvature.dim, dtype=dtype, generator=torch.Generator().manual_seed(1))
        began = time.perf_counter()
        result = estimate_influence(problem, "sgd-ie", progress=False)
        forward = result.embeddings @ objective
        forward_seconds = time.perf_counter() - began
        rule, _ = make_rule(problem, "sgd-ie", "exact")
        began = time.perf_counter()
        adjoint = adjoint_scores(rule, problem, objective, progress=False)
        adjoint_seconds = time.perf_counter() - began
        began = time.perf_counter()
        trust_check(rule, problem)
        trust_seconds = time.perf_counter() - began
        difference = float((adjoint - forward).abs().max() / forward.abs().max())
        print(f"| {size} | {problem.trajectory.num_steps} | {forward_seconds:.2f} | {result.schedule} | "
              f"{adjoint_seconds:.2f} | {forward_seconds / adjoint_seconds:.1f}x | {difference:.1e} | "
              f"{trust_seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
