"""What a replay reproduces bit for bit across thread counts (docs/RECORDING.md, "Numerics").

A tiny BERT (2 layers, hidden 32, absolute positions, dropout off) is trained with the HF default AdamW
recipe (warm-up, linear decay, clipping 1.0, weight decay 0.01) on padded synthetic rows under ``a``
threads, then replayed under ``b`` threads (the recorded count overridden), for a, b in {1, 2}. Printed
per pair: whether every checkpoint is reproduced bitwise, and the largest judged errors (outputs,
parameters without the gauge tensors, optimizer state), the gauge tensors' error, and the error of the
former check (one norm over every parameter).

    python scripts/replay_threads.py [--epochs 10] [--rows 32] [--hidden 32] [--layers 2] [--checkpoint_every 5]

(8 rows a step: the defaults make 40 steps.)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from hf_accinf import RunReader
from hf_accinf.trajectory.replay import Replay, _normwise


def train(run_dir: Path, data, threads: int, options) -> None:
    from tests.trajectory.test_replay_gauge import bert_default_recipe  # the test's recipe, not a copy

    bert_default_recipe(run_dir, data, threads=threads, epochs=options.epochs, hidden=options.hidden,
                        layers=options.layers, checkpoint_every=options.checkpoint_every)  # 8 rows a step
    assert RunReader(run_dir).manifest.numerics["torch_threads"] == threads


def replay_under(run: RunReader, data, threads: int) -> dict:
    replay = Replay(run, data, tolerance=float("inf"))
    replay.num_threads = threads
    bitwise, whole = True, 0.0
    for start, stop in zip(replay.checkpoints, replay.checkpoints[1:]):
        replay._load(replay._checkpoint_state(start))
        for step in range(start, stop):
            replay.step(step)
        weights, _ = snapshot = replay._snapshot()
        recorded = run.load_checkpoint(stop)
        bitwise &= all(torch.equal(weights[name], recorded[name]) for name in recorded)
        whole = max(whole, _normwise(weights, recorded, run.load_checkpoint(start))[1])
        replay._compare(start, stop, snapshot, refuse=False)
    report = replay.report()
    return {"bitwise": bitwise, "outputs": max(i.output_rel for i in report.intervals),
            "parameters": max(i.parameter_rel for i in report.intervals),
            "state": max(i.state_rel for i in report.intervals), "gauge": max(i.gauge_rel for i in report.intervals),
            "whole": whole, "gauge_names": report.gauge}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the recipe is the tests' (tests/trajectory)
    from tests.trajectory.test_replay_gauge import padded_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--checkpoint_every", type=int, default=5)
    options = parser.parse_args()
    torch.set_num_threads(1)
    data = padded_text(options.rows, seed=0)
    work = Path(tempfile.mkdtemp())
    try:
        print(f"torch {torch.__version__}, hidden {options.hidden}, {options.layers} layers, "
              f"{options.epochs * -(-len(data) // 8)} steps, a checkpoint every {options.checkpoint_every}\n")
        print("| trained | replayed | bitwise | outputs | parameters (no gauge) | optimizer state | gauge | all parameters (former check) |")
        print("|---|---|---|---|---|---|---|---|")
        for trained in (1, 2):
            run_dir = work / f"threads-{trained}"
            train(run_dir, data, trained, options)
            run = RunReader(run_dir)
            for replayed in (1, 2):
                r = replay_under(run, data, replayed)
                print(f"| {trained} | {replayed} | {'yes' if r['bitwise'] else 'no'} | {r['outputs']:.1e} | "
                      f"{r['parameters']:.1e} | {r['state']:.1e} | {r['gauge']:.1e} | {r['whole']:.1e} |")
        print(f"\ngauge tensors: {', '.join(r['gauge_names'])}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
