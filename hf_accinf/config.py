"""Argument dataclasses of hf_accinf, parsed with ``HfArgumentParser`` by the CLI and usable from Python."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RecordingArguments:
    """How :class:`~hf_accinf.AccInfTrainer` records the training trajectory."""

    run_dir: str | None = field(
        default=None, metadata={"help": "Run directory to record into (default: <output_dir>/accinf)."}
    )
    modules: list[str] | None = field(
        default=None,
        metadata={"help": "Chosen modules, names or globs (default: the classification head)."},
    )
    head: str | None = field(
        default=None,
        metadata={"help": "Module whose output are the logits and which holds the chosen modules (default: their common ancestor)."},
    )
    checkpoint_every: int = field(
        default=100, metadata={"help": "Save full model weights every this many optimizer steps (and at start and end)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing run directory."})

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

    def to_dict(self) -> dict:
        return asdict(self)
