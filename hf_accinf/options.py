"""The option vocabularies of hf_accinf, each written once: a ``Literal`` type for annotations and the tuple of
its values that validation reads (``config.ScoreArguments``, ``engine.adjoint``, ``engine.estimator``,
``engine.policies``, ``methods.removal``, ``scoring.objective``, ``scoring.forms``). A leaf: it imports nothing from hf_accinf."""

from __future__ import annotations

from typing import Literal, get_args

FormChoice = Literal["auto", "forward", "adjoint"]  # what a user may ask for (DESIGN.md 6b "Forms")
FormName = Literal["forward", "adjoint", "direct"]  # what runs: "direct" for methods that score one objective
ScheduleChoice = Literal["auto", "sweep", "propagator"]  # the forward form's schedules (DESIGN.md 6a)
# What carried the rows, as ``InfluenceResult.schedule`` and ``scores.json`` say it: a forward-form schedule,
# the adjoint form's one backward pass, or a direct scorer's pass over the steps.
ScheduleRun = Literal["sweep", "propagator", "backward", "direct"]
ScoreKind = Literal["linear", "cosine", "evaluated"]
Removal = Literal["exact", "first-order"]  # DESIGN.md section 4
CorrectionChoice = Literal["all", "random", "stage"]  # what a user may ask for an accumulative method
CorrectionKind = Literal["none", "all", "random", "stage"]  # "none": the classical estimators
DtypeChoice = Literal["auto", "float32", "float64"]
TrustChoice = Literal["auto", "power"]
SketchBasis = Literal["random", "gradients"]  # the k-dimensional space of the *-sketch methods (engine.sketch)
ReferenceCheckChoice = Literal["auto", "off"]  # projected methods' scores against the exact adjoint (engine.sketch)

FORM_CHOICES: tuple[str, ...] = get_args(FormChoice)
FORM_NAMES: tuple[str, ...] = get_args(FormName)
SCHEDULE_CHOICES: tuple[str, ...] = get_args(ScheduleChoice)
SCORE_KINDS: tuple[str, ...] = get_args(ScoreKind)
REMOVALS: tuple[str, ...] = get_args(Removal)
CORRECTION_CHOICES: tuple[str, ...] = get_args(CorrectionChoice)
CORRECTION_KINDS: tuple[str, ...] = get_args(CorrectionKind)
DTYPES: tuple[str, ...] = get_args(DtypeChoice)
TRUST_CHOICES: tuple[str, ...] = get_args(TrustChoice)
SKETCH_BASES: tuple[str, ...] = get_args(SketchBasis)
REFERENCE_CHECKS: tuple[str, ...] = get_args(ReferenceCheckChoice)

BACKWARD_PASS: ScheduleRun = "backward"  # the adjoint form: one shared adjoint carried backward over the run
DIRECT_SCORER: ScheduleRun = "direct"  # a direct scorer (TracIn): the objective's gradient at every step


def check_choice(what: str, value: str, allowed: tuple[str, ...], error: type[Exception] = ValueError) -> None:
    """Refuse ``value`` outside ``allowed``, naming the allowed values."""
    if value not in allowed:
        raise error(f"Unknown {what} '{value}': use {', '.join(allowed)}.")
