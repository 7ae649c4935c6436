"""``hf-accinf push``: upload a scored (or pruned) dataset and its card to the Hugging Face Hub with the
datasets library's own ``push_to_hub`` (:mod:`hf_accinf.data.hub`). The endpoint and token are the Hub
client's (``HF_ENDPOINT``, ``HF_TOKEN`` or ``hf auth login``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..data.hub import push_scored_dataset
from ..errors import AccInfError
from ._scored import ScoredDataArguments
from .parsing import build_parser, parse
from .runner import run_command

NAME = "push"
DESCRIPTION = "Push a scored dataset with its card (score columns, sign convention, provenance) to the Hub."


@dataclass
class PushArguments:
    repo_id: str = field(default=None, metadata={"help": "Dataset repository on the Hub, e.g. user/my-scored-data."})
    private: bool | None = field(default=None, metadata={"help": "Create the repository private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (default: main)."})
    split: str = field(default="train", metadata={"help": "Split name of the uploaded rows."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message of the dataset upload."})

    def __post_init__(self) -> None:
        if not self.repo_id or self.repo_id.count("/") > 1:
            raise AccInfError(f"--repo_id {self.repo_id!r}: give a dataset repository such as user/my-scored-data.")


def make_parser(subparsers=None):
    return build_parser(NAME, DESCRIPTION, (ScoredDataArguments, PushArguments), subparsers)


def main(argv: list[str] | None = None, parser=None) -> int:
    data, push = parse(parser or make_parser(), argv)
    dataset = data.load()
    url = push_scored_dataset(dataset, push.repo_id, private=push.private, revision=push.revision,
                              commit_message=push.commit_message, split=push.split)
    print(f"pushed {len(dataset)} rows to {push.repo_id}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(sys.modules[__name__], sys.argv[1:]))
