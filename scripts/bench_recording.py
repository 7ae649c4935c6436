"""Training wall time and disk use with and without recording, side by side in one run.

    python scripts/bench_recording.py [--repeats 3] [--epochs 2] [--device cpu|cuda] [--bf16] [--rows N]

Runs a plain ``transformers.Trainer`` and an ``AccInfTrainer`` (default recording settings) on the
same model, data and seed, alternating, and prints the median wall time of ``train()`` of each, the
overhead, the size of the run directory and the part of it that only replay needs (optimizer state at the
checkpoints, the random state of every micro-batch), and the time of ``Replay.check()`` (every checkpoint
interval replayed and compared, on the same device). The machine is printed with the table. On CUDA
(``--device cuda``, the GPU check) the recorder's captures stay on the device during the step and reach the
CPU in one asynchronous transfer per optimizer step; the overhead column measures what is left. ``--bf16``
trains under bf16 autocast (replayed under the same); ``--rows`` keeps the first N rows of each case (a quick
run that proves the script works).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from safetensors import safe_open

from hf_accinf import AccInfTrainer, RecordingArguments, RunReader
from hf_accinf.trajectory import schema
from hf_accinf.trajectory.replay import Replay
from hf_accinf.examples import digits_dataset, synthetic_text_dataset, tiny_vit


def small_bert(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(config)


def cases(rows: int | None = None):
    text, digits = synthetic_text_dataset(2000, length=64, vocab_size=1000), digits_dataset()
    if rows is not None:
        text, digits = text.select(range(min(rows, len(text)))), digits.select(range(min(rows, len(digits))))
    yield f"BERT 2x128, {len(text)} rows x 64 tokens", small_bert, text
    yield f"ViT 2x64 on digits, {len(digits)} rows", lambda seed: tiny_vit(seed=seed, hidden_size=64), digits


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_once(recorded: bool, make_model, data, epochs: float, work: Path, device: str = "cpu",
             bf16: bool = False) -> tuple[float, int]:
    args = TrainingArguments(
        output_dir=str(work / "out"), num_train_epochs=epochs, per_device_train_batch_size=32,
        use_cpu=device == "cpu", bf16=bf16, report_to=[], save_strategy="no", disable_tqdm=True,
        logging_strategy="no", seed=0,
    )
    model = make_model(0)
    if recorded:
        trainer = AccInfTrainer(model=model, args=args, train_dataset=data,
                                recording=RecordingArguments(run_dir=str(work / "run"), overwrite=True))
    else:
        trainer = Trainer(model=model, args=args, train_dataset=data)
    synchronize(device)
    start = time.perf_counter()
    trainer.train()
    synchronize(device)
    elapsed = time.perf_counter() - start
    disk = sum(p.stat().st_size for p in (work / "run").rglob("*") if p.is_file()) if recorded else 0
    return elapsed, disk


def replay_bytes(run_dir: Path) -> int:
    total = sum(p.stat().st_size for p in run_dir.rglob(schema.OPTIMIZER_STATE_NAME))
    for segment in (run_dir / schema.STEPS_DIR).glob("*.safetensors"):
        with safe_open(segment, framework="pt") as handle:
            total += sum(handle.get_tensor(k).nbytes for k in (schema.RNG_CPU, schema.RNG_CUDA, schema.MICRO_SIZE)
                         if k in handle.keys())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (named in the output; two can be 15-35x slower than one on a shared 2-core machine)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the Trainer's device and the replay's)")
    parser.add_argument("--bf16", action="store_true", help="train under bf16 autocast (TrainingArguments(bf16=True))")
    parser.add_argument("--rows", type=int, default=None, help="keep the first N rows of each case")
    options = parser.parse_args()
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    torch.set_num_threads(options.threads)
    gpu = f", {torch.cuda.get_device_name()}" if options.device.startswith("cuda") else ""
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores{gpu}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, device {options.device}"
          f"{', bf16' if options.bf16 else ''}")
    print("| case | plain Trainer (s) | AccInfTrainer (s) | overhead | run directory | of which for replay | Replay.check() (s) |")
    print("|---|---|---|---|---|---|---|")
    run = dict(device=options.device, bf16=options.bf16)
    for name, make_model, data in cases(options.rows):
        work = Path(tempfile.mkdtemp(prefix="bench-recording-"))
        try:
            run_once(True, make_model, data, 0.1, work, **run)  # warm-up: imports, allocator, kernels
            plain, recorded, disk = [], [], 0
            for _ in range(options.repeats):
                plain.append(run_once(False, make_model, data, options.epochs, work, **run)[0])
                seconds, disk = run_once(True, make_model, data, options.epochs, work, **run)
                recorded.append(seconds)
            p, r = statistics.median(plain), statistics.median(recorded)
            start = time.perf_counter()
            report = Replay(RunReader(work / "run"), data, device=options.device).check()
            check = time.perf_counter() - start
            extra = replay_bytes(work / "run")
            print(f"| {name}, {options.epochs:g} epochs | {p:.2f} | {r:.2f} | {100 * (r - p) / p:+.1f}% | "
                  f"{disk / 2**20:.2f} MiB | {extra / 2**20:.2f} MiB | {check:.2f} (error {report.max_rel:.1e}) |")
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
