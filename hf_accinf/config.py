"""Argument dataclasses of hf_accinf, parsed with ``HfArgumentParser`` by the CLI and usable from Python."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .options import (CORRECTION_CHOICES, DTYPES, FORM_CHOICES, REMOVALS, SCHEDULE_CHOICES, SCORE_KINDS,
                      TRUST_CHOICES, REFERENCE_CHECKS, SKETCH_BASES, check_choice)
from .devices import check_device_choice

def resolve_dtype(dtype: str, deep_scope: bool) -> torch.dtype:
    """The propagation dtype of ``ScoreArguments.dtype``: ``auto`` is float32 for a scope outside the head (the
    model backend: its products dominate the cost and float32 scores agree with float64, docs/ENGINE.md) and
    float64 for the closed-form head (cheap, and the oracle tests' precision); the others as named."""
    check_choice("dtype", dtype, DTYPES)
    if dtype == "auto":
        return torch.float32 if deep_scope else torch.float64
    return getattr(torch, dtype)


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
    data_source: dict | None = field(
        default=None,
        metadata={"help": "Where the training rows come from (set by `hf-accinf train`; recorded as the manifest's "
                          "dataset.source so that later commands reload the same rows). YAML/Python only."},
    )

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ScoreArguments:
    """How ``hf-accinf score`` / :func:`~hf_accinf.score_run` estimates influence from a recorded run."""

    run_dir: str = field(default="runs/quickstart/accinf", metadata={"help": "Recorded run directory."})
    method: str = field(default="auto", metadata={
        "help": "auto (the run's classical method with exact removal, adam-ie for Adam/AdamW and sgd-ie for SGD, "
                "through the adjoint on the whole model; on the head, its accumulative twin acc-adam-ie / acc-sgd-ie), "
                "sgd-ie, acc-sgd-ie, adam-ie, acc-adam-ie, dvemb, acc-dvemb (projected, any optimizer and scope; coarse "
                "beyond the head), adam-ie-sketch / sgd-ie-sketch (the exact classical method tracked in a "
                "k-dimensional sketch, see --sketch_basis: test-agnostic embeddings of k numbers per row for any "
                "scope, k adjoint passes' cost) or tracin; the list is hf_accinf.methods.registry.METHODS."})
    removal: str = field(default="exact", metadata={"help": "exact or first-order removal (DESIGN.md section 4)."})
    frozen_preconditioner: bool = field(
        default=False, metadata={"help": "Adam family ablation: hold Adam's v at its recorded value (Delta_v = 0)."})
    projection_dim: int = field(default=512, metadata={
        "help": "dvemb/acc-dvemb/*-sketch: dimension k of the random projection (of per-row gradients; of the exact "
                "embeddings for *-sketch) (0: none, k = P). Memory per row is k numbers whatever the scope."})
    projection_seed: int = field(default=0, metadata={"help": "dvemb/acc-dvemb/*-sketch: seed of the Gaussian projection."})
    sketch_basis: str = field(default="gradients", metadata={
        "help": "*-sketch: the k-dimensional space. gradients (default): the leading singular subspace of the "
                "training rows' gradients over the last epoch (two more passes over it; exact for objectives in it, "
                "measured within 0.04 Kendall tau of the exact adjoint at k = 256 whole-model: docs/FIDELITY.md; "
                "attribution_matrix cannot rebuild it: score each new objective instead); random: a seeded Gaussian R "
                "(scores unbiased for any objective and rebuilt by attribution_matrix, error ~ 1/sqrt(k): "
                "whole-model rankings need k far beyond 256)."})
    reference_check: str = field(default="auto", metadata={
        "help": "auto or off. auto: the scores of a projected method (dvemb, acc-dvemb, *-sketch) are compared with the "
                "exact classical adjoint's (adam-ie / sgd-ie, one more backward pass) on every row; Kendall tau and "
                "Pearson r go into scores.json under trust.reference, with a warning below tau 0.8."})
    correction: str = field(default="all", metadata={"help": "ACC correction policy: all, random or stage."})
    correction_p: float = field(default=1.0, metadata={"help": "Probability of a correction (correction=random)."})
    correction_seed: int = field(default=0, metadata={"help": "Seed of the correction coins."})
    stage_steps: list[str] | None = field(default=None, metadata={"help": "Step windows start:stop (correction=stage)."})
    stage_epochs: list[str] | None = field(default=None, metadata={"help": "Epoch windows start:stop (correction=stage)."})
    schedule: str = field(default="auto", metadata={"help": "auto (cost model), sweep or propagator."})
    form: str = field(
        default="auto",
        metadata={"help": "auto, forward (per-row embeddings, every method) or adjoint (one backward pass whatever "
                          "the number of rows; classical methods, linear scores, no embeddings). auto: adjoint for "
                          "classical methods with linear scores, forward otherwise."},
    )
    trust_probes: int = field(
        default=4, metadata={"help": "Random probes of the tangent-growth estimate (trust check); 0 skips it."}
    )
    trust: str = field(default="auto", metadata={
        "help": "auto (the adjoint form: random probes carried by its own backward pass, about 5-10%% of its cost; the "
                "forward form: the power iteration) or power (the power iteration also for the adjoint form: about one "
                "more adjoint pass per iteration)."})
    trust_iterations: int = field(
        default=1, metadata={"help": "Power iterations (two extra passes over the run each) of the trust check."}
    )
    modules: list[str] | None = field(default=None, metadata={"help": (
        "Scope: the parameters that carry Delta. Module names or globs, 'all' (the whole model), 'last:k' (the "
        "last k transformer blocks and everything above them) or 'head' (the recorded head: the closed-form fast "
        "path, a poor proxy for removing a row from the whole model: docs/FIDELITY.md). Default: the whole model, "
        "replayed exactly from the run's checkpoints (the head when the run cannot be replayed, or when per-row "
        "states that --form forward or ACC need do not fit --memory_budget_gb; the log and scores.json say why). "
        "`hf-accinf summary RUN_DIR` lists the choices.")})
    score_kind: str = field(default="linear", metadata={
        "help": "linear (objective gradient dot embedding: the predicted loss change), cosine (LESS-style cosine "
                "of the two) or evaluated (the objective at the moved parameters; parameter-space methods)."})
    dtype: str = field(default="auto", metadata={"help": (
        "float64, float32 or auto for the propagation: auto is float32 for scopes outside the head (the whole "
        "model, where float32 scores match float64 ones, see docs/ENGINE.md) and float64 for the closed-form head.")})
    verify: int = field(
        default=0, metadata={"help": "Retrain this many random rows out by replay (weight 0 and 0.5), together with "
                                     "the base run in one batched retraining within --memory_budget_gb, and report "
                                     "the agreement of the scores with those exact counterfactuals: Kendall tau with "
                                     "a bootstrap interval, against the linearity ceiling (0: skip; more rows, a "
                                     "narrower interval)."}
    )
    verify_seed: int = field(default=0, metadata={"help": "Seed of the rows --verify retrains (and of the subsets and "
                                                          "queries of --verify_subsets)."})
    verify_subsets: int = field(default=0, metadata={
        "help": "LDS by replay: retrain this many random subsets per --verify_fraction out (weight 0, and 0.5 for the "
                "subset linearity ceiling) with the base run in the one batched retraining, and report Spearman's rho "
                "between the measured and the predicted (summed scores) change of the mean evaluation loss, and per "
                "query over --verify_queries evaluation rows, with bootstrap intervals (0: skip; at least 3)."})
    verify_fraction: list[float] = field(default_factory=lambda: [0.01, 0.05], metadata={
        "help": "Fractions of the training rows in each --verify_subsets subset (several at once)."})
    verify_queries: int = field(default=16, metadata={
        "help": "Evaluation rows of the per-query LDS of --verify_subsets (one blocked adjoint pass; 0: objective only)."})
    device: str = field(default="auto", metadata={"help": (
        "auto, cpu, cuda or cuda:<index>: where the problem, replay, curvature, every form, the trust check, "
        "--verify and the projection compute. auto: the accelerate process's device when launched (each process "
        "its own GPU), else cuda when a GPU is visible, else cpu. cuda without a GPU is refused before any work.")})
    allow_tf32: bool = field(default=True, metadata={"help": (
        "CUDA, float32 work: TF32 matmuls for the scorer's own products (replay keeps the training run's recorded "
        "TF32/cuDNN flags). No effect on the CPU or in float64.")})
    memory_budget_gb: float | None = field(default=None, metadata={
        "help": "Memory (GiB) for per-sample states before chunking, and for the models --verify retrains "
                "together; deep scopes split it between the replay's cache of states and the model backend's row "
                "blocks (beyond it: sub-intervals recomputed, smaller blocks). Default (auto): on a GPU 70%% of its "
                "free memory; on the CPU 4 GiB, or half the available RAM (split between the processes launched on the "
                "machine) when that is less."})
    replay_tolerance: float = field(default=1e-4, metadata={  # = trajectory.replay.REPLAY_TOLERANCE
        "help": "Deep scopes: largest accepted relative error of the replay at each checkpoint (of the outputs, the "
                "parameters and the optimizer state, gauge tensors left out); a replay beyond it is refused."})
    output_dir: str | None = field(default=None, metadata={"help": "Where to write (default: <run_dir>/scores)."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Write into a non-empty output_dir that hf-accinf did not write (its other files are kept)."},
    )
    num_partitions: int = field(default=1, metadata={
        "help": "Split the scoring into this many independent jobs (e.g. one per machine): the forward form and DVEmb "
                "by rows, TracIn by steps; each writes its shard into --output_dir and `hf-accinf aggregate` combines "
                "them. The adjoint form cannot be split (use --form forward, or data parallelism across nodes)."})
    partition: int = field(default=0, metadata={"help": "Which partition of --num_partitions this job scores (0-based)."})
    resume_every: int = field(default=0, metadata={
        "help": "The adjoint form saves a resume point (its vector, probes and scores so far) under "
                "<output_dir>/.resume every this many steps (0: at the run's checkpoint steps; -1: never); an "
                "interrupted run resumes from the last one. The forward form saves each finished chunk of rows when its "
                "states need several (-1: neither form saves)."})

    def __post_init__(self) -> None:
        if self.num_partitions < 1 or not 0 <= self.partition < self.num_partitions:
            raise ValueError(f"partition must lie in [0, num_partitions) and num_partitions >= 1, got partition "
                             f"{self.partition} of {self.num_partitions}.")
        if self.resume_every < -1:
            raise ValueError(f"resume_every is -1 (never), 0 (at checkpoints) or a step count, got {self.resume_every}.")
        for name, allowed in (("removal", REMOVALS), ("correction", CORRECTION_CHOICES), ("schedule", SCHEDULE_CHOICES),
                              ("score_kind", SCORE_KINDS), ("dtype", DTYPES), ("trust", TRUST_CHOICES),
                              ("reference_check", REFERENCE_CHECKS), ("sketch_basis", SKETCH_BASES),
                              ("form", FORM_CHOICES)):
            check_choice(name, getattr(self, name), allowed)
        if self.projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0 (0: no projection), got {self.projection_dim}.")
        check_device_choice(self.device)
        if self.memory_budget_gb is not None and self.memory_budget_gb <= 0:
            raise ValueError(f"memory_budget_gb must be positive, got {self.memory_budget_gb}.")
        if not self.replay_tolerance > 0:
            raise ValueError(f"replay_tolerance must be positive, got {self.replay_tolerance}.")
        if not 0.0 <= self.correction_p <= 1.0:
            raise ValueError(f"correction_p must lie in [0, 1], got {self.correction_p}.")
        for value in (self.stage_steps or []) + (self.stage_epochs or []):
            start, sep, stop = str(value).partition(":")
            if not sep or not start.strip().lstrip("-").isdigit() or not stop.strip().lstrip("-").isdigit():
                raise ValueError(f"Stage windows are start:stop integers, got '{value}'.")
        if self.verify < 0 or self.verify == 1:
            raise ValueError(f"verify needs at least 2 rows (or 0 to skip), got {self.verify}.")
        if self.verify_subsets < 0 or self.verify_subsets in (1, 2):
            raise ValueError(f"verify_subsets needs at least 3 subsets (or 0 to skip), got {self.verify_subsets}.")
        if self.verify_subsets and (not self.verify_fraction or not all(0 < f < 1 for f in self.verify_fraction)):
            raise ValueError(f"verify_fraction must be fractions in (0, 1), got {self.verify_fraction}.")
        if self.verify_queries < 0:
            raise ValueError(f"verify_queries must be >= 0, got {self.verify_queries}.")
        if self.trust_probes < 0 or self.trust_iterations < 0:
            raise ValueError("trust_probes and trust_iterations must be >= 0.")
        if (self.stage_steps or self.stage_epochs) and self.correction != "stage":
            raise ValueError("stage_steps/stage_epochs need correction='stage'.")
        if self.correction_p != 1.0 and self.correction != "random":
            raise ValueError("correction_p needs correction='random'.")
        if self.method != "auto" and not self.method.startswith("acc-") and self.correction != "all":
            raise ValueError(f"{self.method} applies no correction; correction policies belong to the acc- methods.")

    def windows(self, values: list[str] | None) -> list[tuple[int, int]]:
        result = []
        for value in values or []:
            start, _, stop = str(value).partition(":")
            result.append((int(start), int(stop)))
        return result

    def to_dict(self) -> dict:
        return asdict(self)
