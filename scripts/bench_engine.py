"""Engine benchmarks, side by side in one run (DESIGN.md section 6; issue 8, item 8).

    python scripts/bench_engine.py [--sizes 1000 10000 100000] [--dtype float32] [--quick]

1. the engine against a naive per-sample oracle (autograd HVPs, one sample at a time, as the paper's
   code does) on a 768-wide linear head at N = 2000: ratio and the largest score difference;
2. propagator form against the sweep as N grows (linear head, d = 768, C = 2, batch 32, 3 epochs,
   ACC-SGD-IE); sweeps too long to run whole are timed on their first steps and extrapolated
   (marked "est.");
3. ACC-SGD-IE against SGD-IE, randomized (p = 0.5) and stage-limited (first epoch) corrections;
4. achieved GFLOP/s of the per-step transition against a plain ``torch.matmul`` of the same shape;
5. cost per method of the registry on the same head trained with AdamW (warm-up, linear decay,
   clipping 1.0): both schedules of the forward form and the adjoint form (``--adam-size`` rows).

The machine is printed first. Every figure comes from this one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from torch import nn

from hf_accinf.engine import CorrectionPolicy, estimate_influence, every_occurrence
from hf_accinf.engine.plan import build_plan, choose_schedule
from hf_accinf.engine.sweep import sweep
from hf_accinf.evaluation.retrain import train_recorded, train_sgd
from hf_accinf.methods.registry import METHODS, build_method, method_names
from hf_accinf.problem import InfluenceProblem, make_curvature

WIDTH, CLASSES, BATCH, EPOCHS, LR = 768, 2, 32, 3, 0.05


def linear_head_problem(num_samples: int, dtype: torch.dtype, seed: int = 0, optimizer: str = "SGD",
                        width: int = WIDTH, classes: int = CLASSES, device: str = "cpu") -> InfluenceProblem:
    """A linear head on ``width``-wide features trained with SGD, or with AdamW as the HF default recipe
    (10% warm-up then linear decay, clipping 1.0), labels from a noisy linear teacher (also used by
    scripts/bench_adjoint.py). Trained on the CPU; the problem's curvature lives on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_samples, width, generator=generator, dtype=dtype) / width**0.5
    teacher = torch.randn(width, classes, generator=generator, dtype=dtype) * 3
    labels = (features @ teacher + 0.5 * torch.randn(num_samples, classes, generator=generator, dtype=dtype)).argmax(1)
    batches = [b for _ in range(EPOCHS) for b in torch.randperm(num_samples, generator=generator).split(BATCH)]
    torch.manual_seed(seed)
    head = nn.Linear(width, classes).to(dtype)
    if optimizer == "SGD":
        trajectory, spec = train_sgd(head, features, labels, batches, [LR] * len(batches))
    else:
        steps, warm = len(batches), max(1, len(batches) // 10)
        lrs = [1e-3 * min((t + 1) / warm, (steps - t) / (steps - warm)) for t in range(steps)]
        trajectory, spec = train_recorded(head, features, labels, batches, lrs, optimizer, weight_decay=0.01,
                                          max_grad_norm=1.0, no_decay=("bias",))
    curvature = make_curvature(trajectory, head, ["weight", "bias"], 0.0, dtype, device)
    problem = InfluenceProblem(trajectory, curvature, spec, num_samples)
    problem.head = head
    return problem


def in_precision(problem: InfluenceProblem, dtype: torch.dtype) -> InfluenceProblem:
    """The same recorded run, propagated in another precision."""
    curvature = make_curvature(problem.trajectory, problem.head, ["weight", "bias"], 0.0, dtype, "cpu")
    return InfluenceProblem(problem.trajectory, curvature, problem.optimizer, problem.num_samples)


def naive_scores(problem: InfluenceProblem, samples: range, objective: torch.Tensor) -> torch.Tensor:
    """ACC-SGD-IE one sample at a time with autograd HVPs (plain SGD, no clipping, as the paper's code)."""
    trajectory = problem.trajectory
    scores = []
    for j in samples:
        delta = torch.zeros(problem.curvature.dim, dtype=objective.dtype)
        for t in range(trajectory.num_steps):
            rows = trajectory.rows_of(t)
            x = trajectory.head_input[rows].to(objective.dtype)
            y = trajectory.labels[rows]
            weight = trajectory.params["weight"][t].to(objective.dtype).clone().requires_grad_(True)
            bias = trajectory.params["bias"][t].to(objective.dtype).clone().requires_grad_(True)
            losses = nn.functional.cross_entropy(x @ weight.T + bias, y, reduction="none")
            mine = trajectory.batch(t) == j
            batch_weights = trajectory.row_weight[rows].to(objective.dtype)
            direction = delta.view(CLASSES, WIDTH + 1)
            grads = torch.autograd.grad((batch_weights * losses).sum(), (weight, bias), create_graph=True)
            dot = (grads[0] * direction[:, :WIDTH]).sum() + grads[1] @ direction[:, WIDTH]
            hvp = torch.autograd.grad(dot, (weight, bias), retain_graph=True)
            change = torch.cat([hvp[0], hvp[1][:, None]], 1).flatten()
            if mine.any():
                own_weight = batch_weights[mine].sum()
                own = torch.autograd.grad(losses[mine][0], (weight, bias), create_graph=True)
                own_dot = (own[0] * direction[:, :WIDTH]).sum() + own[1] @ direction[:, WIDTH]
                own_hvp = torch.autograd.grad(own_dot, (weight, bias))
                own_grad = torch.cat([own[0].detach(), own[1].detach()[:, None]], 1).flatten()
                change = change - own_weight * (torch.cat([own_hvp[0], own_hvp[1][:, None]], 1).flatten() + own_grad)
            delta = (delta - float(trajectory.lr[t, 0]) * change).detach()
        scores.append(delta @ objective)
    return torch.stack(scores)


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def bench_oracle(dtype: torch.dtype, oracle_samples: int) -> None:
    problem = linear_head_problem(2000, torch.float64)
    objective = torch.randn(problem.curvature.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    acc = CorrectionPolicy("all")
    result, engine_seconds = timed(estimate_influence, problem, build_method(problem, "acc-sgd-ie"), acc, progress=False)
    engine_scores = result.embeddings @ objective
    single = in_precision(problem, torch.float32)
    single_result, single_seconds = timed(estimate_influence, single, build_method(single, "acc-sgd-ie"), acc,
                                          progress=False)
    single_difference = ((single_result.embeddings.double() @ objective) - engine_scores).abs().max() / engine_scores.abs().max()
    naive, naive_seconds = timed(naive_scores, problem, range(oracle_samples), objective)
    naive_total = naive_seconds * 2000 / oracle_samples
    difference = (naive - engine_scores[:oracle_samples]).abs().max() / engine_scores.abs().max()
    print("\n### 1. Engine vs naive per-sample oracle (ACC-SGD-IE, N = 2000, linear head 768 x 2, float64)\n")
    print("| | seconds | ratio |\n|---|---|---|")
    print(f"| naive per-sample loop (timed on {oracle_samples} samples, x {2000 // oracle_samples}) | {naive_total:.1f} est. | 1 |")
    print(f"| engine ({result.schedule}, float64) | {engine_seconds:.2f} | {naive_total / engine_seconds:.0f}x faster |")
    print(f"| engine ({single_result.schedule}, float32) | {single_seconds:.2f} | {naive_total / single_seconds:.0f}x faster |")
    print(f"\nlargest score difference, naive vs float64 engine on the timed samples: {difference:.1e} of the largest "
          f"score; float32 engine vs float64 engine on all 2000: {single_difference:.1e}")


def bench_schedules(sizes: list[int], dtype: torch.dtype, sweep_budget_steps: int) -> None:
    print(f"\n### 2. Propagator vs sweep (ACC-SGD-IE, linear head {WIDTH} x {CLASSES}, batch {BATCH}, "
          f"{EPOCHS} epochs, {str(dtype).replace('torch.', '')})\n")
    print("| N | steps | sweep (s) | propagator (s) | propagator speed-up | auto picks |\n|---|---|---|---|---|---|")
    for size in sizes:
        problem = linear_head_problem(size, dtype)
        steps = problem.trajectory.num_steps
        rule = build_method(problem, "acc-sgd-ie", removal="exact")
        propagated, propagator_seconds = timed(estimate_influence, problem, rule, CorrectionPolicy("all"),
                                               schedule="propagator", progress=False)
        plan = build_plan(problem.trajectory, 0, size)
        if steps <= sweep_budget_steps:
            swept, sweep_seconds = timed(estimate_influence, problem, rule, CorrectionPolicy("all"), schedule="sweep",
                                         progress=False)
            sweep_text = f"{sweep_seconds:.1f}"
            gap = (swept.embeddings - propagated.embeddings).abs().max() / swept.embeddings.abs().max()
            sweep_text += f" (max rel. diff {gap:.0e})"
        else:
            plan.steps = plan.steps[:sweep_budget_steps]
            _, partial = timed(sweep, rule, plan, CorrectionPolicy("all"), problem.trajectory.epoch, dtype, "cpu")
            sweep_seconds = partial * steps / sweep_budget_steps
            sweep_text = f"{sweep_seconds:.0f} est. ({sweep_budget_steps} steps timed)"
        auto = choose_schedule(build_plan(problem.trajectory, 0, size), size, rule.state_dim, BATCH)[0]
        print(f"| {size} | {steps} | {sweep_text} | {propagator_seconds:.1f} | {sweep_seconds / propagator_seconds:.1f}x | {auto} |")


def bench_policies(size: int, dtype: torch.dtype) -> None:
    problem = linear_head_problem(size, dtype)
    steps_per_epoch = -(-size // BATCH)
    print(f"\n### 3. Method and correction-policy cost (N = {size}, propagator, {str(dtype).replace('torch.', '')})\n")
    print("| method | seconds | relative to SGD-IE |\n|---|---|---|")
    runs = [
        ("SGD-IE", "sgd-ie", None),
        ("ACC-SGD-IE (every occurrence)", "acc-sgd-ie", CorrectionPolicy("all")),
        ("ACC-SGD-IE randomized p = 0.5", "acc-sgd-ie", CorrectionPolicy("random", p=0.5)),
        ("ACC-SGD-IE stage-limited to epoch 1", "acc-sgd-ie", CorrectionPolicy("stage", stages=[(0, steps_per_epoch)])),
    ]
    base = None
    for name, method, policy in runs:
        _, seconds = timed(estimate_influence, problem, build_method(problem, method), policy=policy,
                           schedule="propagator", progress=False)
        base = base or seconds
        print(f"| {name} | {seconds:.2f} | {seconds / base:.2f} |")


def bench_flops(dtype: torch.dtype, repeats: int = 30) -> None:
    problem = linear_head_problem(4096, dtype)
    rule = build_method(problem, "acc-sgd-ie", removal="exact")
    size = rule.state_dim
    block = torch.randn(size, size, dtype=dtype)
    ops = [rule.at_step(t) for t in range(repeats)]
    for op in ops[:3]:
        op.apply(block)
    start = time.perf_counter()
    for op in ops:
        op.apply(block)
    transition = (time.perf_counter() - start) / repeats
    centred = CLASSES - 1  # the closed form works in the C - 1 centred class directions
    flops = 2 * 2 * size * centred * (WIDTH + 1) * BATCH  # two GEMMs (S (C-1) x d) by (d x b), the arithmetic done
    left = torch.randn(size * centred, WIDTH + 1, dtype=dtype)
    right = torch.randn(WIDTH + 1, BATCH, dtype=dtype)
    for _ in range(3):
        left @ right
    start = time.perf_counter()
    for _ in range(repeats):
        left @ right
    matmul = (time.perf_counter() - start) / repeats
    matmul_rate, transition_rate = 2 * left.shape[0] * left.shape[1] * BATCH / matmul / 1e9, flops / transition / 1e9
    print(f"\n### 4. Per-step transition M_t on S = {size} vectors ({str(dtype).replace('torch.', '')})\n")
    print("| | ms | GFLOP/s |\n|---|---|---|")
    print(f"| torch.matmul ({size * centred} x {WIDTH + 1}) @ ({WIDTH + 1} x {BATCH}) | {1e3 * matmul:.2f} | {matmul_rate:.1f} |")
    print(f"| transition M_t (two such GEMMs, class centring, mixing, the SGD update) | {1e3 * transition:.2f} | {transition_rate:.1f} "
          f"({100 * transition_rate / matmul_rate:.0f}% of matmul) |")


def bench_methods(size: int, dtype: torch.dtype, projection_dim: int) -> None:
    """Every registered method that models AdamW, on one AdamW run: the forward form in both schedules and,
    for classical methods, the adjoint form (one objective)."""
    from hf_accinf.engine.adjoint import adjoint_scores

    problem = linear_head_problem(size, dtype, optimizer="AdamW")
    print(f"\n### 5. Cost per method on an AdamW run (N = {size}, linear head {WIDTH} x {CLASSES}, batch {BATCH}, "
          f"{EPOCHS} epochs, {str(dtype).replace('torch.', '')})\n")
    print("| method | variant | state S | sweep (s) | propagator (s) | adjoint (s) |\n|---|---|---|---|---|---|")
    objective = torch.randn(problem.curvature.dim, dtype=dtype)
    for name in method_names("AdamW"):
        if METHODS[name].output == "scores":
            _, seconds = timed(build_method(problem, name).scores, lambda step: objective)
            print(f"| {METHODS[name].display} | direct scores | - | - | - | {seconds:.2f} |")
            continue
        if name.endswith("dvemb"):
            variants = [(f"projected k = {projection_dim}", dict(projection_dim=projection_dim)),
                        ("unprojected (k = P)", dict(projection_dim=0))]
        else:
            variants = [("exact removal", dict(removal="exact")), ("first-order removal", dict(removal="first-order"))]
            if name.startswith("acc-"):
                variants.append(("exact, frozen v", dict(removal="exact", frozen_preconditioner=True)))
        for label, options in variants:
            rule = build_method(problem, name, **options)  # a fresh rule per timing: DVEmb caches its step factors
            times = [timed(estimate_influence, problem, build_method(problem, name, **options), every_occurrence(rule),
                           schedule=schedule, progress=False)[1] for schedule in ("sweep", "propagator")]
            adjoint = "- (ACC: forward form)" if rule.accumulative else \
                f"{timed(adjoint_scores, rule, problem, rule.embed_gradient(objective), progress=False)[1]:.2f}"
            print(f"| {METHODS[name].display} | {label} | {rule.state_dim} | {times[0]:.2f} | {times[1]:.2f} | {adjoint} |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--oracle-samples", type=int, default=20)
    parser.add_argument("--sweep-budget-steps", type=int, default=1000)
    parser.add_argument("--policy-size", type=int, default=10000)
    parser.add_argument("--adam-size", type=int, default=2000)
    parser.add_argument("--projection-dim", type=int, default=512, help="k of DVEmb in section 5")
    parser.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (named in the output; two can be 15-35x slower than one on a shared 2-core machine)")
    options = parser.parse_args()
    dtype = getattr(torch, options.dtype)
    torch.set_num_threads(options.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    sections = {
        1: lambda: bench_oracle(dtype, options.oracle_samples),
        2: lambda: bench_schedules(options.sizes, dtype, options.sweep_budget_steps),
        3: lambda: bench_policies(options.policy_size, dtype),
        4: lambda: bench_flops(dtype),
        5: lambda: bench_methods(options.adam_size, dtype, options.projection_dim),
    }
    for section in options.sections:
        sections[section]()


if __name__ == "__main__":
    main()
