"""An influence problem: the trajectory, the scope's curvature and the optimizer, as the engine needs them.

The scope (:func:`~hf_accinf.scope.resolve_scope`) picks the backend (DESIGN.md section 6b): a scope
inside the recorded head keeps the head backends (closed form or ``torch.func`` on the recorded head
inputs, the fast path); any other scope gets :class:`~hf_accinf.curvature.model.ModelCurvature`, which
runs the whole model at ``theta_t`` from a :class:`~hf_accinf.curvature.model.TrajectoryStates`
provider on the step's rows collated from the training dataset. The gauge tensors the provider finds
(:meth:`~hf_accinf.trajectory.replay.Replay.gauge_parameters`: tensors that do not change the outputs,
whose ``Delta`` is zero in exact arithmetic and whose float32 noise Adam's ``1 / eps`` gain would amplify)
are left out of a deep scope and named in :attr:`InfluenceProblem.gauge`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .curvature.base import HeadCurvature
from .curvature.functional import FunctionalHeadCurvature
from .curvature.linear_head import LinearHeadCurvature
from .curvature.model import ModelCurvature, TrajectoryStates
from .errors import AccInfError
from .optimizers import OptimizerKind, optimizer_kind
from .scope import Scope, resolve_scope
from .trajectory import RunReader, Trajectory
from .trajectory.schema import ParamGroupSpec

logger = logging.getLogger(__name__)


@dataclass
class OptimizerSpec:
    """The optimizer the run used, for the chosen parameters (learning rates come per step from the trajectory)."""

    name: str  # "SGD", "Adam" or "AdamW"
    groups: list[ParamGroupSpec]
    group_of: dict[str, int]  # chosen parameter -> index into groups and into trajectory.lr columns
    max_grad_norm: float = 0.0

    def per_parameter(self, attribute: str) -> dict[str, float]:
        return {name: getattr(self.groups[index], attribute) or 0.0 for name, index in self.group_of.items()}

    @property
    def kind(self) -> OptimizerKind:
        """The optimizer table's row for this optimizer (state keys, defaults, decoupled decay)."""
        return optimizer_kind(self.name)

    def expand(self, curvature: HeadCurvature, read: Callable[[ParamGroupSpec], float]) -> torch.Tensor:
        """``read(group)`` of every chosen parameter's group, as a (P,) vector in the curvature's layout."""
        return curvature.expand({name: float(read(self.groups[index])) for name, index in self.group_of.items()})

    def adam_hyperparameters(self, curvature: HeadCurvature) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(beta1, beta2, eps)`` per parameter, torch's defaults where a group does not record them; refuses
        amsgrad and maximize, which no rule models."""
        kind = self.kind
        if any(self.groups[index].amsgrad or self.groups[index].maximize for index in self.group_of.values()):
            raise AccInfError(f"The Adam rules model {kind.name} without amsgrad or maximize; record a run without them.")
        return (self.expand(curvature, lambda group: (group.betas or kind.betas)[0]),
                self.expand(curvature, lambda group: (group.betas or kind.betas)[1]),
                self.expand(curvature, lambda group: kind.eps if group.eps is None else group.eps))

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
    scope: Scope | None = None  # full parameter names; None for problems assembled by hand
    final_parameters: Callable[[], dict[str, torch.Tensor]] | None = None  # in the curvature's naming
    gauge: tuple[str, ...] = ()  # gauge tensors of the requested scope, left out of it (no effect on the outputs)
    _device_lr: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def learning_rates(self, step: int) -> torch.Tensor:
        """The (P,) learning rates of ``step`` in the curvature's layout. Off the CPU, gathered from the run's
        (steps, groups) table copied to the device once: no copy from the host inside the step loop."""
        curvature = self.curvature
        if getattr(curvature, "device", torch.device("cpu")).type != "cpu":
            if self._device_lr is None:
                group = curvature.expand({name: float(index) for name, index in self.optimizer.group_of.items()})
                self._device_lr = (self.trajectory.lr.to(curvature.device, curvature.dtype), group.long())
            table, group = self._device_lr
            return table[step].index_select(0, group)
        lrs = self.trajectory.lr[step]
        return curvature.expand({name: float(lrs[index]) for name, index in self.optimizer.group_of.items()})


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


class CheckpointStates:
    """:class:`TrajectoryStates` of a run checkpointed at every step (``checkpoint_every=1``): exact
    ``theta_t`` from the checkpoints, each step's rows collated from the training dataset as one batch."""

    def __init__(self, run: RunReader, dataset, collate_fn=None):
        from transformers import default_data_collator

        missing = sorted(set(range(run.num_steps + 1)) - set(run.manifest.checkpoints))
        if missing:
            raise AccInfError(
                f"A scope outside the head needs every parameter at every step, but {run.run_dir} has "
                f"checkpoints at {len(run.manifest.checkpoints)} of {run.num_steps + 1} steps (first missing: "
                f"{missing[0]}). Record with RecordingArguments(checkpoint_every=1), pass a replay provider "
                "(states=...), or choose modules inside the head."
            )
        self.run, self.dataset = run, dataset
        self.collate_fn = collate_fn or default_data_collator
        self.trajectory = run.trajectory()
        self._gauge: tuple[str, ...] | None = None

    def parameters_at(self, step: int) -> dict[str, torch.Tensor]:
        return self.run.load_checkpoint(step)

    def gauge_parameters(self) -> tuple[str, ...]:
        """The parameters that do not change the outputs, found at the first and the last checkpoint as
        :meth:`~hf_accinf.trajectory.replay.Replay.gauge_parameters` finds them."""
        from .trajectory.gauge import find_gauge, probe_inputs

        if self._gauge is None:
            last = self.run.num_steps
            probes = [(self.run.load_checkpoint(point), [probe_inputs(self.batch_inputs(min(point, last - 1))[0][0])])
                      for point in (0, last)]
            with torch.enable_grad():
                self._gauge = find_gauge(self.run.build_model().double().eval(), probes)
        return self._gauge

    def batch_inputs(self, step: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        rows = self.trajectory.batch(step).tolist()
        batch = self.collate_fn([self.dataset[int(row)] for row in rows])
        inputs = {key: value for key, value in batch.items() if key != "labels" and isinstance(value, torch.Tensor)}
        return [(inputs, torch.arange(len(rows)))]


def default_states(run: RunReader, train_dataset, collate_fn=None, model: nn.Module | None = None,
                   memory_budget: int | None = None, tolerance: float | None = None,
                   device: torch.device | str = "cpu") -> TrajectoryStates:
    """Exact ``theta_t`` for a deep scope: replay from the sparse checkpoints on ``device`` (DESIGN.md section 6b;
    its cache within ``memory_budget`` bytes, its check at ``tolerance``), or, for runs recorded before replay existed,
    their checkpoints when there is one at every step. ``model``: the run's model (or a factory) when its class
    cannot be imported."""
    from .trajectory import schema
    from .trajectory.replay import REPLAY_TOLERANCE, Replay

    if run.manifest.schema_version >= schema.REPLAY_SCHEMA_VERSION:
        options = {"tolerance": REPLAY_TOLERANCE if tolerance is None else tolerance}
        if memory_budget is not None:
            options["memory_budget"] = int(memory_budget)
        return Replay(run, train_dataset, collate_fn, device, model=model, **options)
    run.check_dataset(train_dataset)
    return CheckpointStates(run, train_dataset, collate_fn)


class RecordedPrecision:
    """A :class:`TrajectoryStates` provider whose every call runs under the training run's own TF32 flags
    (``manifest.numerics``, :func:`~hf_accinf.devices.recorded_precision`): the scorer may allow TF32 for its own
    products (:func:`~hf_accinf.devices.scorer_precision`), never for replay (DESIGN.md 6b)."""

    def __init__(self, states: TrajectoryStates, numerics: dict):
        self.states, self.numerics = states, numerics

    def __getattr__(self, name: str):
        value = getattr(self.states, name)
        if not callable(value):
            return value

        def under_recorded_flags(*args, **kwargs):
            from .devices import recorded_precision

            with recorded_precision(self.numerics):
                return value(*args, **kwargs)

        return under_recorded_flags


def deep_scope_unavailable(run: RunReader, device="cpu", model: nn.Module | None = None) -> str | None:
    """Why no scope outside the head can be scored on ``device`` (``None``: it can), before any work: the
    reason replay is impossible (:func:`~hf_accinf.trajectory.replay.replay_unavailable`), unless the run,
    recorded before replay existed, has a checkpoint at every step (:class:`CheckpointStates`)."""
    from .trajectory import schema
    from .trajectory.replay import replay_unavailable

    if run.manifest.schema_version < schema.REPLAY_SCHEMA_VERSION and \
            set(range(run.num_steps + 1)) <= set(run.manifest.checkpoints):
        return None
    return replay_unavailable(run, device, model)


def without_gauge(scope: Scope, states: TrajectoryStates) -> tuple[Scope, tuple[str, ...]]:
    """``scope`` less the gauge tensors ``states`` found (if it finds any), and those left out."""
    finder = getattr(states, "gauge_parameters", None)
    gauge = set(finder()) if finder is not None else set()
    dropped = tuple(name for name in scope.parameters if name in gauge)
    if not dropped:
        return scope, ()
    kept = tuple(name for name in scope.parameters if name not in gauge)
    if not kept:
        raise AccInfError(f"The scope {list(scope.patterns)} holds only gauge tensors {list(dropped)}: they do not "
                          "change the model's outputs, so they carry no influence. Choose other modules.")
    logger.info("left out of the scope: %d gauge tensors that do not change the model's outputs (%s)",
                len(dropped), ", ".join(dropped))
    return Scope(kept, scope.patterns), dropped


def parameter_groups(run: RunReader, model: nn.Module, names: list[str]) -> dict[str, int]:
    """The optimizer group of every scope parameter. The manifest names the head's; the others follow the
    HF Trainer's rule (group 0: decayed, group 1: biases and norms), checked against the head's groups."""
    from transformers import Trainer

    recorded = {f"{run.manifest.head.module}.{name}": group for name, group in run.manifest.head.param_groups.items()}
    count = len(run.manifest.param_groups)
    if count == 1:
        return {name: 0 for name in names}
    decayed = set(Trainer.get_decay_parameter_names(None, model))
    derived = {name: 0 if name in decayed else 1 for name in names + list(recorded)}
    if count != 2 or any(derived[name] != group for name, group in recorded.items()):
        raise AccInfError(
            f"The run's optimizer has {count} parameter groups that do not follow the HF Trainer's decay / "
            "no-decay split, so the groups of parameters outside the head are unknown. Score a scope inside "
            f"the head ('{run.manifest.head.module}') or train with the Trainer's default optimizer grouping."
        )
    return {name: recorded.get(name, derived[name]) for name in names}


def problem_from_run(run: RunReader, dtype: torch.dtype = torch.float64, device="cpu", backend: str = "auto",
                     modules: list[str] | None = None, train_dataset=None, collate_fn=None,
                     states: TrajectoryStates | None = None, per_row: str = "auto",
                     model: nn.Module | None = None, memory_budget: int | None = None,
                     replay_tolerance: float | None = None) -> InfluenceProblem:
    """Build the problem of a recorded run for the scope ``modules`` (see :func:`resolve_scope`; default:
    the recorded chosen parameters). A scope inside the recorded head uses the head backends; any other
    needs ``train_dataset`` (and its ``collate_fn``) and exact parameters at every step: ``states``, or a
    replay of the run (:func:`default_states`, with ``memory_budget`` bytes and ``replay_tolerance``), or a
    run recorded with ``checkpoint_every=1``; its gauge tensors are left out (:attr:`InfluenceProblem.gauge`).
    ``device``: where the curvature, its replay and every tensor the engine makes from them live.
    ``model``: the run's model already built (:meth:`RunReader.build_model`), else built here."""
    manifest = run.manifest
    model = model if model is not None else run.build_model()
    head_name = manifest.head.module
    if modules:
        scope = resolve_scope(model, modules, head=head_name)
    else:
        scope = Scope(tuple(f"{head_name}.{name}" for name in manifest.head.chosen), (head_name,))
    trajectory = run.trajectory()
    smoothing = manifest.loss.label_smoothing
    relative = scope.inside(head_name)
    gauge: tuple[str, ...] = ()
    if relative is not None and set(relative) <= set(manifest.head.chosen) and backend != "model":
        chosen = list(relative)
        head = model.get_submodule(head_name)
        curvature = make_curvature(trajectory, head, chosen, smoothing, dtype, device, backend)
        group_of = {name: manifest.head.param_groups[name] for name in chosen}

        def final() -> dict[str, torch.Tensor]:
            return run.head_parameters_at(run.num_steps)
    else:
        if train_dataset is None and states is None:
            raise AccInfError(
                f"The scope {list(scope.patterns)} reaches outside the recorded head '{head_name}': its curvature "
                "runs the whole model on each step's rows, so pass the training dataset (and its collator)."
            )
        # The memory budget is shared: half for the replay's cache of states, half for the model backend's blocks.
        share = None if memory_budget is None else int(memory_budget) // 2
        if states is None:
            states = default_states(run, train_dataset, collate_fn, model, share, replay_tolerance, device)
            if torch.device(device).type == "cuda":  # the TF32 flags decide nothing elsewhere
                states = RecordedPrecision(states, manifest.numerics)
        scope, gauge = without_gauge(scope, states)
        names = list(scope.parameters)
        if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
            logger.warning("The model has dropout; the model backend runs it in eval mode (no dropout), so the "
                           "linearization is around a trajectory without the training masks (train with dropout off "
                           "for fidelity, or replay the masks).")
        curvature = ModelCurvature(trajectory, model, names, states, smoothing, dtype, device, per_row=per_row,
                                   **({} if share is None else {"memory_budget": share}))
        group_of = parameter_groups(run, model, names)

        def final() -> dict[str, torch.Tensor]:
            return run.load_checkpoint(run.num_steps)
    optimizer = OptimizerSpec(
        name=manifest.optimizer_class, groups=manifest.param_groups, group_of=group_of,
        max_grad_norm=manifest.training.max_grad_norm,
    )
    return InfluenceProblem(trajectory, curvature, optimizer, manifest.dataset.length, scope, final, gauge)
