"""The optimizers hf_accinf models, in one table (DESIGN.md sections 3 and 4).

Every part of the package that needs to know something about the run's optimizer reads it here: the
recorder (which state tensors to record, what to refuse), replay (which state to restore), the functional
steps of retraining, the Adam and SGD rules and DVEmb (defaults of betas and eps, decoupled or L2 decay).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import AccInfError


@dataclass(frozen=True)
class OptimizerKind:
    """One modelled ``torch.optim`` class."""

    name: str  # the torch class name, as the manifest records it
    state_keys: tuple[str, ...]  # per-parameter state tensors (besides torch's "step" count)
    adaptive: bool  # Adam family: moments m, v and a preconditioned step
    decoupled_decay: bool  # weight decay applied to the parameters (AdamW) rather than added to the gradient
    betas: tuple[float, float] | None = None  # torch's defaults, for groups that do not record them
    eps: float | None = None


OPTIMIZERS: dict[str, OptimizerKind] = {kind.name: kind for kind in (
    OptimizerKind("SGD", ("momentum_buffer",), adaptive=False, decoupled_decay=False),
    OptimizerKind("Adam", ("exp_avg", "exp_avg_sq"), adaptive=True, decoupled_decay=False, betas=(0.9, 0.999), eps=1e-8),
    OptimizerKind("AdamW", ("exp_avg", "exp_avg_sq"), adaptive=True, decoupled_decay=True, betas=(0.9, 0.999), eps=1e-8),
)}
MODELLED_OPTIMIZERS = tuple(OPTIMIZERS)
MODELLED_HF_OPTIMS = ("adamw_torch", "adamw_torch_fused", "sgd")
"""``TrainingArguments.optim`` values that build one of :data:`OPTIMIZERS`."""

UNMODELLED_FLAGS = ("amsgrad", "maximize", "dampening")


def optimizer_kind(name: str) -> OptimizerKind:
    """The table's row for the torch optimizer class ``name``; refuses an optimizer no method models."""
    if name not in OPTIMIZERS:
        raise AccInfError(
            f"The estimators do not model the optimizer {name}. Train with optim='adamw_torch' (the default), "
            "'adamw_torch_fused' or 'sgd' (TrainingArguments.optim), or pass a torch.optim SGD/Adam/AdamW."
        )
    return OPTIMIZERS[name]


def check_groups(name: str, groups: list[dict]) -> None:
    """Refuse parameter groups with a flag the rules do not model (amsgrad, maximize, SGD dampening)."""
    for group in groups:
        flags = [flag for flag in UNMODELLED_FLAGS if group.get(flag)]
        if flags:
            raise AccInfError(f"{name} with {' and '.join(flags)} is not modelled by the estimators; turn "
                              f"{'it' if len(flags) == 1 else 'them'} off and record the run again.")


def check_optimizer(optimizer) -> OptimizerKind:
    """The row of a live ``torch.optim`` optimizer, refused before training when no method models it."""
    kind = optimizer_kind(type(optimizer).__name__)
    check_groups(kind.name, optimizer.param_groups)
    return kind
