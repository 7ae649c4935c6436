"""Per-row loss tangents of the model backend: ``d/de l_r(theta + e v)`` for every row of a step, in one
forward-mode pass per micro-batch (no per-row gradients, no backward pass).

What the adjoint form's first-order injections and TracIn need (DESIGN.md section 3: ``u . J_w step (-e_j)
= -sum_r w_r (J_G f^T u) . g_r``). Kept apart from :mod:`.model` so that ``ModelBatch`` can take it as its
``row_loss_tangents``: ``ModelBatch.row_loss_tangents = model_row_loss_tangents``.
"""

from __future__ import annotations

import torch
from torch.func import jvp


def model_row_loss_tangents(batch, vector: torch.Tensor) -> torch.Tensor:
    """``g_r . v`` (b,) for the rows of a ``ModelBatch`` (its ``micros``, ``micro_of``, ``local``, ``point`` and
    ``_losses``), in the step's row order."""
    out = vector.new_empty(len(batch.row_weight))
    for index, micro in enumerate(batch.micros):
        where = (batch.micro_of == index).nonzero().flatten()
        _, tangents = jvp(lambda flat: batch._losses(flat, micro.inputs, micro.targets), (batch.point,), (vector,))
        out[where.to(out.device)] = tangents[batch.local[where].to(tangents.device)]
    return out
