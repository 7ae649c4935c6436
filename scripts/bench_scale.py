"""Scaling benchmarks: devices and processes (issue 19, item 5). The adjoint's own benchmark stays in
``scripts/bench_adjoint.py``.

    python scripts/bench_scale.py [--case head processes] [--threads 1] [--device cpu]
    python scripts/bench_scale.py --case head --rows 100000                      # the head at N = 100k on CPU
    python scripts/bench_scale.py --device cuda --case head-large                # N = 2^20 x 3 epochs on a GPU
    python scripts/bench_scale.py --device cuda --case minilm                    # the MiniLM-shaped BERT on a GPU
    python scripts/bench_scale.py --case minilm --bert_layers 1 --bert_hidden 32 --bert_rows 32   # a small proof

Cases (each row of the printed markdown table: time, peak memory, ratio to training):

* ``head``: the head propagator (``--schedule propagator``) of SGD-IE and ACC-SGD-IE on a linear head, d 768, 2
  classes, batch 32, 3 epochs, SGD, built synthetically from the engine's public API (``bench_engine``'s
  ``linear_head_problem``: no Trainer), ``--rows`` rows (default 2000). Training: the same steps of plain
  ``torch.optim.SGD`` on the device, nothing recorded. ``head-large`` is the same with N = 2^20 by default.
* ``minilm``: the whole-model adam-ie adjoint (``score_run``'s defaults, ``--trust_probes 0``) of a 6-layer,
  384-wide BERT built from its config (MiniLM's shape, 22.7M parameters, dropout off), trained by ``AccInfTrainer``
  on synthetic text (``--bert_rows`` rows of 64 tokens, batch 16, 3 epochs, the HF AdamW recipe, checkpoints every
  6 steps, replayed). About 40 minutes on a CPU: run only when asked for.
* ``processes``: ``hf-accinf score`` of the forward and the adjoint form (whole model, adam-ie, ``--proc_rows``
  rows of a BERT of ``--proc_layers`` x ``--proc_hidden`` built from its config, vocabulary 40, dropout off) in one process and under ``accelerate launch --num_processes 2`` (CPU: gloo, ``--cpu``),
  each its own process tree (wall time and peak RSS of the largest process from ``os.wait4``; the engine's own
  seconds from ``scores.json``), and the speed-up. Needs two GPUs on CUDA (not run with one).

Peak memory: RSS on the CPU (Linux's ``VmHWM``, reset before each phase through ``/proc/self/clear_refs``),
``torch.cuda.max_memory_allocated`` on CUDA. The machine, its cores and the thread count are printed first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_engine import BATCH, EPOCHS, LR, linear_head_problem  # noqa: E402

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
          "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]
ROWS = []  # the table: (case, what, seconds, peak GiB, x training, note)


# ---- measuring ------------------------------------------------------------------------------------------------------

def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS (Linux)
    except OSError:
        pass


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measured(device: torch.device, function, *args, **kwargs):
    """``(value, seconds, peak GiB)`` of one call."""
    _reset_peak(device)
    began = time.perf_counter()
    value = function(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - began, _peak_gib(device)


def record(case: str, what: str, seconds: float, peak: float, training: float | None, note: str = "") -> None:
    ratio = f"{seconds / training:.2f}x" if training else "-"
    ROWS.append((case, what, f"{seconds:.2f}", f"{peak:.2f}", ratio, note))
    print(f"  {case}: {what} {seconds:.2f} s, peak {peak:.2f} GiB, {ratio} training {note}", flush=True)


# ---- the head propagator ------------------------------------------------------------------------------------------

def _plain_training(problem, device: torch.device, dtype: torch.dtype) -> None:
    """The run's steps by plain ``torch.optim.SGD`` on ``device``, nothing recorded: the cost of training the head."""
    trajectory = problem.trajectory
    inputs = trajectory.head_input.to(device, dtype)
    labels = trajectory.labels.to(device)
    offsets = trajectory.row_offsets.tolist()
    head = nn.Linear(inputs.shape[1], int(labels.max()) + 1).to(device, dtype)
    optimizer = torch.optim.SGD(head.parameters(), lr=LR)
    for step in range(trajectory.num_steps):
        rows = slice(offsets[step], offsets[step + 1])
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(head(inputs[rows]), labels[rows]).backward()
        optimizer.step()


def bench_head(case: str, rows: int, device: torch.device, dtype: torch.dtype, budget: float) -> None:
    from hf_accinf.engine import CorrectionPolicy, estimate_influence
    from hf_accinf.methods.registry import build_method
    from hf_accinf.problem import InfluenceProblem, make_curvature

    print(f"{case}: linear head 768 x 2, N = {rows}, batch {BATCH}, {EPOCHS} epochs, SGD, {dtype}; building the run",
          flush=True)
    built = linear_head_problem(rows, dtype)
    curvature = make_curvature(built.trajectory, built.head, ["weight", "bias"], 0.0, dtype, device)
    problem = InfluenceProblem(built.trajectory, curvature, built.optimizer, rows)
    warm = linear_head_problem(2 * BATCH, dtype)  # first calls pay one-off initialization
    warm = InfluenceProblem(warm.trajectory, make_curvature(warm.trajectory, warm.head, ["weight", "bias"], 0.0, dtype,
                                                            device), warm.optimizer, 2 * BATCH)
    estimate_influence(warm, build_method(warm, "sgd-ie"), schedule="propagator", progress=False)
    _plain_training(warm, device, dtype)
    _, training, peak = measured(device, _plain_training, problem, device, dtype)
    steps = problem.trajectory.num_steps
    record(case, f"training ({steps} steps, plain SGD)", training, peak, training)
    for method, policy in (("sgd-ie", None), ("acc-sgd-ie", CorrectionPolicy("all"))):
        rule = build_method(problem, method)
        result, seconds, peak = measured(device, estimate_influence, problem, rule, policy, schedule="propagator",
                                         memory_budget_gb=budget, progress=False)
        record(case, f"{method} propagator", seconds, peak, training, f"N = {rows}, {result.embeddings.shape[1]} per row")


# ---- the MiniLM-shaped BERT, whole-model adjoint ----------------------------------------------------------------

def _warmup(ratio: float) -> dict:
    """10% warm-up in this transformers' spelling (recent ones take a fraction as ``warmup_steps``)."""
    import inspect

    from transformers import TrainingArguments

    known = inspect.signature(TrainingArguments).parameters
    return {"warmup_ratio": ratio} if "warmup_ratio" in known else {"warmup_steps": ratio}


def bert_model(layers: int, hidden: int, seed: int = 0, vocab_size: int = 30522):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 32), intermediate_size=4 * hidden,
                        max_position_embeddings=512, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    return BertForSequenceClassification(config)


def bench_minilm(args, device: torch.device, root: Path) -> None:
    from transformers import TrainingArguments

    from hf_accinf import AccInfTrainer, RecordingArguments, ScoreArguments
    from hf_accinf.examples import synthetic_text_dataset
    from hf_accinf.scoring import score_run

    model = bert_model(args.bert_layers, args.bert_hidden)
    parameters = sum(p.numel() for p in model.parameters())
    data = synthetic_text_dataset(args.bert_rows, length=64)
    held_out = synthetic_text_dataset(64, length=64, seed=1)
    print(f"minilm: BERT {args.bert_layers} x {args.bert_hidden} ({parameters / 1e6:.1f}M parameters), "
          f"{args.bert_rows} rows of 64 tokens, batch 16, {args.bert_epochs} epochs; training", flush=True)
    training_args = TrainingArguments(
        output_dir=str(root / "minilm-out"), per_device_train_batch_size=16, num_train_epochs=args.bert_epochs,
        learning_rate=5e-5, **_warmup(0.1), weight_decay=0.01, max_grad_norm=1.0, use_cpu=device.type == "cpu",
        report_to=[], save_strategy="no", disable_tqdm=True, seed=0, logging_strategy="no")
    trainer = AccInfTrainer(model=model, args=training_args, train_dataset=data,
                            recording=RecordingArguments(run_dir=str(root / "minilm"), checkpoint_every=6))
    _, training, peak = measured(device, trainer.train)
    record("minilm", f"training ({trainer.state.global_step} steps, recorded)", training, peak, training)
    del trainer
    options = {"device": str(device)} if "device" in {f.name for f in dataclasses.fields(ScoreArguments)} else {}
    score = ScoreArguments(run_dir=str(root / "minilm"), output_dir=str(root / "minilm-scores"), trust_probes=0,
                           **options)
    result, seconds, peak = measured(device, score_run, score, data, held_out, progress=False)
    record("minilm", f"{result.method} {result.form}, whole model", seconds, peak, training,
           f"engine {result.seconds:.1f} s, {result.summary.dtype}")


# ---- 1 against 2 processes ------------------------------------------------------------------------------------------

# A small intermediate process starts the command and reports its tree's peak RSS: Linux keeps a process's peak
# across exec, so a child forked straight from this (large) process would report this process's peak as its own.
_SPAWN = ("import os, subprocess, sys; process = subprocess.Popen(sys.argv[2:]); _, status, usage = os.wait4(process.pid, 0); "
          "open(sys.argv[1], 'w').write(f'{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}')")


def _run_tree(command: list[str], threads: int) -> tuple[float, float]:
    """Wall seconds and the peak RSS (GiB) of the largest process of ``command``'s tree."""
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                   "PYTHONPATH": os.pathsep.join(paths)}
    with tempfile.TemporaryFile(mode="w+") as log, tempfile.NamedTemporaryFile(mode="r") as report:
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", _SPAWN, report.name, *command], cwd=ROOT, env=environment, stdout=log,
                       stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - began
        status, peak_kib = map(int, Path(report.name).read_text().split())
        if status != 0:
            log.seek(0)
            raise SystemExit(f"{' '.join(command)} failed:\n{log.read()[-3000:]}")
    return seconds, peak_kib / 2**20


def bench_processes(args, device: torch.device, root: Path) -> None:
    from transformers import TrainingArguments

    from hf_accinf import AccInfTrainer, RecordingArguments
    from hf_accinf.examples import synthetic_text_dataset

    if device.type == "cuda" and torch.cuda.device_count() < 2:
        print("processes: needs 2 GPUs for 2 processes on CUDA; not run")
        return
    data, held_out = synthetic_text_dataset(args.proc_rows), synthetic_text_dataset(32, seed=1)
    data.save_to_disk(str(root / "train"))
    held_out.save_to_disk(str(root / "eval"))
    model = bert_model(args.proc_layers, args.proc_hidden, vocab_size=40)  # synthetic text's 40 token ids
    training_args = TrainingArguments(
        output_dir=str(root / "tiny-out"), per_device_train_batch_size=args.proc_batch, num_train_epochs=2, learning_rate=1e-3,
        **_warmup(0.1), max_grad_norm=1.0, use_cpu=device.type == "cpu", report_to=[], save_strategy="no",
        disable_tqdm=True, seed=0, logging_strategy="no")
    trainer = AccInfTrainer(model=model, args=training_args, train_dataset=data,
                            recording=RecordingArguments(run_dir=str(root / "tiny"), checkpoint_every=8))
    _, training, peak = measured(device, trainer.train)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"processes: BERT {args.proc_layers} x {args.proc_hidden} ({parameters / 1e6:.2f}M parameters), {args.proc_rows} rows, batch {args.proc_batch}, {trainer.state.global_step} steps, whole model, adam-ie",
          flush=True)
    record("processes", "training (recorded)", training, peak, training)
    cpu = ["--cpu", "true"] if device.type == "cpu" else []
    for form in args.proc_forms:
        engine = {}
        for processes in (1, 2):
            out = root / f"{form}-{processes}"
            score = ["hf_accinf.cli", "score", "--run_dir", str(root / "tiny"), "--train_data", str(root / "train"),
                     "--eval_data", str(root / "eval"), "--method", "adam-ie", "--modules", "all", "--form", form,
                     "--trust_probes", "0", "--output_dir", str(out), *cpu]
            launcher = [sys.executable, "-m"] if processes == 1 else [*LAUNCH, "-m"]
            wall, peak = _run_tree([*launcher, *score], args.threads)
            engine[processes] = json.loads((out / "scores.json").read_text())["seconds"]
            note = "" if processes == 1 else f"speed-up {engine[1] / engine[2]:.2f}x (engine), wall {wall:.1f} s"
            record("processes", f"{form} form, {processes} process{'es' if processes > 1 else ''}", engine[processes],
                   peak, training, note or f"wall {wall:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs="+", default=["head", "processes"],
                        choices=["head", "head-large", "minilm", "processes"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:i)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and per process for `processes`)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="the head's propagation")
    parser.add_argument("--rows", type=int, default=None,
                        help="head: N (default 2000; head-large: 2^20)")
    parser.add_argument("--memory_budget_gb", type=float, default=None,
                        help="head: the propagator's budget (default 4 on CPU, half the free memory on CUDA)")
    parser.add_argument("--bert_layers", type=int, default=6)
    parser.add_argument("--bert_hidden", type=int, default=384)
    parser.add_argument("--bert_rows", type=int, default=400)
    parser.add_argument("--bert_epochs", type=int, default=3)
    parser.add_argument("--proc_rows", type=int, default=64, help="processes: rows of the small BERT run")
    parser.add_argument("--proc_layers", type=int, default=1, help="processes: the BERT's layers")
    parser.add_argument("--proc_hidden", type=int, default=16, help="processes: the BERT's width")
    parser.add_argument("--proc_batch", type=int, default=8, help="processes: the run's batch size")
    parser.add_argument("--proc_forms", nargs="+", default=["forward", "adjoint"], choices=["forward", "adjoint"])
    parser.add_argument("--keep", help="keep the runs in this directory (default: a temporary one)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible here.")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"machine: {name}; {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; device {device}")
    dtype = getattr(torch, args.dtype)
    if args.memory_budget_gb is None:
        args.memory_budget_gb = torch.cuda.mem_get_info(device)[0] / 2**31 if device.type == "cuda" else 4.0
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    for case in args.case:
        if case in ("head", "head-large"):
            bench_head(case, args.rows or (2**20 if case == "head-large" else 2000), device, dtype, args.memory_budget_gb)
        elif case == "minilm":
            bench_minilm(args, device, root)
        else:
            bench_processes(args, device, root)
    print(f"\nmachine: {name}, {os.cpu_count()} cores, {args.threads} threads; device {device}\n")
    print("| case | what | seconds | peak GiB | x training | note |")
    print("|---|---|---|---|---|---|")
    for row in ROWS:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
