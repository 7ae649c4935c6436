"""The one catalogue of methods (ARCHITECTURE.md F2): what each models and how it is built.

Everything that lists methods (the engine, the argument checks, the CLI help, the paper harness,
reports and benchmarks) reads :data:`METHODS`. A refusal names the methods that fit the run's
optimizer, never an optimizer that no method models.

>>> from hf_accinf.methods.registry import method_names
>>> "acc-adam-ie" in method_names()
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import AccInfError
from ..optimizers import MODELLED_HF_OPTIMS, MODELLED_OPTIMIZERS
from ..options import SKETCH_BASES, check_choice
from .removal import check_removal


@dataclass
class MethodOptions:
    """Method options from the score arguments (any object with these attributes will do)."""

    removal: str = field(default="exact", metadata={"help": "exact or first-order removal (DESIGN.md section 4)."})
    frozen_preconditioner: bool = field(
        default=False, metadata={"help": "Adam family: hold v at its recorded value (Delta_v = 0), an ablation."}
    )
    projection_dim: int = field(default=512, metadata={"help": "DVEmb family and sketches: dimension k of the "
                                                                "projection (0: no projection)."})
    projection_seed: int = field(default=0, metadata={"help": "DVEmb family and sketches: seed of the Gaussian "
                                                               "projection."})
    memory_budget_gb: float = field(default=4.0, metadata={"help": "Memory a method may keep (projection, caches)."})
    sketch_basis: str = field(default="gradients", metadata={"help": "*-sketch methods: gradients (the training "
                                                                      "gradients' leading subspace) or random (a Gaussian R, unbiased)."})

    @classmethod
    def of(cls, args: Any = None, **overrides) -> "MethodOptions":
        values = {name: getattr(args, name) for name in cls.__dataclass_fields__  # None: left to the default (auto)
                  if getattr(args, name, None) is not None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        options = cls(**values)
        check_removal(options.removal)
        return options


@dataclass(frozen=True)
class MethodSpec:
    name: str
    display: str
    optimizers: tuple[str, ...]  # torch optimizer classes whose runs the method models
    accumulative: bool  # whether ACC correction policies apply
    output: str  # "embeddings" (test-agnostic, dotted with a gradient) or "scores" (one objective)
    build: Callable[[Any, MethodOptions], Any]
    projected: bool = False  # embeddings of k numbers per row in a projected space (DVEmb, the sketches)
    tracks: str | None = None  # the classical method whose exact embeddings a sketch tracks


def _sgd(problem, options: MethodOptions):
    from .sgd import SGDRule

    return SGDRule(problem, removal=options.removal)


def _adam(problem, options: MethodOptions):
    from .adam import AdamRule

    return AdamRule(problem, removal=options.removal, frozen_preconditioner=options.frozen_preconditioner)


def _dvemb(problem, options: MethodOptions):
    from .dvemb import DVEmbRule

    return DVEmbRule(problem, options.projection_dim, options.projection_seed, options.memory_budget_gb)


def _sketch(exact: str):
    def build(problem, options: MethodOptions):
        from ..engine.sketch import GradientSubspace, SketchRule  # the sketch runs the engine's adjoint pass

        check_choice("sketch basis", options.sketch_basis, SKETCH_BASES, AccInfError)
        rule = build_method(problem, exact, options)
        subspace = options.sketch_basis == "gradients" and options.projection_dim and \
            options.projection_dim < problem.curvature.dim
        basis = GradientSubspace(problem, options.projection_dim, options.projection_seed) if subspace else None
        return SketchRule(rule, problem, options.projection_dim, options.projection_seed, options.memory_budget_gb,
                          projection=basis)

    return build


def _tracin(problem, options: MethodOptions):
    from .tracin import TracIn

    return TracIn(problem)


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("sgd-ie", "SGD-IE", ("SGD",), False, "embeddings", _sgd),
    MethodSpec("acc-sgd-ie", "ACC-SGD-IE", ("SGD",), True, "embeddings", _sgd),
    MethodSpec("adam-ie", "Adam-IE", ("Adam", "AdamW"), False, "embeddings", _adam),
    MethodSpec("acc-adam-ie", "ACC-Adam-IE", ("Adam", "AdamW"), True, "embeddings", _adam),
    MethodSpec("dvemb", "DVEmb", ("SGD", "Adam", "AdamW"), False, "embeddings", _dvemb, projected=True),
    MethodSpec("acc-dvemb", "ACC-DVEmb", ("SGD", "Adam", "AdamW"), True, "embeddings", _dvemb, projected=True),
    MethodSpec("sgd-ie-sketch", "Sketched SGD-IE", ("SGD",), False, "embeddings", _sketch("sgd-ie"), projected=True,
               tracks="sgd-ie"),
    MethodSpec("adam-ie-sketch", "Sketched Adam-IE", ("Adam", "AdamW"), False, "embeddings", _sketch("adam-ie"),
               projected=True, tracks="adam-ie"),
    MethodSpec("tracin", "TracIn", ("SGD", "Adam", "AdamW"), False, "scores", _tracin),
)}


CLASSICAL_METHODS = {"SGD": "sgd-ie", "Adam": "adam-ie", "AdamW": "adam-ie"}  # the exact classical method per optimizer


def reference_method(name: str, optimizer: str) -> str | None:
    """The exact classical method a projected method's scores are checked against (the one a sketch tracks; for
    DVEmb, the run's optimizer's), ``None`` for methods that are not projected."""
    spec = get_method(name)
    if not spec.projected:
        return None
    return spec.tracks or CLASSICAL_METHODS.get(optimizer)


def method_names(optimizer: str | None = None, output: str | None = None) -> list[str]:
    """Registered methods, optionally those modelling ``optimizer`` or producing ``output``."""
    return [name for name, spec in METHODS.items()
            if (optimizer is None or optimizer in spec.optimizers) and (output is None or spec.output == output)]


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise AccInfError(f"Unknown method '{name}'. Available: {', '.join(METHODS)}.")
    return METHODS[name]


def check_fits(spec: MethodSpec, optimizer: str) -> None:
    """Refuse a method that does not model the run's optimizer, naming the methods that do."""
    if optimizer in spec.optimizers:
        return
    fitting = method_names(optimizer)
    if fitting:
        raise AccInfError(f"{spec.name} models runs trained with {'/'.join(spec.optimizers)}; this run used "
                          f"{optimizer}. Methods for this run: {', '.join(fitting)}.")
    raise AccInfError(f"No method models the optimizer {optimizer}. Record a run trained with "
                      f"{' or '.join(MODELLED_OPTIMIZERS)} (TrainingArguments.optim in {MODELLED_HF_OPTIMS}).")


def build_method(problem, name: str, args: Any = None, **overrides):
    """The method object for ``problem``: an :class:`~.base.UpdateRule` (``output == "embeddings"``) or a
    direct scorer (``output == "scores"``), with ``accumulative`` and ``spec`` set from the registry."""
    spec = get_method(name)
    check_fits(spec, problem.optimizer.name)
    method = spec.build(problem, MethodOptions.of(args, **overrides))
    method.accumulative, method.spec = spec.accumulative, spec
    return method
