"""``hf-accinf summary RUN_DIR``: what a run directory holds (model, head, optimizer, steps, data, loss)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..devices import check_device_choice
from ..errors import AccInfError
from .parsing import build_parser, parse
from .runner import run_command

NAME = "summary"
DESCRIPTION = "describe a run directory"


@dataclass
class SummaryArguments:
    run_dir: str | None = field(default=None, metadata={"help": "Run directory (also accepted as the positional RUN_DIR)."})
    check_replay: bool = field(default=False, metadata={"help": (
        "Replay every checkpoint interval and report how far the replay is from the next checkpoint (the exact "
        "trajectory deep scopes use): outputs, parameters and optimizer state, gauge tensors apart. The rows come "
        "from --train_data, else from the recorded data source (runs recorded by `hf-accinf train`).")})
    train_data: str | None = field(default=None, metadata={"help": (
        "--check_replay: the training dataset (load_from_disk directory), exactly as trained, for runs not "
        "recorded by `hf-accinf train`.")})
    tokenizer: str | None = field(default=None, metadata={"help": (
        "--check_replay with --train_data: tokenizer directory, to pad text rows as the Trainer did.")})
    replay_tolerance: float | None = field(default=None, metadata={"help": (
        "--check_replay: the largest relative error reported as within tolerance (as `score --replay_tolerance`; "
        "default: the score default, 1e-4).")})
    device: str = field(default="auto", metadata={"help": (
        "--check_replay: auto, cpu, cuda or cuda:<index>, where the replay runs (as `score --device`; auto: a "
        "visible GPU, else the CPU).")})


def make_parser(subparsers=None):
    parser = build_parser(NAME, DESCRIPTION, (SummaryArguments,), subparsers)
    parser.add_argument("path", nargs="?", metavar="RUN_DIR", help="Run directory to describe.")
    return parser


def summary(run_dir: str | Path, check_replay: bool = False, train_data: str | None = None,
            replay_tolerance: float | None = None, tokenizer: str | None = None, device: str = "auto") -> str:
    from ..scope import describe_scopes
    from ..trajectory import RunReader

    run = RunReader(run_dir)
    manifest, trajectory = run.manifest, run.trajectory()
    sizes = trajectory.row_offsets.diff()
    files = [p for p in Path(run_dir).rglob("*") if p.is_file()]
    disk = sum(p.stat().st_size for p in files)
    lines = [
        f"run directory   {run_dir}  ({len(files)} files, {disk / 2**20:.2f} MiB)",
        f"model           {manifest.model_class.rsplit('.', 1)[-1]}  head '{manifest.head.module}' "
        f"(chosen: {', '.join(manifest.head.chosen)}; input {list(trajectory.head_input.shape[1:])})",
        f"optimizer       {manifest.optimizer_class}, {len(manifest.param_groups)} parameter groups, "
        f"max_grad_norm {manifest.training.max_grad_norm}",
        f"steps           {manifest.num_steps} optimizer steps over {int(trajectory.epoch.max()) + 1} epochs, "
        f"{int(sizes.min())}-{int(sizes.max())} rows per step, world size {manifest.training.world_size}",
        f"dataset         {manifest.dataset.length} rows, fingerprint {manifest.dataset.fingerprint}",
        f"learning rate   {float(trajectory.lr[:, 0].max()):.3g} peak, {float(trajectory.lr[-1, 0]):.3g} last",
        f"clipped steps   {int((trajectory.clip_coef < 1).sum())} of {manifest.num_steps}",
        f"training loss   {float(trajectory.loss[0]):.4f} first step, {float(trajectory.loss[-1]):.4f} last step",
        f"checkpoints     {manifest.checkpoints}",
        describe_scopes(run.build_model()),
    ]
    if check_replay:
        lines.extend(_replay_lines(run, train_data, replay_tolerance, tokenizer, device))
    elif train_data:
        raise AccInfError("--train_data is read by --check_replay only: add --check_replay.")
    return "\n".join(lines)


def _replay_lines(run, train_data: str | None, tolerance: float | None, tokenizer: str | None,
                  device: str = "auto") -> list[str]:
    from ..devices import resolve_device
    from ..inputs.collate import eval_collator
    from ..inputs.sources import DataArguments, load_tokenizer, load_training_data
    from ..trajectory.recorded_data import load_recorded_data
    from ..trajectory.replay import REPLAY_TOLERANCE, Replay

    where, _ = resolve_device(device)  # cuda without a GPU is refused before the rows are read
    if train_data:
        train = load_training_data(DataArguments(train_data=train_data, tokenizer=tokenizer))
        collate = eval_collator(run.build_model(), load_tokenizer(tokenizer))  # as `hf-accinf score` collates them
    else:
        train, _, collate = load_recorded_data(run.run_dir)
    report = Replay(run, train, collate, where, tolerance=REPLAY_TOLERANCE if tolerance is None else tolerance).check()
    verdict = "within" if report.ok else "ABOVE"
    worst = max(report.intervals, key=lambda interval: interval.max_rel, default=None)
    lines = [f"replay          max relative error {report.max_rel:.2e} over {len(report.intervals)} checkpoint "
             f"intervals ({verdict} the tolerance {report.tolerance:g}) on {where}"]
    if worst is not None:
        lines.append(f"                worst [{worst.start}, {worst.stop}): outputs {worst.output_rel:.2e}, parameters "
                     f"{worst.parameter_rel:.2e}, optimizer state {worst.state_rel:.2e}"
                     + (f" (furthest: '{worst.worst}')" if worst.worst else ""))
    if report.randomness.startswith("unused") or report.precision != "no":
        lines.append(f"                random states {report.randomness}; mixed precision {report.precision}")
    if report.gauge:
        gauge_rel = max(interval.gauge_rel for interval in report.intervals) if report.intervals else 0.0
        lines.append(f"gauge tensors   {len(report.gauge)} left out (no effect on the outputs; their replay error "
                     f"{gauge_rel:.2e} of their movement is not judged): {', '.join(report.gauge)}")
    return lines


def main(argv: list[str] | None = None, parser=None) -> int:
    arguments, extra = parse(parser or make_parser(), argv)
    run_dir = extra.path or arguments.run_dir
    if not run_dir:
        raise AccInfError("Which run directory? hf-accinf summary RUN_DIR")
    check_device_choice(arguments.device)
    print(summary(run_dir, arguments.check_replay, arguments.train_data, arguments.replay_tolerance,
                  arguments.tokenizer, arguments.device))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(sys.modules[__name__], sys.argv[1:]))
