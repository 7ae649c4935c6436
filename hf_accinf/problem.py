"""An influence problem: the trajectory, the head's curvature and the optimizer, as the engine needs them."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from .curvature.base import HeadCurvature
from .curvature.functional import FunctionalHeadCurvature
from .curvature.linear_head import LinearHeadCurvature
from .errors import AccInfError
from .trajectory import RunReader, Trajectory
from .trajectory.schema import ParamGroupSpec


@dataclass
class OptimizerSpec:
    """The optimizer the run used, for the chosen parameters (learning rates come per step from the trajectory)."""

    name: str  # "SGD", "Adam" or "AdamW"
    groups: list[ParamGroupSpec]
    group_of: dict[str, int]  # chosen parameter -> index into groups and into trajectory.lr columns
    max_grad_norm: float = 0.0

    def per_parameter(self, attribute: str) -> dict[str, float]:
        return {name: getattr(self.groups[index], attribute) or 0.0 for name, index in self.group_of.items()}

    def uniform(self, attribute: str):
        values = {getattr(self.groups[index], attribute) for index in self.group_of.values()}
        if len(values) != 1:
            raise AccInfError(f"The chosen parameters use different {attribute} values {values}; choose one group.")
        return values.pop()


@dataclass
class InfluenceProblem:
    trajectory: Trajectory
    curvature: HeadCurvature
    optimizer: OptimizerSpec
    num_samples: int

    def learning_rates(self, step: int) -> torch.Tensor:
        lrs = self.trajectory.lr[step]
        return self.curvature.expand({name: float(lrs[index]) for name, index in self.optimizer.group_of.items()})


def make_curvature(trajectory: Trajectory, head: nn.Module, chosen: list[str], label_smoothing: float,
                   dtype: torch.dtype, device, backend: str = "auto") -> HeadCurvature:
    """``linear`` (closed form) for ``nn.Linear`` heads, ``functional`` (torch.func) for any other."""
    if backend == "auto":
        backend = "linear" if isinstance(head, nn.Linear) else "functional"
    if backend == "linear":
        if not isinstance(head, nn.Linear):
            raise AccInfError(f"The closed-form backend needs an nn.Linear head, not {type(head).__name__}.")
        return LinearHeadCurvature(trajectory, head, chosen, label_smoothing, dtype, device)
    if backend == "functional":
        return FunctionalHeadCurvature(trajectory, head, chosen, label_smoothing, dtype, device)
    raise AccInfError(f"Unknown curvature backend '{backend}': use auto, linear or functional.")


def problem_from_run(run: RunReader, dtype: torch.dtype = torch.float64, device="cpu", backend: str = "auto",
                     modules: list[str] | None = None, model: nn.Module | None = None) -> InfluenceProblem:
    """Build the problem of a recorded run; ``modules`` narrows the recorded chosen parameters (names in the head);
    ``model``: the run's model already built (:meth:`RunReader.build_model`), else built here."""
    manifest = run.manifest
    chosen = list(manifest.head.chosen)
    if modules:
        chosen = [name for name in chosen if any(fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in modules)]
        if not chosen:
            raise AccInfError(f"No recorded chosen parameter matches {modules}; recorded: {manifest.head.chosen}.")
    model = model if model is not None else run.build_model()
    head = model.get_submodule(manifest.head.module)
    trajectory = run.trajectory()
    curvature = make_curvature(trajectory, head, chosen, manifest.loss["label_smoothing"], dtype, device, backend)
    optimizer = OptimizerSpec(
        name=manifest.optimizer_class, groups=manifest.param_groups,
        group_of={name: manifest.head.param_groups[name] for name in chosen},
        max_grad_norm=manifest.training["max_grad_norm"],
    )
    return InfluenceProblem(trajectory, curvature, optimizer, manifest.dataset["length"])
