"""Where the accumulative correction applies: every occurrence, a random subset, or chosen stages.

The coefficient ``c_t`` of sample ``j`` at step ``t`` (DESIGN.md section 3). Randomized coins are a
pure function of ``(seed, j, t)`` (a splitmix64-style counter hash), so every schedule, form and
shard draws the same coins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import AccInfError
from ..options import CORRECTION_KINDS, CorrectionKind, check_choice

_MASK = (1 << 64) - 1


def _to_signed(value: int) -> int:
    value &= _MASK
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _to_signed(0x9E3779B97F4A7C15)
_MIX1 = _to_signed(0xBF58476D1CE4E5B9)
_MIX2 = _to_signed(0x94D049BB133111EB)


def _shift_right(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (values >> bits) & ((1 << (64 - bits)) - 1)


def uniform_coins(seed: int, samples: torch.Tensor, step: int) -> torch.Tensor:
    """A float64 in [0, 1) for each sample at ``step``: splitmix64 of (seed, sample, step)."""
    key = samples.to(torch.int64) * _GOLDEN + _to_signed(seed * 0x632BE59BD9B4E019 + step * 0xD6E8FEB86659FD93)
    key = (key ^ _shift_right(key, 30)) * _MIX1
    key = (key ^ _shift_right(key, 27)) * _MIX2
    key = key ^ _shift_right(key, 31)
    return _shift_right(key, 11).to(torch.float64) / float(1 << 53)


@dataclass
class CorrectionPolicy:
    """``c_t`` per occurrence. ``kind``: ``none`` (classical), ``all`` (ACC), ``random`` (probability
    ``p``), ``stage`` (only in ``stages``: [start, stop) step windows, or ``stage_epochs``: epoch windows)."""

    kind: CorrectionKind = "all"
    p: float = 1.0
    seed: int = 0
    stages: list[tuple[int, int]] = field(default_factory=list)
    stage_epochs: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice("correction policy", self.kind, CORRECTION_KINDS, AccInfError)
        if not 0.0 <= self.p <= 1.0:
            raise AccInfError(f"The correction probability p must lie in [0, 1], got {self.p}.")
        if self.kind == "stage" and not (self.stages or self.stage_epochs):
            raise AccInfError("A stage-limited correction needs stages (step windows) or stage_epochs.")

    def may_correct(self, step: int, epoch: int) -> bool:
        """Whether any occurrence at ``step`` may get ``c != 0``, decided on the host (no device value read)."""
        if self.kind in ("none", "all"):
            return self.kind == "all"
        if self.kind == "random":
            return self.p > 0
        return any(a <= step < b for a, b in self.stages) or any(a <= epoch < b for a, b in self.stage_epochs)

    def coefficients(self, samples: torch.Tensor, step: int, epoch: int, dtype=torch.float64) -> torch.Tensor:
        if self.kind == "none":
            return torch.zeros(len(samples), dtype=dtype, device=samples.device)
        if self.kind == "all":
            return torch.ones(len(samples), dtype=dtype, device=samples.device)
        if self.kind == "random":
            return (uniform_coins(self.seed, samples, step) < self.p).to(dtype)  # integer hash: equal on every device
        inside = any(a <= step < b for a, b in self.stages) or any(a <= epoch < b for a, b in self.stage_epochs)
        return torch.full((len(samples),), float(inside), dtype=dtype, device=samples.device)


def check_policy(rule, policy: CorrectionPolicy | None) -> None:
    """Refuse a rule and a policy that disagree: the caller decides the policy once (``scoring.plan``), ``None``
    (or ``none``) for a classical rule, a correcting one for an accumulative rule."""
    if getattr(rule, "output", "embeddings") != "embeddings":
        raise AccInfError(f"{rule.spec.name} computes scores directly and is not propagated by the engine.")
    correcting = policy is not None and policy.kind != "none"
    if getattr(rule, "accumulative", False) and policy is None:
        raise AccInfError("An accumulative rule needs a CorrectionPolicy (CorrectionPolicy('all') for ACC at every "
                          "occurrence); scoring.plan.plan_scoring decides it from the arguments.")
    if correcting and not getattr(rule, "accumulative", False):
        raise AccInfError(f"The classical rule {getattr(getattr(rule, 'spec', None), 'name', type(rule).__name__)} "
                          f"takes no correction; got policy '{policy.kind}': use its acc- method or no policy.")


def every_occurrence(rule) -> CorrectionPolicy | None:
    """ACC at every occurrence for an accumulative rule, ``None`` for a classical one: the policy of the paper
    harness, the benchmarks and the tests (the scorer's comes from its arguments, ``scoring.plan``)."""
    return CorrectionPolicy("all") if getattr(rule, "accumulative", False) else None
