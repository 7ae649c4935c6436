"""Closed-form curvature of an ``nn.Linear`` head under cross-entropy (DESIGN.md section 6).

With augmented inputs ``ã_r`` (the input, plus a 1 when the bias is chosen) and chosen parameters
``Θ`` (C x d̃), row ``r`` has ``g_r = (p_r - t_r) ã_r^T`` and ``H_r X = Λ_r (X ã_r) ã_r^T`` with
``Λ_r = diag(p_r) - p_r p_r^T``: the Gauss-Newton form, exact for a linear head. Since ``Λ_r 1 = 0``,
``H_B X`` for K vectors works in the ``C - 1`` centred class directions ``Q``: two GEMMs and a small
per-row ``(C-1) x (C-1)`` mixing, ``O(K b (C-1) d)`` (half the flops of the naive form for binary
heads), no per-sample loop. Vectors are laid out as ``Θ`` flattened row-major.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..losses import cross_entropy_rows, mean_weights, target_distribution
from ..trajectory import Trajectory
from .base import BatchCurvature, HeadCurvature


SMALL_CLASS_COUNT = 8


@functools.lru_cache(maxsize=None)
def _host_basis(classes: int) -> tuple[tuple[float, ...], ...]:
    """``Q`` on the host, as numbers: the few-class axpys read their coefficients without touching a device."""
    full = torch.linalg.qr(torch.cat([torch.ones(classes, 1), torch.eye(classes)[:, : classes - 1]], 1).double())[0]
    return tuple(tuple(row) for row in full[:, 1:].tolist())


@functools.lru_cache(maxsize=None)
def _centered_basis(classes: int, dtype, device) -> torch.Tensor:
    """Orthonormal basis ``Q`` (C x C-1) of the vectors orthogonal to all-ones: ``Λ_r = Q (Q^T Λ_r Q) Q^T``;
    made once per device (no copy to the device at every step)."""
    return torch.tensor(_host_basis(classes), dtype=dtype, device=device)


class LinearBatch(BatchCurvature):
    def __init__(self, inputs: torch.Tensor, probs: torch.Tensor, residual: torch.Tensor, row_weight: torch.Tensor):
        self.inputs = inputs  # (b, d̃)
        self.probs = probs  # (b, C)
        self.residual = residual  # (b, C)
        self.row_weight = row_weight  # (b,)
        self.num_classes = probs.shape[1]
        self.batch_grad = ((row_weight[:, None] * residual).T @ inputs).flatten()
        # Λ_r 1 = 0 (softmax), so H_B acts through the C-1 centred directions only: C/(C-1) fewer flops.
        self.basis = _centered_basis(self.num_classes, inputs.dtype, inputs.device)  # (C, q)
        self.host_basis = _host_basis(self.num_classes)
        reduced_probs = probs @ self.basis  # (b, q)
        reduced = torch.einsum("cq,bc,cr->bqr", self.basis, probs, self.basis) - reduced_probs[:, :, None] * reduced_probs[:, None, :]
        self._mixing = (row_weight[:, None, None] * reduced).permute(1, 2, 0).contiguous()  # (q, q, b): w_r Q^T Λ_r Q

    def _to_centred(self, vectors: torch.Tensor) -> torch.Tensor:
        """``Q^T X`` per vector: (K, q, d̃). Few classes: axpys over classes (one pass each), else a matmul."""
        grid = vectors.reshape(len(vectors), self.num_classes, -1)
        if self.num_classes > SMALL_CLASS_COUNT:
            return torch.matmul(self.basis.T, grid)
        centred = []
        basis = self.host_basis
        for q in range(len(basis[0])):
            column = grid[:, 0] * basis[0][q]
            for c in range(1, self.num_classes):
                column.add_(grid[:, c], alpha=basis[c][q])
            centred.append(column)
        return centred[0][:, None] if len(centred) == 1 else torch.stack(centred, 1)

    def _from_centred(self, centred: torch.Tensor, base: torch.Tensor | None, scale: float) -> torch.Tensor:
        """``base + scale Q Y`` for centred products ``Y`` (K, q, d̃), as (K, P)."""
        count = len(centred)
        if self.num_classes > SMALL_CLASS_COUNT:
            product = torch.matmul(self.basis, centred).view(count, -1)
            return product.mul_(scale) if base is None else torch.add(base, product, alpha=scale)
        out = torch.zeros(count, self.num_classes, centred.shape[2], dtype=centred.dtype, device=centred.device) \
            if base is None else base.reshape(count, self.num_classes, -1).clone()
        for c in range(self.num_classes):
            for q in range(len(self.host_basis[0])):
                out[:, c].add_(centred[:, q], alpha=scale * self.host_basis[c][q])
        return out.view(count, -1)

    def _reduced_product(self, vectors: torch.Tensor) -> torch.Tensor:
        """``Q^T H_B X`` in the centred coordinates: (K, q, d̃)."""
        count, width, rows = vectors.shape[0], self.inputs.shape[1], self.inputs.shape[0]
        centred = self._to_centred(vectors)
        projected = (centred.reshape(-1, width) @ self.inputs.T).view(count, -1, rows)  # (K, q, b)
        if self._mixing.shape[0] == 1:
            mixed = projected * self._mixing[0]
        else:
            mixed = torch.einsum("qrb,krb->kqb", self._mixing, projected)
        return (mixed.reshape(-1, rows) @ self.inputs).view(count, -1, width)

    def hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        return self._from_centred(self._reduced_product(vectors), None, 1.0)

    def hvp_add(self, vectors: torch.Tensor, base: torch.Tensor | None, scale: float) -> torch.Tensor:
        return self._from_centred(self._reduced_product(vectors), base, scale)

    def restrict(self, rows: torch.Tensor) -> "LinearBatch":
        kept = torch.zeros_like(self.row_weight)
        kept[rows] = self.row_weight[rows]
        return LinearBatch(self.inputs, self.probs, self.residual, kept)

    def row_grads(self, rows: torch.Tensor) -> torch.Tensor:
        return (self.residual[rows][:, :, None] * self.inputs[rows][:, None, :]).flatten(1)

    def row_loss_tangents(self, vector: torch.Tensor) -> torch.Tensor:
        """``g_r . V = (p_r - t_r) . (V ã_r)``: one (b, d̃) x (d̃, C) product."""
        return ((self.inputs @ vector.reshape(self.num_classes, -1).T) * self.residual).sum(1)

    def row_hvp(self, vectors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        inputs, probs = self.inputs[rows], self.probs[rows]
        projected = torch.einsum("mcd,md->mc", vectors.reshape(len(rows), self.num_classes, -1), inputs)
        mixed = probs * (projected - (probs * projected).sum(1, keepdim=True))
        return (mixed[:, :, None] * inputs[:, None, :]).flatten(1)


class LinearHeadCurvature(HeadCurvature):
    """``head`` is an ``nn.Linear``; ``chosen`` a non-empty subset of ``("weight", "bias")``."""

    def __init__(self, trajectory: Trajectory, head: nn.Linear, chosen: list[str], label_smoothing: float = 0.0,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"):
        if not set(chosen) <= {"weight", "bias"} or not chosen:
            raise ValueError(f"chosen must be a subset of ('weight', 'bias'), got {chosen}")
        self.trajectory, self.chosen = trajectory, list(chosen)
        self.label_smoothing, self.dtype, self.device = label_smoothing, dtype, torch.device(device)
        self.num_classes, self.in_features = head.out_features, head.in_features
        self.has_bias = head.bias is not None
        self.width = self.in_features * ("weight" in chosen) + ("bias" in chosen)
        self.dim = self.num_classes * self.width
        self._inputs = trajectory.head_input.to(self.device, dtype).flatten(1)
        self._labels = trajectory.labels.to(self.device)
        self._weights = trajectory.row_weight.to(self.device, dtype)
        # Each step's recorded parameters on the device once (on the CPU: the trajectory's own tensors).
        self._step_params = {name: values.to(self.device) for name, values in trajectory.params.items()}

    def _augment(self, inputs: torch.Tensor) -> torch.Tensor:
        parts = []
        if "weight" in self.chosen:
            parts.append(inputs)
        if "bias" in self.chosen:
            parts.append(torch.ones(len(inputs), 1, dtype=inputs.dtype, device=inputs.device))
        return torch.cat(parts, 1)

    def _logits(self, params: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        logits = inputs @ params["weight"].to(self.device, self.dtype).T
        if self.has_bias:
            logits = logits + params["bias"].to(self.device, self.dtype)
        return logits

    def _batch(self, params, inputs, labels, weights) -> LinearBatch:
        probs = torch.softmax(self._logits(params, inputs), dim=-1)
        residual = probs - target_distribution(labels, self.num_classes, self.label_smoothing, self.dtype)
        kept = (labels >= 0)[:, None]  # rows the loss ignores: no gradient, no curvature
        residual, probs = residual.where(kept, 0.0), probs.where(kept, 0.0)
        return LinearBatch(self._augment(inputs), probs, residual, weights)

    def at_step(self, step: int) -> LinearBatch:
        rows = self.trajectory.rows_of(step)
        params = {name: values[step] for name, values in self._step_params.items()}
        return self._batch(params, self._inputs[rows], self._labels[rows], self._weights[rows])

    def expand(self, per_parameter: dict[str, float]) -> torch.Tensor:
        values = []
        if "weight" in self.chosen:
            values.append(torch.full((self.in_features,), float(per_parameter["weight"]), dtype=self.dtype))
        if "bias" in self.chosen:
            values.append(torch.tensor([float(per_parameter["bias"])], dtype=self.dtype))
        return torch.cat(values).repeat(self.num_classes).to(self.device, self.dtype)

    def unflatten(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        grid = vectors.reshape(*vectors.shape[:-1], self.num_classes, self.width)
        named = {}
        if "weight" in self.chosen:
            named["weight"] = grid[..., : self.in_features]
        if "bias" in self.chosen:
            named["bias"] = grid[..., -1]
        return named

    def example_grads(self, params, inputs, labels) -> torch.Tensor:
        inputs = inputs.to(self.device, self.dtype).flatten(1)
        weights = torch.ones(len(inputs), dtype=self.dtype, device=self.device)
        batch = self._batch(params, inputs, labels.to(self.device), weights)
        return batch.row_grads(torch.arange(len(inputs), device=self.device))

    def objective_grad(self, params, inputs, labels) -> torch.Tensor:
        inputs = inputs.to(self.device, self.dtype).flatten(1)
        return self._batch(params, inputs, labels.to(self.device), mean_weights(labels, self.dtype, self.device)).batch_grad

    def shifted_losses(self, params, shifts, inputs, labels) -> torch.Tensor:
        inputs = inputs.to(self.device, self.dtype).flatten(1)
        base = self._logits(params, inputs)  # (V, C)
        moved = torch.einsum("kcd,vd->kvc", shifts.reshape(len(shifts), self.num_classes, self.width), self._augment(inputs))
        target = target_distribution(labels.to(self.device), self.num_classes, self.label_smoothing, self.dtype)
        return cross_entropy_rows(base + moved, target) @ mean_weights(labels, self.dtype, self.device)
