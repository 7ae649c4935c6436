"""Curvature of any head module by ``torch.func`` (DESIGN.md section 6: vmapped forward-over-reverse HVPs).

The head is called functionally on the recorded inputs with the recorded parameters of the step;
chosen parameters are the differentiated ones, the others stay at their recorded values. Per-row
gradients are ``vmap(grad)``, ``H_B X`` is ``vmap`` over the K vectors of ``jvp(grad(L_B))``, and
``H_r x_r`` is ``vmap`` over rows of ``jvp(grad(l_r))``. Vectors are the chosen parameters flattened
and concatenated in the head's parameter order.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from ..losses import cross_entropy_rows, mean_weights, target_distribution
from ..trajectory import Trajectory
from .base import BatchCurvature, FlatLayout, HeadCurvature


class FunctionalBatch(BatchCurvature):
    def __init__(self, owner: "FunctionalHeadCurvature", params: dict, inputs, targets, row_weight):
        self.owner, self.inputs, self.targets, self.row_weight = owner, inputs, targets, row_weight
        self.fixed = {name: value for name, value in params.items() if name not in owner.chosen}
        self.point = owner.flatten({name: params[name] for name in owner.chosen})
        self.batch_grad = grad(self._batch_loss)(self.point)

    def _row_loss(self, flat, inputs, target):
        logits = self.owner.logits(flat, self.fixed, inputs[None])
        return cross_entropy_rows(logits, target[None])[0]

    def _batch_loss(self, flat):
        logits = self.owner.logits(flat, self.fixed, self.inputs)
        return (self.row_weight * cross_entropy_rows(logits, self.targets)).sum()

    def hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        gradient = grad(self._batch_loss)
        return vmap(lambda v: jvp(gradient, (self.point,), (v,))[1])(vectors)

    def restrict(self, rows: torch.Tensor) -> "FunctionalBatch":
        kept = torch.zeros_like(self.row_weight)
        kept[rows] = self.row_weight[rows]
        params = {**self.fixed, **self.owner.unflatten(self.point)}
        return FunctionalBatch(self.owner, params, self.inputs, self.targets, kept)

    def row_grads(self, rows: torch.Tensor) -> torch.Tensor:
        return vmap(grad(self._row_loss), in_dims=(None, 0, 0))(self.point, self.inputs[rows], self.targets[rows])

    def row_loss_tangents(self, vector: torch.Tensor) -> torch.Tensor:
        def losses(flat):
            return cross_entropy_rows(self.owner.logits(flat, self.fixed, self.inputs), self.targets)

        return jvp(losses, (self.point,), (vector,))[1]

    def row_hvp(self, vectors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        def one(v, inputs, target):
            return jvp(lambda flat: grad(self._row_loss)(flat, inputs, target), (self.point,), (v,))[1]

        return vmap(one)(vectors, self.inputs[rows], self.targets[rows])


class FunctionalHeadCurvature(FlatLayout, HeadCurvature):
    def __init__(self, trajectory: Trajectory, head: nn.Module, chosen: list[str], label_smoothing: float = 0.0,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"):
        self.trajectory, self.chosen = trajectory, list(chosen)
        self.label_smoothing, self.dtype, self.device = label_smoothing, dtype, torch.device(device)
        self.head = copy.deepcopy(head).to(self.device, dtype).eval()
        shapes = {name: p.shape for name, p in self.head.named_parameters()}
        self.shapes = {name: shapes[name] for name in self.chosen}
        self.sizes = [int(torch.Size(shape).numel()) for shape in self.shapes.values()]
        self.dim = sum(self.sizes)
        self._inputs = trajectory.head_input.to(self.device, dtype)
        self._labels = trajectory.labels.to(self.device)
        self._weights = trajectory.row_weight.to(self.device, dtype)
        # Each step's recorded parameters on the device once (on the CPU: the trajectory's own tensors).
        self._step_params = {name: values.to(self.device) for name, values in trajectory.params.items()}

    def logits(self, flat: torch.Tensor, fixed: dict, inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(self.head, {**fixed, **self.unflatten(flat)}, (inputs,))

    def _targets(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        return target_distribution(labels, num_classes, self.label_smoothing, self.dtype)

    def _batch(self, params, inputs, labels, weights) -> FunctionalBatch:
        params = {name: value.to(self.device, self.dtype) for name, value in params.items()}
        with torch.no_grad():
            num_classes = functional_call(self.head, params, (inputs[:1],)).shape[-1]
        return FunctionalBatch(self, params, inputs, self._targets(labels, num_classes), weights)

    def at_step(self, step: int) -> FunctionalBatch:
        rows = self.trajectory.rows_of(step)
        params = {name: values[step] for name, values in self._step_params.items()}
        return self._batch(params, self._inputs[rows], self._labels[rows], self._weights[rows])

    def example_grads(self, params, inputs, labels) -> torch.Tensor:
        inputs = inputs.to(self.device, self.dtype)
        weights = torch.ones(len(inputs), dtype=self.dtype, device=self.device)
        batch = self._batch(params, inputs, labels.to(self.device), weights)
        return batch.row_grads(torch.arange(len(inputs), device=self.device))

    def objective_grad(self, params, inputs, labels) -> torch.Tensor:
        inputs = inputs.to(self.device, self.dtype)
        return self._batch(params, inputs, labels.to(self.device), mean_weights(labels, self.dtype, self.device)).batch_grad

    def shifted_losses(self, params, shifts, inputs, labels) -> torch.Tensor:
        params = {name: value.to(self.device, self.dtype) for name, value in params.items()}
        inputs = inputs.to(self.device, self.dtype)
        fixed = {name: value for name, value in params.items() if name not in self.chosen}
        point = self.flatten({name: params[name] for name in self.chosen})
        with torch.no_grad():
            num_classes = functional_call(self.head, params, (inputs[:1],)).shape[-1]
        target = self._targets(labels.to(self.device), num_classes)
        weights = mean_weights(labels, self.dtype, self.device)
        return vmap(lambda shift: cross_entropy_rows(self.logits(point + shift, fixed, inputs), target) @ weights)(shifts)
