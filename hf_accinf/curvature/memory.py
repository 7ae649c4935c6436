"""Working-memory plans for the model backend's batched derivatives (DESIGN.md section 6b).

Every batched quantity of :mod:`hf_accinf.curvature.model` is computed over blocks of ``rows`` of one
micro-batch and, for products with several vectors, ``vectors`` at a time (a vmap chunk). A block's
working memory is modelled as

    fixed + rows * per_row + vectors * per_vector + vectors * rows * per_pair

in bytes, from two measured sizes: ``a``, the bytes autograd saves for the backward pass of one row
(:func:`saved_bytes`, counted by ``saved_tensors_hooks`` on a one-row forward), and ``p``, the bytes
of one vector of the scope. :class:`BlockCost` holds the coefficients of one kind of quantity and
:func:`plan_block` picks the largest block that fits the budget, all rows of the micro-batch first.
The coefficients are upper bounds read off the transforms (a vmapped gradient holds the per-row
gradients in parameter shapes; forward-over-reverse saves the primal and tangent activations); on a
MiniLM-shaped BERT (float32, 16 x 64 tokens, budget 2 GiB) one step's batch gradient, per-row gradients,
HVP and loss tangents peaked at 3.0 GB RSS, of which 1.45 GB is the (16, P) per-row result itself
(``scripts/bench_model_step.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..errors import AccInfError


@dataclass(frozen=True)
class BlockCost:
    """Coefficients, in units of ``a`` (activations of one row) and ``p`` (one scope vector)."""

    what: str
    fixed_p: float = 0.0
    row_a: float = 0.0
    row_p: float = 0.0
    vector_p: float = 0.0
    pair_a: float = 0.0

    def bytes(self, rows: int, vectors: int, a: int, p: int) -> float:
        return (self.fixed_p * p + rows * (self.row_a * a + self.row_p * p) + vectors * self.vector_p * p
                + vectors * rows * self.pair_a * a)


# Batch gradient over a block: activations and their backward transients, the gradient and its accumulator.
BATCH_GRAD = BlockCost("the batch gradient", fixed_p=3, row_a=2)
# vmap(grad) over rows: activations per row, per-row gradients in parameter shapes, and a staging block
# where the rows asked for are not contiguous in the result.
ROW_GRADS = BlockCost("per-row gradients", row_a=2, row_p=2)
# vmap over rows of forward-over-reverse: primal and tangent activations and their transients, 5 vectors a row.
ROW_HVP = BlockCost("per-row Hessian-vector products", row_a=4, row_p=5)
# Forward-mode directional derivatives of the rows' losses: one tangent of the scope, transient activations.
ROW_TANGENTS = BlockCost("per-row loss tangents", fixed_p=2, row_a=2)
# vmap over vectors of forward-over-reverse on a block: shared primal activations, tangent activations per pair.
BATCH_HVP = BlockCost("Hessian-vector products", row_a=1, vector_p=4, pair_a=3)
# vmap over one-hot loss weights on a block: shared forward, one backward per weight vector.
WEIGHTED_GRADS = BlockCost("per-row gradients by loss weights", row_a=1, vector_p=3, pair_a=2)
WEIGHTED_HVP = BlockCost("per-row Hessian-vector products by loss weights", row_a=1, vector_p=5, pair_a=4)
# Losses at shifted parameters: forward only, one shifted copy of the scope per vector.
SHIFTED_LOSSES = BlockCost("shifted losses", row_a=1, vector_p=2, pair_a=1)


def saved_bytes(forward: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while ``forward()`` runs, leaving out ``exclude``'s
    storages (the parameters: saved by reference, not copied)."""
    seen = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return total


def plan_block(cost: BlockCost, rows: int, vectors: int, a: int, p: int, budget: int,
               vector_cap: int | None = None) -> tuple[int, int]:
    """``(rows per block, vectors per chunk)`` for ``rows`` rows and ``vectors`` vectors (1 when the quantity
    has no vector dimension) within ``budget`` bytes: all rows if one vector fits with them, then as many
    vectors as fit; else fewer rows with one vector. Refuses when one row with one vector does not fit."""
    vectors = max(1, min(vectors, vector_cap or vectors))
    for block in range(rows, 0, -1):
        room = budget - cost.bytes(block, 0, a, p)
        per_vector = cost.vector_p * p + block * cost.pair_a * a
        fits = vectors if per_vector <= 0 else int(room // per_vector)
        if room >= 0 and fits >= 1:
            return block, min(vectors, fits)
    need = cost.bytes(1, 1, a, p)
    raise AccInfError(f"memory_budget={budget} bytes cannot hold {cost.what} of one row (about {int(need)} bytes "
                      f"for a scope of {p} bytes): raise --memory_budget_gb or choose a smaller scope.")
