"""Curvature approximations of a step's batch Hessian ``H_B`` for any scope (DESIGN.md sections 3 and 5).

DVEmb (section 5) replaces ``H_B = sum_r w_r H_r`` by the empirical Fisher
``F_B = sum_r w_r g_r g_r^T``; the Gauss-Newton form keeps each row's true output Hessian:

    GGN_B = sum_r w_r J_r^T Lam_r J_r,   Lam_r = diag(p_r) - p_r p_r^T     (cross-entropy, softmax p_r)

with ``J_r`` the Jacobian of row ``r``'s logits with respect to the scope. For a row fitted with
confidence, ``g_r = J_r^T (p_r - y_r)`` is small and so is ``F_B``'s share, while ``Lam_r`` keeps the
curvature the softmax still has; the two agree in expectation over labels drawn from ``p_r`` only.
Both are products with ``K`` vectors at once on a :class:`~hf_accinf.curvature.model.ModelBatch`: GGN as
a forward-mode ``J x`` and a reverse-mode ``J^T (.)`` of the model's logits (vmapped over the vectors),
the empirical Fisher from the rows' gradients. :func:`row_output_factors` gives each row's
``J_r^T L_r`` with ``L_r L_r^T = Lam_r`` (``C`` columns per row), the factors a projected recursion needs.
"""

from __future__ import annotations

import torch
from torch.func import jvp, vjp, vmap

CURVATURES = ("hessian", "ggn", "fisher")


def output_hessian_product(probs: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
    """``Lam_r t_r`` for the softmax cross-entropy: ``p * t - p (p . t)`` per row (..., C)."""
    scaled = probs * tangents
    return scaled - probs * scaled.sum(-1, keepdim=True)


def ggn_product(batch, vectors: torch.Tensor) -> torch.Tensor:
    """``GGN_B x`` for each row of ``vectors`` (K, P): a :class:`ModelBatch`'s rows, their recorded weights."""
    owner, total = batch.owner, torch.zeros_like(vectors)
    for micro in batch.micros:
        def logits(named, micro=micro):
            return owner.logits_named(named, batch.fixed, micro.inputs)

        values, pullback = vjp(logits, batch.named)
        probs = torch.softmax(values, dim=-1)

        def one(vector):
            tangent = jvp(logits, (batch.named,), (owner.unflatten(vector),))[1]
            return pullback(micro.weights[:, None] * output_hessian_product(probs, tangent))[0]

        batch._place(total, vmap(one)(vectors), accumulate=True)
    return total


def fisher_product(batch, vectors: torch.Tensor) -> torch.Tensor:
    """``F_B x = sum_r w_r g_r (g_r . x)`` for each row of ``vectors`` (K, P)."""
    rows = batch.row_grads(torch.arange(len(batch.row_weight)))
    return ((vectors @ rows.T) * batch.row_weight) @ rows


def row_output_factors(batch) -> torch.Tensor:
    """``(b, C, P)``: per row ``r`` the columns ``f_rc`` of ``J_r^T L_r``, ``L_r = diag(sqrt p_r) - p_r sqrt(p_r)^T``,
    so that ``L_r L_r^T = Lam_r`` and ``sum_c f_rc f_rc^T = J_r^T Lam_r J_r`` (the row's GGN, unweighted)."""
    owner = batch.owner
    blocks = []
    for micro in batch.micros:
        def logits(named, micro=micro):
            return owner.logits_named(named, batch.fixed, micro.inputs)

        values, pullback = vjp(logits, batch.named)
        probs = torch.softmax(values, dim=-1)
        root = probs.sqrt()
        classes = probs.shape[-1]
        # column c of row r: (diag(sqrt p) - sqrt p p^T)[:, c] as the output cotangent of that row only
        eye = torch.eye(classes, dtype=probs.dtype, device=probs.device)
        factor = root[:, :, None] * eye - probs[:, :, None] * root[:, None, :]  # (b, C, C): [r, i, c]
        cotangents = torch.zeros(classes, len(micro), len(micro), classes, dtype=probs.dtype, device=probs.device)
        index = torch.arange(len(micro))
        cotangents[:, index, index, :] = factor.permute(2, 0, 1)  # [c, r, r, i]
        out = torch.empty(classes * len(micro), owner.dim, dtype=probs.dtype, device=probs.device)
        batch._place(out, vmap(lambda cot: pullback(cot)[0])(cotangents.reshape(-1, len(micro), classes)))
        blocks.append((micro.where, out.view(classes, len(micro), owner.dim).transpose(0, 1)))
    result = torch.empty(len(batch.row_weight), blocks[0][1].shape[1], batch.owner.dim,
                         dtype=blocks[0][1].dtype, device=blocks[0][1].device)
    for where, values in blocks:
        result[where.to(result.device)] = values
    return result
