"""Run under `accelerate launch --multi_gpu --num_processes 2`: ``score_run`` called as a user's script would,
without a shard context; each process notes whether it got the result. With ``--cli NOTES_DIR ARGS...``: the
``hf-accinf`` command line ``ARGS`` (the CLI's entry function, as ``accelerate launch -m hf_accinf.cli`` runs
it), each process noting the size of the group the command formed."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2]))

from hf_accinf import ScoreArguments, score_run  # noqa: E402
from hf_accinf.examples import digits_dataset  # noqa: E402


def note_groups() -> dict:
    """Patch ``ShardContext.from_accelerate`` to note the size of the group it forms."""
    from hf_accinf.engine.sharding import ShardContext

    seen = {}
    build = ShardContext.from_accelerate.__func__

    def recording_build(cls, *args, **kwargs):
        shard = build(cls, *args, **kwargs)
        seen["world_size"] = shard.world_size
        return shard

    ShardContext.from_accelerate = classmethod(recording_build)
    return seen


def run_cli(notes_dir: str, argv: list[str]) -> None:
    import os

    from hf_accinf.cli import main as cli_main

    seen = note_groups()
    status = cli_main(argv)
    Path(notes_dir, f"rank-{os.environ['RANK']}.json").write_text(json.dumps({"status": status, **seen}))
    sys.exit(status)


def main(run_dir: str, out_dir: str) -> None:
    import os

    seen = note_groups()  # the group score_run forms by itself
    # float64: the split adjoint sums rows over processes in another order (float32 differs at its rounding)
    result = score_run(ScoreArguments(run_dir=run_dir, output_dir=out_dir, dtype="float64"), digits_dataset(48),
                       digits_dataset(20, offset=48), progress=False)
    rank = int(os.environ["RANK"])
    Path(out_dir).parent.joinpath(f"rank-{rank}.json").write_text(json.dumps({"result": result is not None, "world_size": seen.get("world_size")}))


if __name__ == "__main__":
    if sys.argv[1] == "--cli":
        run_cli(sys.argv[2], sys.argv[3:])
    else:
        main(sys.argv[1], sys.argv[2])
