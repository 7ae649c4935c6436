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


@dataclass
class ScoreArguments:
    """How ``hf-accinf score`` / :func:`~hf_accinf.score_run` estimates influence from a recorded run."""

    run_dir: str = field(default="runs/quickstart/accinf", metadata={"help": "Recorded run directory."})
    method: str = field(default="acc-sgd-ie", metadata={"help": "sgd-ie or acc-sgd-ie."})
    removal: str = field(default="exact", metadata={"help": "exact or first-order removal (DESIGN.md section 4)."})
    correction: str = field(default="all", metadata={"help": "ACC correction policy: all, random or stage."})
    correction_p: float = field(default=1.0, metadata={"help": "Probability of a correction (correction=random)."})
    correction_seed: int = field(default=0, metadata={"help": "Seed of the correction coins."})
    stage_steps: list[str] | None = field(default=None, metadata={"help": "Step windows start:stop (correction=stage)."})
    stage_epochs: list[str] | None = field(default=None, metadata={"help": "Epoch windows start:stop (correction=stage)."})
    schedule: str = field(default="auto", metadata={"help": "auto (cost model), sweep or propagator."})
    modules: list[str] | None = field(default=None, metadata={"help": (
        "Scope: the parameters that carry Delta. Module names or globs, 'all' (the whole model), or 'last:k' (the "
        "last k transformer blocks and everything above them); default: the recorded head. A scope inside the "
        "head uses the closed-form fast path; any other runs the whole model on each step's rows (needs the "
        "training data and exact parameters at every step). `hf-accinf summary RUN_DIR` lists the choices.")})
    score_kind: str = field(default="linear", metadata={"help": "linear (gradient dot embedding) or evaluated."})
    dtype: str = field(default="float64", metadata={"help": "float64 or float32 for the propagation."})
    memory_budget_gb: float = field(default=4.0, metadata={"help": "Memory for per-sample states before chunking."})
    output_dir: str | None = field(default=None, metadata={"help": "Where to write (default: <run_dir>/scores)."})

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        if (self.stage_steps or self.stage_epochs) and self.correction != "stage":
            raise ValueError("stage_steps/stage_epochs need correction='stage'.")
        if self.correction_p != 1.0 and self.correction != "random":
            raise ValueError("correction_p needs correction='random'.")
        if self.method == "sgd-ie" and self.correction != "all":
            raise ValueError("sgd-ie applies no correction; correction policies belong to acc-sgd-ie.")

    def windows(self, values: list[str] | None) -> list[tuple[int, int]]:
        result = []
        for value in values or []:
            start, _, stop = str(value).partition(":")
            result.append((int(start), int(stop)))
        return result

    def to_dict(self) -> dict:
        return asdict(self)
