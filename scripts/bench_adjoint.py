"""Adjoint form against forward form as N grows (DESIGN.md section 6b "Forms"; issue 11, deliverable 3).

    python scripts/bench_adjoint.py [--sizes 1000 10000 100000] [--dtype float32] [--threads 2]
    python scripts/bench_adjoint.py --profile [--dtype float64] [--removal exact] [--probes 4] [--threads 1]
    python scripts/bench_adjoint.py --precision [--rows 64] [--epochs 2] [--threads 1]
    python scripts/bench_adjoint.py --runs quickstart minilm [--verify 100] [--threads 1]

A linear head (``--width`` x ``--classes``, batch 32, 3 epochs, lr 0.05, as section 2 of
``scripts/bench_engine.py``) trained with SGD; SGD-IE scores of one objective by the forward form (the
engine's schedule picked by its cost model, then one dot product per row) and by the adjoint form (one
backward pass), their largest difference, and the two trust figures' cost (the adjoint with its 4 random probes
riding on the backward pass; the power-iteration trust check, default probes).
The machine is printed first. Every figure comes from this one run.

``--profile``: a tiny BERT (examples.tiny_bert, dropout off) trained on synthetic text with the HF default AdamW
recipe and replayed from checkpoints every 8 steps, scored whole-model by the adam-ie adjoint; prints where each
adjoint step's time goes (the step operator's construction, the injections, the adjoint product; inside them:
replay, the batch gradient, products with H_B, per-row quantities). It runs any hf_accinf on PYTHONPATH
(main's code path before issue 18 included: no probes there). ``--precision``: float32 against float64
whole-model adjoint scores (Kendall tau, relative error) on the same tiny BERT and on a tiny ViT (digits).

``--runs``: the project's configs end to end through the installed command, as a user runs them:
``hf-accinf train --config configs/<config>.yaml``, then ``hf-accinf score`` with the defaults (the whole-model
adam-ie adjoint) without trust, then with the default trust figure and ``--verify K``. Each phase is its own
process: wall time and peak RSS (``os.wait4``) per phase, the adjoint's and the trust figure's seconds from
``scores.json``, and Kendall tau against K rows retrained out exactly (with its bootstrap interval and the
linearity ceiling). ``--runs_dir`` keeps the runs (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import hf_accinf
from hf_accinf.engine import estimate_influence
from hf_accinf.engine.adjoint import adjoint_scores
from hf_accinf.methods.registry import build_method
from hf_accinf.engine.trust import trust_check
from hf_accinf.problem import InfluenceProblem

from bench_engine import BATCH, EPOCHS, linear_head_problem  # scripts/ is on sys.path when a script runs


def head_problem(num_samples: int, width: int, classes: int, dtype: torch.dtype, seed: int = 0,
                 device: str = "cpu") -> InfluenceProblem:
    """The engine benchmark's SGD-trained linear head (same batch, epochs and learning rate), scored on ``device``."""
    return linear_head_problem(num_samples, dtype, seed, "SGD", width, classes, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="the head's sizes: cpu or cuda (cuda:i)")
    parser.add_argument("--profile", action="store_true",
                        help="instead: the per-step time split of the whole-model adjoint on a tiny BERT run")
    parser.add_argument("--rows", type=int, default=64, help="--profile: training rows (batch 8)")
    parser.add_argument("--epochs", type=int, default=2, help="--profile: epochs")
    parser.add_argument("--removal", default="exact", choices=["exact", "first-order"], help="--profile: removal")
    parser.add_argument("--probes", type=int, default=4, help="--profile: trust probes carried by the adjoint")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="--profile: the run's clipping")
    parser.add_argument("--precision", action="store_true",
                        help="instead: float32 against float64 whole-model adjoint scores on a tiny BERT and ViT")
    parser.add_argument("--runs", nargs="+", choices=sorted(RUN_CONFIGS), help="instead: the configs end to end")
    parser.add_argument("--verify", type=int, default=100,
                        help="--runs: rows retrained out for Kendall tau (0: none, the second score run has trust only)")
    parser.add_argument("--runs_dir", help="--runs: where to keep the runs (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.runs:
        runs(args.runs, args.verify, args.threads, args.runs_dir)
        return
    dtype = getattr(torch, args.dtype)
    if args.precision:
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
              f"torch {torch.__version__}; adam-ie {args.removal}, {args.rows} rows, batch 8, {args.epochs} epochs")
        precision(args.rows, args.epochs, args.removal)
        return
    if args.profile:
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
              f"torch {torch.__version__}; hf_accinf from {os.path.dirname(hf_accinf.__file__)}")
        profile(args.rows, args.epochs, dtype, args.removal, args.probes, args.max_grad_norm)
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.platform()}; {args.dtype} on {args.device}"
          + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else ""))
    print(f"linear head {args.width} x {args.classes}, batch {BATCH}, {EPOCHS} epochs, SGD-IE, one objective")
    print("| N | steps | forward (s) | schedule | adjoint (s) | speed-up | max rel. difference | "
          "adjoint with 4 trust probes (s) | power-iteration trust check (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    warm = head_problem(2 * BATCH, args.width, args.classes, dtype, device=args.device)  # one-off initialization
    rule = build_method(warm, "sgd-ie", removal="exact")
    estimate_influence(warm, rule, progress=False)
    adjoint_scores(rule, warm, torch.zeros(warm.curvature.dim, dtype=dtype, device=args.device), progress=False)
    trust_check(rule, warm)
    for size in args.sizes:
        problem = head_problem(size, args.width, args.classes, dtype, device=args.device)
        objective = torch.randn(problem.curvature.dim, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(args.device)
        began = time.perf_counter()
        rule = build_method(problem, "sgd-ie", removal="exact")
        result = estimate_influence(problem, rule, progress=False)
        forward = result.embeddings @ objective
        forward_seconds = time.perf_counter() - began
        began = time.perf_counter()
        adjoint = adjoint_scores(rule, problem, objective, progress=False).scores
        adjoint_seconds = time.perf_counter() - began
        began = time.perf_counter()
        adjoint_scores(rule, problem, objective, progress=False, probes=4)
        probes_seconds = time.perf_counter() - began
        began = time.perf_counter()
        trust_check(rule, problem)
        trust_seconds = time.perf_counter() - began
        difference = float((adjoint - forward).abs().max() / forward.abs().max())
        print(f"| {size} | {problem.trajectory.num_steps} | {forward_seconds:.2f} | {result.schedule} | "
              f"{adjoint_seconds:.2f} | {forward_seconds / adjoint_seconds:.1f}x | {difference:.1e} | "
              f"{probes_seconds:.2f} | {trust_seconds:.2f} |", flush=True)


# ---- --profile: the per-step time split of the whole-model adjoint on a tiny BERT run -------------------------

class _PhaseClock:
    """Exclusive wall time per (phase, kind): phases are the adjoint loop's calls on the step operator, kinds
    the curvature work inside them (replay of theta_t, products with H_B, per-row gradients, loss tangents)."""

    def __init__(self):
        self.seconds: dict[tuple[str, str], float] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.phase, self.stack, self.kinds = "other", [], []

    def timed(self, kind: str, function, phase: str | None = None):
        def wrapper(*args, **kwargs):
            outer_phase = self.phase
            if phase is not None:
                self.phase = phase
            key = (self.phase, kind)
            nested = bool(self.kinds) and self.kinds[-1] == kind  # hvp_add calling hvp: one product
            self.kinds.append(kind)
            self.stack.append(0.0)
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - began
                inner = self.stack.pop()
                self.seconds[key] = self.seconds.get(key, 0.0) + elapsed - inner
                self.counts[key] = self.counts.get(key, 0) + (not nested)
                self.kinds.pop()
                if self.stack:
                    self.stack[-1] += elapsed
                self.phase = outer_phase

        return wrapper


def _instrument(rule, curvature, clock: _PhaseClock):
    """Wrap the rule's step operators, the curvature's batches and the replay with the clock (in place)."""
    states = curvature.states
    for name in ("parameters_at", "batch_inputs", "optimizer_state_at"):
        if hasattr(states, name):
            setattr(states, name, clock.timed("replay", getattr(states, name)))
    at_step = curvature.at_step

    def batch_at(step):
        batch = at_step(step)
        for name, kind in (("hvp", "H_B products"), ("hvp_add", "H_B products"), ("row_grads", "per-row gradients"),
                           ("row_hvp", "per-row H_r x"), ("row_loss_tangents", "per-row loss tangents")):
            if hasattr(batch, name):
                setattr(batch, name, clock.timed(kind, getattr(batch, name)))
        return batch

    curvature.at_step = clock.timed("batch gradient (one grad)", batch_at)
    rule_at_step = rule.at_step

    class Timed:
        def __init__(self, ops):
            self.ops = ops

        def __getattr__(self, name):
            value = getattr(self.ops, name)
            phases = {"occurrence": "injections", "injection_scores": "injections", "apply_adjoint": "adjoint product"}
            return clock.timed("rest", value, phases[name]) if name in phases else value

    rule.at_step = clock.timed("rest", lambda step: Timed(rule_at_step(step)), "step operator")


def _probe_cost(curvature, objective: torch.Tensor, probes: int) -> tuple[float, float]:
    """Best-of-7 seconds of one step's ``H_B`` product of 1 and of ``1 + probes`` vectors, interleaved so that
    the load of a shared machine hits both alike."""
    batch = curvature.at_step(0)
    single = objective[None]
    block = torch.cat([single, torch.randn(probes, len(objective), dtype=objective.dtype)])
    best = [float("inf"), float("inf")]
    for _ in range(7):
        for index, vectors in enumerate((single, block)):
            began = time.perf_counter()
            batch.hvp(vectors)
            best[index] = min(best[index], time.perf_counter() - began)
    return best[0], best[1]


def _tiny_run(root, rows: int, epochs: int, kind: str = "bert", max_grad_norm: float = 1.0):
    """A tiny BERT on synthetic text or a tiny ViT on digits, dropout off, trained and recorded with the HF
    default AdamW recipe (warm-up, linear decay, decay 0.01, clip 1.0), checkpoints every 8 steps (replayed)."""
    from hf_accinf import AccInfTrainer, RecordingArguments
    from hf_accinf.examples import digits_dataset, synthetic_text_dataset, tiny_bert, tiny_vit
    from transformers import TrainingArguments

    if kind == "bert":
        data, model = synthetic_text_dataset(rows, length=12), tiny_bert()
    else:
        data, model = digits_dataset(rows, classes=(0, 1, 2)), tiny_vit(num_labels=3, hidden_size=16)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0  # the rebuilt model too
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    args = TrainingArguments(output_dir=str(root / "out"), per_device_train_batch_size=8, num_train_epochs=epochs,
                             learning_rate=1e-3, warmup_steps=2, weight_decay=0.01, max_grad_norm=max_grad_norm, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True, seed=0, logging_strategy="no")
    trainer = AccInfTrainer(model=model, args=args, train_dataset=data,
                            recording=RecordingArguments(run_dir=str(root / "run"), checkpoint_every=8))
    began = time.perf_counter()
    trainer.train()
    return root / "run", data, time.perf_counter() - began


def _whole_model(run_dir, data, dtype: torch.dtype, removal: str):
    """``(problem, adam-ie rule, objective gradient)`` of a recorded run scored whole-model (its own rows as the
    evaluation set), as scoring.run builds them."""
    from hf_accinf.inputs.collate import eval_collator
    from hf_accinf.problem import problem_from_run
    from hf_accinf.trajectory import RunReader

    run = RunReader(run_dir)
    model = run.build_model()
    problem = problem_from_run(run, dtype, modules=["all"], model=model, train_dataset=data,
                               collate_fn=eval_collator(model))
    rule = build_method(problem, "adam-ie", removal=removal)
    curvature = problem.curvature
    inputs, labels = curvature.evaluation_inputs(model, run.manifest.head.module, data)
    return problem, rule, curvature.objective_grad(problem.final_parameters(), inputs, labels)


def precision(rows: int, epochs: int, removal: str) -> None:
    """float32 against float64 whole-model adjoint scores (adam-ie) on a tiny BERT and a tiny ViT."""
    import tempfile
    from pathlib import Path

    from scipy import stats

    print("| model | parameters | steps | float64 adjoint (s) | float32 adjoint (s) | Kendall tau | "
          "Pearson r | relative error (L2) | max error / max score |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in ("bert", "vit"):
        with tempfile.TemporaryDirectory() as directory:
            run_dir, data, _ = _tiny_run(Path(directory), rows, epochs, kind)
            scores, seconds = {}, {}
            for dtype in (torch.float64, torch.float32):
                problem, rule, objective = _whole_model(run_dir, data, dtype, removal)
                began = time.perf_counter()
                result = adjoint_scores(rule, problem, objective, progress=False)
                seconds[dtype] = time.perf_counter() - began
                scores[dtype] = (result.scores if hasattr(result, "scores") else result).double()
        reference, low = scores[torch.float64], scores[torch.float32]
        tau = stats.kendalltau(reference, low).statistic
        pearson = stats.pearsonr(reference, low).statistic
        relative = float((low - reference).norm() / reference.norm())
        worst = float((low - reference).abs().max() / reference.abs().max())
        print(f"| tiny {kind.upper() if kind == 'vit' else 'BERT'} | {rule.param_dim} | {problem.trajectory.num_steps} | "
              f"{seconds[torch.float64]:.2f} | {seconds[torch.float32]:.2f} | {tau:.6f} | {pearson:.8f} | "
              f"{relative:.1e} | {worst:.1e} |", flush=True)


def profile(rows: int, epochs: int, dtype: torch.dtype, removal: str, probes: int, max_grad_norm: float) -> None:
    """Score a tiny BERT run whole-model by the adjoint (adam-ie) and print where each step's time goes."""
    import inspect
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as directory:
        run_dir, data, train_seconds = _tiny_run(Path(directory), rows, epochs, max_grad_norm=max_grad_norm)
        problem, rule, objective = _whole_model(run_dir, data, dtype, removal)
        curvature = problem.curvature
        clock = _PhaseClock()
        _instrument(rule, curvature, clock)
        extra = {"probes": probes} if "probes" in inspect.signature(adjoint_scores).parameters else {}
        began = time.perf_counter()
        adjoint_scores(rule, problem, objective, progress=False, **extra)
        total = time.perf_counter() - began
        seconds, counts = dict(clock.seconds), dict(clock.counts)
        product_cost = _probe_cost(curvature, objective, probes) if probes and extra else None
    steps = problem.trajectory.num_steps
    print(f"tiny BERT ({curvature.dim} parameters, whole model), {rows} rows, batch 8, {steps} steps, AdamW "
          f"(warm-up, decay 0.01, clip {max_grad_norm:g}: active at {int((problem.trajectory.clip_coef < 1).sum())} steps); adam-ie {removal}, {str(dtype)[6:]}, "
          f"{probes if extra else 'no'} trust probes on the backward pass; recorded training {train_seconds:.2f} s, "
          f"adjoint {total:.2f} s ({total / steps * 1000:.0f} ms/step, {total / train_seconds:.1f}x training)")
    kinds = ["replay", "batch gradient (one grad)", "H_B products", "per-row gradients", "per-row H_r x",
             "per-row loss tangents", "rest"]
    phases = ["step operator", "injections", "adjoint product", "other"]
    print("| phase (ms per step) | " + " | ".join(kinds) + " | total | share |")
    print("|---" * (len(kinds) + 3) + "|")
    for phase in phases:
        cells = [seconds.get((phase, kind), 0.0) for kind in kinds]
        calls = [counts.get((phase, kind), 0) for kind in kinds]
        if not sum(cells):
            continue
        text = [f"{1000 * s / steps:.1f}" + (f" ({c / steps:.3g} calls)" if c and kind != "rest" else "")
                for s, c, kind in zip(cells, calls, kinds)]
        print(f"| {phase} | " + " | ".join(text) + f" | {1000 * sum(cells) / steps:.1f} | {sum(cells) / total:.0%} |")
    unaccounted = total - sum(seconds.values())
    print("| loop (plan, scores) | " + " | ".join("" for _ in kinds) + f" | {1000 * unaccounted / steps:.1f} | "
          f"{unaccounted / total:.0%} |")
    if product_cost is not None:
        print(f"one step's H_B product of 1 vector: {product_cost[0] * 1000:.1f} ms, of 1 + {probes} vectors: "
              f"{product_cost[1] * 1000:.1f} ms (best of 7, interleaved): the probes add "
              f"{(product_cost[1] / product_cost[0] - 1):.0%} to the adjoint product")



# ---- --runs: the configs end to end, as a user runs them ----------------------------------------------------------

RUN_CONFIGS = {"quickstart": "configs/quickstart.yaml", "minilm": "configs/rotten_tomatoes_minilm.yaml"}
ROOT = Path(__file__).resolve().parents[1]


def _timed(command: list[str], threads: int, cwd: Path) -> tuple[float, float]:
    """Run ``command``; its wall seconds and peak RSS in GB (the process's own, from ``os.wait4``)."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryFile(mode="w+") as log:  # a file, not a pipe: progress bars never block the process
        began = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - began
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise SystemExit(f"{' '.join(command)} failed:\n{log.read()[-3000:]}")
    return seconds, usage.ru_maxrss / 2**20  # KiB -> GiB


def runs(configs: list[str], verify: int, threads: int, runs_dir: str | None) -> None:
    root = Path(runs_dir or tempfile.mkdtemp(prefix="bench-adjoint-"))
    command = [sys.executable, "-m", "hf_accinf.cli"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {threads} torch threads per process, "
          f"torch {torch.__version__}, {platform.processor() or platform.platform()}; runs in {root}")
    print("| config | training (s, peak GB) | adjoint alone (s, peak GB) | x training | trust probes (s) | "
          f"verify {verify} rows (s) | score with trust and verify (s, peak GB) | Kendall tau [95% interval] | "
          "linearity ceiling | scope, method, dtype |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in configs:
        out = root / name
        run_dir = out / "accinf"
        train = _timed([*command, "train", "--config", str(ROOT / RUN_CONFIGS[name]), "--output_dir", str(out)],
                       threads, ROOT)
        alone = _timed([*command, "score", "--run_dir", str(run_dir), "--trust_probes", "0", "--output_dir",
                        str(out / "alone")], threads, ROOT)
        bare = json.loads((out / "alone" / "scores.json").read_text())
        nan = float("nan")
        if verify:  # the second score run: the default trust figure and the verification
            checked = _timed([*command, "score", "--run_dir", str(run_dir), "--verify", str(verify), "--output_dir",
                              str(out / "checked")], threads, ROOT)
            summary = json.loads((out / "checked" / "scores.json").read_text())
        else:
            checked, summary = (nan, nan), {**bare, "seconds": nan}
        check = summary["verify"] or {"seconds": nan, "kendall_tau": nan, "linearity_ceiling": {"kendall_tau": nan}}
        interval = check.get("kendall_tau_interval") or [nan, nan]
        print(f"| {name} | {train[0]:.0f}, {train[1]:.2f} | {alone[0]:.0f}, {alone[1]:.2f} | "
              f"{alone[0] / train[0]:.1f}x | {summary['seconds'] - bare['seconds']:.1f} | {check['seconds']:.0f} | "
              f"{checked[0]:.0f}, {checked[1]:.2f} | {check['kendall_tau']:.3f} [{interval[0]:.3f}, {interval[1]:.3f}] | "
              f"{check['linearity_ceiling']['kendall_tau']:.3f} | {summary['modules']}, {summary['method']}, "
              f"{summary.get('dtype')} |", flush=True)


if __name__ == "__main__":
    main()
