"""The scoring plan: every decision of a score run made once, before any long work (DESIGN.md 6b, "The default").

``plan_scoring`` resolves what the user left to ``auto`` and says why, in one place that the scorer, the
log and ``scores.json`` read:

* **scope**: the whole model by default. A smaller scope (the recorded head) is chosen only when the user
  asks for it (``--modules head`` or a module inside the head), when the run cannot be replayed (the
  reason is written into the provenance and warned about), or when what the user asks for needs per-row
  states (embeddings, ACC at every occurrence) that the whole model cannot hold within the memory budget.
* **method**: ``auto`` is the run's classical method with exact removal (``adam-ie`` for Adam/AdamW,
  ``sgd-ie`` for SGD) on a deep scope, scored by the adjoint; on the head, where per-row states are cheap,
  its accumulative twin (``acc-adam-ie``, ``acc-sgd-ie``) in the forward form.
* **form**: ``direct`` for methods that score one objective (TracIn); otherwise :func:`choose_form`.
* **dtype**: ``auto`` is float32 on deep scopes (measured to give the float64 scores: docs/ENGINE.md) and
  float64 on the head's closed form.
* **device** and **memory budget** (:mod:`hf_accinf.devices`): ``--device auto`` is the accelerate process's
  device, else a visible GPU, else the CPU; ``cuda`` without a GPU is refused here. An explicit
  ``--memory_budget_gb`` wins, else a share of the device's free memory. Every later step (problem, replay,
  curvature, forms, trust, ``--verify``, projection) takes the plan's device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..config import ScoreArguments, resolve_dtype
from ..devices import resolve_device, resolve_memory_budget, scorer_tf32
from ..engine.adjoint import choose_form
from ..engine.policies import CorrectionPolicy
from ..errors import AccInfError
from ..options import FormName
from ..methods.dvemb import deep_scope_warning
from ..methods.registry import METHODS, check_fits, get_method
from ..scope import ALL, HEAD, resolve_scope
from ..trajectory import RunReader

logger = logging.getLogger(__name__)

CLASSICAL = {"SGD": "sgd-ie", "Adam": "adam-ie", "AdamW": "adam-ie"}
ACCUMULATIVE = {"SGD": "acc-sgd-ie", "Adam": "acc-adam-ie", "AdamW": "acc-adam-ie"}


@dataclass(frozen=True)
class ScoringPlan:
    """What a score run does, resolved from :class:`ScoreArguments` and the run."""

    method: str
    modules: tuple[str, ...] | None  # the scope's patterns (resolve_scope); None: the recorded head
    deep: bool  # whether the scope reaches outside the recorded head (the whole model run at every step)
    form: FormName  # which of scoring.forms.FORMS runs
    dtype: torch.dtype
    device: torch.device
    policy: CorrectionPolicy | None  # None for classical methods: no correction applies
    reasons: dict[str, str] = field(default_factory=dict)  # decision -> why
    fallback: str | None = None  # why the default whole-model scope was not used, when it was not
    warnings: tuple[str, ...] = ()  # what the user should know of the chosen method on this scope
    memory_budget_gb: float = 4.0  # resolved: as asked, or derived from the device's free memory
    tf32: bool = False  # whether the scorer's own float32 products use TF32 (CUDA only; replay keeps the run's flags)

    @property
    def memory_budget(self) -> int:
        """The memory budget in bytes."""
        return int(self.memory_budget_gb * 2**30)

    def arguments(self, args: ScoreArguments) -> ScoreArguments:
        """``args`` with every ``auto`` replaced by what the plan resolved (what ``scores.json`` saves)."""
        import dataclasses

        return dataclasses.replace(args, method=self.method, form=args.form if self.form == "direct" else self.form,
                                   modules=list(self.modules) if self.modules is not None else [HEAD],
                                   dtype=str(self.dtype).removeprefix("torch."), device=str(self.device),
                                   memory_budget_gb=self.memory_budget_gb)

    def to_dict(self) -> dict:
        return {"method": self.method, "modules": list(self.modules) if self.modules is not None else [HEAD],
                "form": self.form, "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
                "memory_budget_gb": self.memory_budget_gb, "tf32": self.tf32, "reasons": dict(self.reasons), "fallback": self.fallback, "warnings": list(self.warnings)}

    def log(self) -> None:
        for decision, why in self.reasons.items():
            logger.info("%s: %s", decision, why)
        if self.fallback:
            logger.warning("scoring the recorded head instead of the whole model: %s", self.fallback)
        for warning in self.warnings:
            logger.warning("%s", warning)


def _is_head(run: RunReader, model: nn.Module, modules: list[str] | None) -> bool:
    if not modules or list(modules) == [HEAD]:
        return True
    head = run.manifest.head.module
    relative = resolve_scope(model, modules, head=head).inside(head)
    return relative is not None and set(relative) <= set(run.manifest.head.chosen)


def _state_bytes(method: str, parameters: int, rows: int, args: ScoreArguments, itemsize: int) -> int:
    """Bytes of the forward form's per-row states: ``N x S`` (``S = 3P`` for Adam, ``2P`` with a buffer, ``k``
    for the projected methods)."""
    if get_method(method).projected:
        width = args.projection_dim or parameters
    else:
        width = parameters * (3 if "adam" in method else 2)
    return rows * width * itemsize


def plan_scoring(args: ScoreArguments, run: RunReader, model: nn.Module,
                 replay_unavailable: str | None | Callable[[torch.device], str | None] = None,
                 process_device: torch.device | str | None = None) -> ScoringPlan:
    """Resolve ``args`` for ``run`` (``model``: the run's model, built). ``replay_unavailable``: why the run's
    exact trajectory cannot be replayed (``None``: it can), which keeps the default on the head; a callable
    is asked with the resolved device. ``process_device``: the accelerate process's device, when launched."""
    optimizer = run.manifest.optimizer_class
    reasons: dict[str, str] = {}
    device, reasons["device"] = resolve_device(args.device, process_device)
    budget_gb, reasons["memory_budget"] = resolve_memory_budget(args.memory_budget_gb, device)
    if callable(replay_unavailable):
        replay_unavailable = replay_unavailable(device)
    fallback = None
    asked_head = args.modules is not None and _is_head(run, model, args.modules)
    method = args.method
    if method != "auto":
        check_fits(get_method(method), optimizer)
    elif optimizer not in CLASSICAL:
        check_fits(METHODS["adam-ie"], optimizer)  # names what fits, or that nothing does

    if args.modules is not None:
        modules = tuple(args.modules)
        reasons["scope"] = "the recorded head, as asked" if asked_head else f"{list(args.modules)}, as asked"
    elif replay_unavailable:
        modules, fallback = None, replay_unavailable
        reasons["scope"] = f"the recorded head: the whole model needs the exact trajectory, and {replay_unavailable}"
    else:
        modules = (ALL,)
        reasons["scope"] = "the whole model (the default: what removing a row does to the model users train)"
        wants_states = (args.form == "forward" or args.score_kind != "linear"
                        or (method != "auto" and get_method(method).accumulative and args.correction != "stage"))
        resolved = method if method != "auto" else CLASSICAL[optimizer]
        if wants_states and get_method(resolved).output == "embeddings":
            parameters = sum(p.numel() for p in model.parameters())
            rows = -(-run.manifest.dataset.length // args.num_partitions)  # one partition's rows
            needed = _state_bytes(resolved, parameters, rows, args, 4)
            if needed > budget_gb * 2**30:
                modules = None
                reasons["scope"] = (f"the recorded head: per-row states of the whole model ({needed / 2**30:.1f} GiB for "
                                    f"{resolved}, forward form) exceed --memory_budget_gb {budget_gb:g}; "
                                    "the adjoint form of a classical method (--method auto) scores the whole model")

    deep = modules is not None and not asked_head
    if method == "auto":
        method = CLASSICAL[optimizer] if deep else ACCUMULATIVE[optimizer]
        reasons["method"] = (f"{method}: the classical method of the run's {optimizer} with {args.removal} removal, "
                             "scored through the adjoint" if deep else
                             f"{method}: the accumulative method of the run's {optimizer} (per-row states are cheap on the head)")
    else:
        reasons["method"] = f"{method}, as asked"

    spec = get_method(method)
    policy = (CorrectionPolicy(args.correction, args.correction_p, args.correction_seed,
                               args.windows(args.stage_steps), args.windows(args.stage_epochs))
              if spec.accumulative else None)
    if spec.output == "scores":
        if args.score_kind != "linear":
            raise AccInfError(f"{method} scores one objective directly: its scores are linear; score_kind "
                              f"'{args.score_kind}' needs a method with embeddings.")
        form, reasons["form"] = "direct", "the method scores one objective directly"
    elif spec.tracks:
        if args.form == "adjoint":
            raise AccInfError(f"{method}'s product is its k-dimensional embeddings (--form forward or auto); for one "
                              f"objective's scores {spec.tracks} --form adjoint is exact and k times cheaper.")
        form, reasons["form"] = "forward", "a sketch's product is its k-dimensional embeddings (forward form)"
    else:
        form, why = choose_form(args.form, spec.accumulative, args.score_kind, policy)
        reasons["form"] = why

    dtype = resolve_dtype(args.dtype, deep)
    if args.dtype == "auto":
        reasons["dtype"] = ("float32: a deep scope (its scores agree with float64 ones to about 1e-5; docs/ENGINE.md)"
                            if deep else "float64: the head's closed form is cheap")
    tf32 = scorer_tf32(device, dtype, args.allow_tf32)
    if tf32:
        reasons["precision"] = "TF32 matmuls for the scorer's own float32 products (replay keeps the run's flags)"
    warning = deep_scope_warning(method, deep)
    return ScoringPlan(method, modules, deep, form, dtype, device, policy, reasons, fallback,
                       (warning,) if warning else (), budget_gb, tf32)

