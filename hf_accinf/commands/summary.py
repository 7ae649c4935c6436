"""``hf-accinf summary RUN_DIR``: what a run directory holds (model, head, optimizer, steps, data, loss)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AccInfError
from .parsing import build_parser, parse

NAME = "summary"
DESCRIPTION = "describe a run directory"


@dataclass
class SummaryArguments:
    run_dir: str | None = field(default=None, metadata={"help": "Run directory (also accepted as the positional RUN_DIR)."})
    check_replay: bool = field(default=False, metadata={"help": (
        "Replay every checkpoint interval from the recorded data source (runs recorded by `hf-accinf train`) and "
        "report how far the replay is from the next checkpoint (the exact trajectory deep scopes use).")})


def make_parser(subparsers=None):
    parser = build_parser(NAME, DESCRIPTION, (SummaryArguments,), subparsers)
    parser.add_argument("path", nargs="?", metavar="RUN_DIR", help="Run directory to describe.")
    return parser


def summary(run_dir: str | Path, check_replay: bool = False) -> str:
    from ..modules import describe_scopes
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
        f"max_grad_norm {manifest.training['max_grad_norm']}",
        f"steps           {manifest.num_steps} optimizer steps over {int(trajectory.epoch.max()) + 1} epochs, "
        f"{int(sizes.min())}-{int(sizes.max())} rows per step, world size {manifest.training['world_size']}",
        f"dataset         {manifest.dataset['length']} rows, fingerprint {manifest.dataset['fingerprint']}",
        f"learning rate   {float(trajectory.lr[:, 0].max()):.3g} peak, {float(trajectory.lr[-1, 0]):.3g} last",
        f"clipped steps   {int((trajectory.clip_coef < 1).sum())} of {manifest.num_steps}",
        f"training loss   {float(trajectory.loss[0]):.4f} first step, {float(trajectory.loss[-1]):.4f} last step",
        f"checkpoints     {manifest.checkpoints}",
        describe_scopes(run.build_model()),
    ]
    if check_replay:
        lines.append(_replay_line(run))
    return "\n".join(lines)


def _replay_line(run) -> str:
    from ..data.sources import load_recorded_data
    from ..trajectory.replay import Replay

    train, _, collate = load_recorded_data(run.run_dir)
    report = Replay(run, train, collate).check()
    verdict = "within" if report.ok else "ABOVE"
    return (f"replay          max relative error {report.max_rel:.2e} over {len(report.intervals)} checkpoint "
            f"intervals ({verdict} the tolerance {report.tolerance:g})")


def main(argv: list[str] | None = None) -> int:
    arguments, extra = parse(make_parser(), argv)
    run_dir = extra.path or arguments.run_dir
    if not run_dir:
        raise AccInfError("Which run directory? hf-accinf summary RUN_DIR")
    print(summary(run_dir, arguments.check_replay))
    return 0


if __name__ == "__main__":
    from ..cli import run_command

    sys.exit(run_command(NAME, sys.argv[1:]))
