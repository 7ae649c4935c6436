"""Curvature of any scope by running the whole model functionally (DESIGN.md section 6b).

At step ``t`` the whole model is called with ``torch.func.functional_call`` at ``theta_t`` (every
parameter, from a :class:`TrajectoryStates` provider) on the step's real batch (the recorded rows,
collated from the training dataset, with the recorded labels and per-row loss weights and the
manifest's label smoothing); derivatives are taken only with respect to the scope, the other
parameters stay at their values of the step. ``H_B X`` is ``vmap`` over the K vectors of
forward-over-reverse ``jvp(grad(L_B))``, in chunks of :attr:`ModelCurvature.vector_chunk` vectors.

Per-row gradients and per-row ``H_r x_r`` come from one of two equivalent paths:

* ``vmap``: vmap over rows, each row run as a batch of one;
* ``weights``: vmap over one-hot per-row loss weights ``e_r``, ``g_r = grad(e_r . l)``: the forward is
  run once unbatched, the backward batched. It works for models whose forward cannot be vmapped over
  single rows (BERT's attention-mask code branches on the mask's values).

``per_row="auto"`` tries ``vmap`` once and falls back to ``weights`` for good if the model refuses.

Conventions: offline passes run the model in **eval mode** (no dropout) with eager attention (the fused
SDPA kernels have no forward-mode derivative); the fidelity recipes train
with dropout off, so the linearization is around the steps that really happened. float64 works on a
cast copy of the model. Vectors are the scope's parameters flattened and concatenated in the model's
``named_parameters`` order; :meth:`ModelCurvature.unflatten` names them with full parameter names.
"""

from __future__ import annotations

import copy
import logging
from typing import Protocol

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from ..losses import cross_entropy_rows, mean_weights, target_distribution
from ..trajectory import Trajectory
from .base import BatchCurvature, FlatLayout, HeadCurvature

logger = logging.getLogger(__name__)

PER_ROW_MODES = ("auto", "vmap", "weights")


class TrajectoryStates(Protocol):
    """What the model backend needs of a run at every step (implemented by replay, or by a run
    checkpointed at every step)."""

    def parameters_at(self, step: int) -> dict[str, torch.Tensor]:
        """Every model parameter before step ``step`` (``state_dict`` names)."""

    def batch_inputs(self, step: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """The step's model inputs as collated micro-batches (no labels), each with the positions of its
        rows among the step's recorded rows (``trajectory.rows_of(step)``)."""

    # Optional, for optimizer rules that read their state (Adam): ``optimizer_state_at(step)`` mapping
    # ``"<parameter>.<state key>"`` to the state before step ``step`` (the trajectory's naming).


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output.logits if hasattr(output, "logits") else output[0]


class _Micro:
    """One micro-batch: model inputs, target distributions and loss weights of its rows."""

    def __init__(self, inputs: dict[str, torch.Tensor], targets: torch.Tensor, weights: torch.Tensor):
        self.inputs, self.targets, self.weights = inputs, targets, weights


class ModelBatch(BatchCurvature):
    def __init__(self, owner: "ModelCurvature", params: dict[str, torch.Tensor], micros: list[_Micro],
                 positions: list[torch.Tensor]):
        self.owner, self.micros = owner, micros
        self.fixed = {name: value for name, value in params.items() if name not in owner.chosen_set}
        self.point = owner.flatten({name: params[name] for name in owner.chosen})
        size = sum(len(p) for p in positions)
        self.micro_of = torch.empty(size, dtype=torch.long)
        self.local = torch.empty(size, dtype=torch.long)
        for index, where in enumerate(positions):
            self.micro_of[where] = index
            self.local[where] = torch.arange(len(where))
        self.row_weight = torch.empty(size, dtype=owner.dtype, device=owner.device)
        for micro, where in zip(micros, positions):
            self.row_weight[where.to(owner.device)] = micro.weights
        self.batch_grad = grad(self._batch_loss)(self.point)

    def _losses(self, flat: torch.Tensor, inputs: dict, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy_rows(self.owner.logits(flat, self.fixed, inputs), targets)

    def _batch_loss(self, flat: torch.Tensor) -> torch.Tensor:
        return sum((micro.weights * self._losses(flat, micro.inputs, micro.targets)).sum() for micro in self.micros)

    def hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        gradient = grad(self._batch_loss)
        return vmap(lambda v: jvp(gradient, (self.point,), (v,))[1], chunk_size=self.owner.vector_chunk)(vectors)

    def _per_micro(self, rows: torch.Tensor, compute, width: int, vectors: torch.Tensor | None = None) -> torch.Tensor:
        """Scatter ``compute(micro, local rows, vectors of those rows)`` over the micro-batches holding ``rows``."""
        rows = rows.cpu()
        out = torch.empty(len(rows), width, dtype=self.owner.dtype, device=self.owner.device)
        owners = self.micro_of[rows]
        for index in owners.unique().tolist():
            selected = (owners == index).nonzero().flatten()
            local = self.local[rows[selected]].to(self.owner.device)
            chunk = None if vectors is None else vectors[selected.to(vectors.device)]
            out[selected.to(out.device)] = compute(self.micros[index], local, chunk)
        return out

    def _dispatch(self, rows: torch.Tensor, vectors: torch.Tensor | None) -> torch.Tensor:
        owner = self.owner
        if owner.per_row == "auto":
            try:
                result = self._per_micro(rows, self._rows_vmap, owner.dim, vectors)
                owner.per_row = "vmap"
                return result
            except Exception as error:  # noqa: BLE001 - any refusal of vmap means: use per-row weights
                logger.info("per-row quantities by per-row loss weights (%s cannot be vmapped over rows: %s)",
                            type(owner.model).__name__, str(error).splitlines()[0][:200])
                owner.per_row = "weights"
        compute = self._rows_vmap if owner.per_row == "vmap" else self._rows_weights
        return self._per_micro(rows, compute, owner.dim, vectors)

    def _rows_vmap(self, micro: _Micro, local: torch.Tensor, vectors: torch.Tensor | None) -> torch.Tensor:
        inputs = {key: value[local] for key, value in micro.inputs.items()}

        def row_loss(flat, row_inputs, target):
            return self._losses(flat, {key: value[None] for key, value in row_inputs.items()}, target[None])[0]

        if vectors is None:
            return vmap(grad(row_loss), in_dims=(None, 0, 0))(self.point, inputs, micro.targets[local])

        def one(v, row_inputs, target):
            return jvp(lambda flat: grad(row_loss)(flat, row_inputs, target), (self.point,), (v,))[1]

        return vmap(one, chunk_size=self.owner.vector_chunk)(vectors, inputs, micro.targets[local])

    def _rows_weights(self, micro: _Micro, local: torch.Tensor, vectors: torch.Tensor | None) -> torch.Tensor:
        one_hot = nn.functional.one_hot(local, len(micro.targets)).to(self.owner.dtype)

        def weighted(flat, weights):
            return (weights * self._losses(flat, micro.inputs, micro.targets)).sum()

        if vectors is None:
            return vmap(grad(weighted), in_dims=(None, 0), chunk_size=self.owner.vector_chunk)(self.point, one_hot)

        def one(v, weights):
            return jvp(lambda flat: grad(weighted)(flat, weights), (self.point,), (v,))[1]

        return vmap(one, chunk_size=self.owner.vector_chunk)(vectors, one_hot)

    def row_grads(self, rows: torch.Tensor) -> torch.Tensor:
        return self._dispatch(rows, None)

    def row_hvp(self, vectors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self._dispatch(rows, vectors)


class ModelCurvature(FlatLayout, HeadCurvature):
    """The model backend. ``scope``: full parameter names; ``states``: ``theta_t`` and the step's inputs
    (may be ``None`` when only the objective side is used: ``objective_grad``, ``example_grads``)."""

    def __init__(self, trajectory: Trajectory | None, model: nn.Module, scope: list[str] | tuple[str, ...],
                 states: TrajectoryStates | None, label_smoothing: float = 0.0, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu", per_row: str = "auto", vector_chunk: int = 64):
        if per_row not in PER_ROW_MODES:
            raise ValueError(f"per_row must be one of {PER_ROW_MODES}, got {per_row}")
        self.trajectory, self.states = trajectory, states
        self.label_smoothing, self.dtype, self.device = label_smoothing, dtype, torch.device(device)
        self.per_row, self.vector_chunk = per_row, vector_chunk
        self.model = copy.deepcopy(model).to(self.device, dtype).eval()
        if hasattr(self.model, "set_attn_implementation"):
            # Fused SDPA kernels have no forward-mode AD; eager attention is the same function.
            self.model.set_attn_implementation("eager")
        shapes = {name: p.shape for name, p in self.model.named_parameters()}
        missing = [name for name in scope if name not in shapes]
        if missing:
            raise ValueError(f"scope names {missing[:5]} are not parameters of {type(model).__name__}")
        self.chosen = [name for name in shapes if name in set(scope)]
        self.chosen_set = set(self.chosen)
        self.shapes = {name: shapes[name] for name in self.chosen}
        self.sizes = [int(torch.Size(shape).numel()) for shape in self.shapes.values()]
        self.dim = sum(self.sizes)
        self._names = set(shapes) | {name for name, _ in self.model.named_buffers()}
        self.num_classes = int(getattr(getattr(model, "config", None), "num_labels", 0) or 0)
        if trajectory is not None:
            self._labels = trajectory.labels.to(self.device)
            self._weights = trajectory.row_weight.to(self.device, dtype)

    def logits(self, flat: torch.Tensor, fixed: dict, inputs: dict) -> torch.Tensor:
        return _logits(functional_call(self.model, {**fixed, **self.unflatten(flat)}, (), inputs))

    def _cast_params(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
                for name, value in params.items() if name in self._names}

    def _cast_inputs(self, inputs: dict) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
                for key, value in inputs.items() if isinstance(value, torch.Tensor) and key != "labels"}

    def _targets(self, labels: torch.Tensor, params: dict, inputs: dict) -> torch.Tensor:
        if not self.num_classes:
            with torch.no_grad():
                self.num_classes = _logits(functional_call(self.model, params, (), inputs)).shape[-1]
        return target_distribution(labels.to(self.device), self.num_classes, self.label_smoothing, self.dtype)

    def _batch(self, params: dict, batches: list[tuple[dict, torch.Tensor]], labels: torch.Tensor,
               weights: torch.Tensor) -> ModelBatch:
        params = self._cast_params(params)
        micros, positions = [], []
        for inputs, where in batches:
            where = torch.as_tensor(where, dtype=torch.long)
            inputs = self._cast_inputs(inputs)
            micros.append(_Micro(inputs, self._targets(labels[where.to(labels.device)], params, inputs),
                                 weights[where.to(weights.device)]))
            positions.append(where.cpu())
        return ModelBatch(self, params, micros, positions)

    def at_step(self, step: int) -> ModelBatch:
        rows = self.trajectory.rows_of(step)
        return self._batch(self.states.parameters_at(step), self.states.batch_inputs(step),
                           self._labels[rows], self._weights[rows])

    # The objective side: ``inputs`` is a list of collated model-input batches, ``labels`` their labels.

    def evaluation_inputs(self, model: nn.Module, head_name: str, dataset, collate_fn=None, tokenizer=None,
                          batch_size: int = 64):
        from torch.utils.data import DataLoader

        from ..data.features import eval_collator
        from ..errors import AccInfError

        batches, labels = [], []
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=eval_collator(model, tokenizer, collate_fn)):
            if "labels" not in batch:
                raise AccInfError("The evaluation dataset needs a label column ('label', 'label_ids' or 'labels') "
                                  "to define its loss.")
            labels.append(batch.pop("labels").cpu())
            batches.append({key: value for key, value in batch.items() if isinstance(value, torch.Tensor)})
        return batches, torch.cat(labels)

    def parameters_at(self, step: int) -> dict[str, torch.Tensor]:
        return self.states.parameters_at(step)

    def optimizer_state(self, step: int, key: str) -> torch.Tensor:
        """The scope's optimizer state ``key`` before ``step`` from the provider (replay), in this layout."""
        if key == "param":
            return self.flatten(self.states.parameters_at(step))
        if not hasattr(self.states, "optimizer_state_at"):
            from ..errors import AccInfError

            raise AccInfError("This method needs the optimizer state of the scope at every step: score a run "
                              "recorded by this version of hf_accinf (replay restores it from the checkpoints).")
        state = self.states.optimizer_state_at(step)
        return self.flatten({name: state.get(name, {}).get(key, torch.zeros(self.shapes[name])) for name in self.chosen})

    def _eval_batch(self, params, inputs: list[dict], labels: torch.Tensor, weights: torch.Tensor) -> ModelBatch:
        bounds = torch.tensor([0] + [len(next(iter(b.values()))) for b in inputs]).cumsum(0)
        batches = [(batch, torch.arange(int(lo), int(hi))) for batch, lo, hi in zip(inputs, bounds[:-1], bounds[1:])]
        return self._batch(params, batches, labels.to(self.device), weights)

    def example_grads(self, params, inputs, labels) -> torch.Tensor:
        weights = torch.ones(len(labels), dtype=self.dtype, device=self.device)
        batch = self._eval_batch(params, inputs, labels, weights)
        return batch.row_grads(torch.arange(len(labels)))

    def objective_grad(self, params, inputs, labels) -> torch.Tensor:
        return self._eval_batch(params, inputs, labels, mean_weights(labels, self.dtype, self.device)).batch_grad

    def shifted_losses(self, params, shifts, inputs, labels) -> torch.Tensor:
        batch = self._eval_batch(params, inputs, labels, mean_weights(labels, self.dtype, self.device))
        return vmap(lambda shift: batch._batch_loss(batch.point + shift), chunk_size=self.vector_chunk)(shifts)
