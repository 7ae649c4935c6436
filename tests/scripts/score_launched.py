"""Run under `accelerate launch --multi_gpu --num_processes 2`: ``score_run`` called as a user's script would,
without a shard context; each process notes whether it got the result."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2]))

from hf_accinf import ScoreArguments, score_run  # noqa: E402
from hf_accinf.examples import digits_dataset  # noqa: E402


def main(run_dir: str, out_dir: str) -> None:
    import os

    from hf_accinf.engine.sharding import ShardContext

    seen = {}
    build = ShardContext.from_accelerate.__func__

    def recording_build(cls, *args, **kwargs):  # note the group score_run forms by itself
        shard = build(cls, *args, **kwargs)
        seen["world_size"] = shard.world_size
        return shard

    ShardContext.from_accelerate = classmethod(recording_build)
    result = score_run(ScoreArguments(run_dir=run_dir, output_dir=out_dir), digits_dataset(48),
                       digits_dataset(20, offset=48), progress=False)
    rank = int(os.environ["RANK"])
    Path(out_dir).parent.joinpath(f"rank-{rank}.json").write_text(json.dumps({"result": result is not None, "world_size": seen.get("world_size")}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
