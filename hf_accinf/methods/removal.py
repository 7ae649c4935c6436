"""What every optimizer rule shares (DESIGN.md section 4): the clip map and the removal algebra.

**Clip map.** The HF Trainer clips the global gradient norm: ``a(G) = min(1, c / (n + CLIP_EPS))`` with
``n^2 = n_rest^2 + |G|^2``, ``G`` the chosen parameters' batch gradient and ``n_rest`` the recorded norm
of all other clipped gradients, held fixed (the approximation DESIGN.md section 4 names). Its Jacobian
is ``clip(G, e) = a(G) (e - G (G . e) / (n (n + CLIP_EPS)))`` where ``a < 1``, the identity times ``a``
elsewhere; it is symmetric, so the adjoint uses the same map.

**Removal.** A rule writes the gradient-dependent part of its step as ``f(G, E) -> (transition, update)``:
the tangent step of the states when the batch gradient is ``G`` and its tangent is ``E = H D``, and the
step's own output at ``G``. Removing sample ``j`` (rows ``r``, weights ``w_r``) moves
``G -> G - sum w_r g_r`` and ``E -> E - sum w_r H_r D``. With ACC coefficient ``c``:

* exact: ``c f_T(G_j, E_j) + (1 - c) f_T(G, E) + f_U(G_j) - f_U(G)``, i.e. ``J_s step(s; w^-j) D +
  step(s; w^-j) - step(s; w)`` (the classical twin keeps the recorded transition);
* first-order: ``f_T(G, E) + c d/de f_T + d/de f_U`` along the removal direction (one ``torch.func.jvp``):
  ``J_s step D + J_w step (-e_j) + c d/dw[J_s step D](-e_j)``, the full mixed derivative.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Callable

import torch
from torch.func import jvp, vjp

from ..curvature.base import BatchCurvature
from ..errors import AccInfError
from ..losses import CLIP_EPS, clip_coefficient
from ..options import REMOVALS, check_choice
from .base import StepOps

def check_removal(removal: str) -> None:
    check_choice("removal", removal, REMOVALS, AccInfError)


class ClipMap:
    """The clip map of one step: the batch gradient ``G`` of the chosen parameters, the rest of the norm fixed.

    It never applies ``H_B`` by itself: :meth:`curvature_term` puts the rank-one term on the vectors before
    (adjoint) or on the products after (forward) the one product with the batch curvature the step needs.
    """

    def __init__(self, batch: BatchCurvature | None, max_norm: float, recorded_norm: float,
                 gradient: torch.Tensor | None = None):
        self.batch, self.max_norm = batch, max_norm
        self.gradient = batch.batch_grad if gradient is None else gradient
        # ``a``, ``n`` and the rank-one weight stay device tensors (no host synchronisation in the step loop):
        # ``active`` is the host's decision to carry the rank-one term, whose weight is 0 on unclipped steps.
        self.active = bool(max_norm) and max_norm > 0
        if not self.active:
            self.rest, self.coef, self.projection = 0.0, 1.0, 0.0
            return
        squared = self.gradient @ self.gradient
        self.rest = (recorded_norm**2 - squared).clamp(min=0.0)
        # a and n as rows() computes them, so that shared step and occurrences agree.
        norm = (self.rest + squared).sqrt()
        finite = torch.isfinite(norm)  # clip_coefficient: no clipping of a norm that is not finite
        self.coef = torch.where(finite, (max_norm / (norm + CLIP_EPS)).clamp(max=1.0), 1.0)
        self.projection = torch.where(finite & (self.coef < 1.0), 1.0 / (norm * (norm + CLIP_EPS)), 0.0)

    @classmethod
    def of_gradient(cls, gradient: torch.Tensor, max_norm: float, recorded_norm: float) -> "ClipMap":
        """The Jacobian alone (:meth:`jacobian`, :meth:`rows`), for callers without a batch curvature."""
        return cls(None, max_norm, recorded_norm, gradient)

    @property
    def clipped_gradient(self) -> torch.Tensor:
        return self.coef * self.gradient

    def _rank_one(self, vectors: torch.Tensor) -> torch.Tensor:
        """``e - G (G . e) / (n (n + CLIP_EPS))`` for each row ``e`` (``e`` itself on unclipped steps)."""
        return torch.addr(vectors, (vectors @ self.gradient) * -self.projection, self.gradient)

    def jacobian(self, vectors: torch.Tensor) -> torch.Tensor:
        """``clip(G, e)`` for each row ``e`` of ``vectors`` (m, P): symmetric, so also its transpose."""
        if not self.active:
            return vectors
        return self.coef * self._rank_one(vectors)

    def rows(self, gradient: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-wise ``(clip(G, e), a(G) G)`` for gradients ``G`` and vectors ``e`` (m, P); differentiable."""
        if self.max_norm <= 0:
            return vectors, gradient
        norm = (self.rest + (gradient * gradient).sum(-1)).sqrt()
        clip = (self.max_norm / (norm + CLIP_EPS)).clamp(max=1.0)
        active = (clip < 1).to(norm.dtype)
        dots = (gradient * vectors).sum(-1) * active / (norm * (norm + CLIP_EPS))
        return clip[:, None] * (vectors - gradient * dots[:, None]), clip[:, None] * gradient

    def clipped(self, gradient: torch.Tensor) -> torch.Tensor:
        """Row-wise ``a(G) G`` for gradients ``G`` (m, P); differentiable."""
        if self.max_norm <= 0:
            return gradient
        norm = (self.rest + (gradient * gradient).sum(-1)).sqrt()
        return (self.max_norm / (norm + CLIP_EPS)).clamp(max=1.0)[:, None] * gradient

    def curvature_term(self, theta: torch.Tensor, base: torch.Tensor | None, scale: float,
                       transpose: bool = False) -> torch.Tensor:
        """``base + scale clip(G, H_B theta)`` (or ``base + scale H_B clip(G, theta)`` transposed), rows of ``theta``:
        one product with the batch curvature, the rank-one term on its result (forward) or on its input (adjoint)."""
        if not self.active:
            return self.batch.hvp_add(theta, base, scale)
        if transpose:  # H_B is linear: the device scalar a goes on its input, the host scale on its output
            return self.batch.hvp_add(self.coef * self._rank_one(theta), base, scale)
        product = self._rank_one(self.batch.hvp(theta)).mul_(scale * self.coef)
        return product if base is None else base.add(product)


INJECTION_BLOCK_BYTES = 2**28
"""Working memory of the exact injections' scores: samples are taken in blocks whose counterfactual steps
(``STEP_TEMPORARIES`` state-sized temporaries per sample) fit it. On a 22.7M-parameter model under Adam one
sample's step is 272 MB a temporary: all 16 rows of a step at once took over 20 GB."""
STEP_TEMPORARIES = 8


def removed_gradients(batch: BatchCurvature, row_owner: torch.Tensor, rows: torch.Tensor, count: int) -> torch.Tensor:
    """``sum_r w_r g_r`` per occurring sample (count, P), repeats counted: the removal direction of the gradient."""
    weights = batch.row_weight[rows][:, None]
    gradients = weights * batch.row_grads(rows)
    return gradients.new_zeros(count, gradients.shape[1]).index_add_(0, row_owner, gradients)


def removed_terms(batch: BatchCurvature, theta: torch.Tensor, row_owner: torch.Tensor, rows: torch.Tensor,
                  coefficient: torch.Tensor, accumulative: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per occurring sample: ``sum_r w_r g_r`` and, where ``c != 0``, ``sum_r w_r H_r theta`` (repeats counted).
    ``accumulative``: the registry's word on the rule (``False``: ``c = 0`` everywhere, the policy was checked;
    ``True``: every row's product, weighted by ``c != 0``, with no host synchronisation; ``None``: unknown, the
    rows with ``c != 0`` are looked up)."""
    weights = batch.row_weight[rows][:, None]
    removed_grad = removed_gradients(batch, row_owner, rows, len(theta))
    removed_hvp = torch.zeros_like(theta)
    if accumulative is False:
        return removed_grad, removed_hvp
    corrected = coefficient[row_owner] != 0
    if accumulative:
        kept = weights * corrected[:, None].to(weights.dtype)
        return removed_grad, removed_hvp.index_add_(0, row_owner, kept * batch.row_hvp(theta[row_owner], rows))
    if corrected.any():
        owners = row_owner[corrected]
        removed_hvp.index_add_(0, owners, weights[corrected] * batch.row_hvp(theta[owners], rows[corrected]))
    return removed_grad, removed_hvp


def removal_step(step: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 gradient: torch.Tensor, curved: torch.Tensor, removed_grad: torch.Tensor,
                 removed_hvp: torch.Tensor, coefficient: torch.Tensor, removal: str) -> torch.Tensor:
    """The occurrence step from ``step(G, E) -> (transition, update)`` (module docstring), rows of samples."""
    c = coefficient[:, None]
    if removal == "exact":
        own, removed = step(gradient - removed_grad, curved - removed_hvp)
        shared, kept = step(gradient, curved)
        return c * own + (1 - c) * shared + (removed - kept)
    (shared, _), (d_transition, d_update) = jvp(step, (gradient.contiguous(), curved), (-removed_grad, -removed_hvp))
    return shared + c * d_transition + d_update


class RemovalStepOps(StepOps):
    """Step operators of a rule whose occurrences are :func:`removal_step`: their injections come from
    :meth:`step_output` alone, the step of a zero state as a function of the batch gradient, so no
    product with the batch curvature is ever applied to a zero state.

    An occurrence of sample ``j`` injects ``f(G_j) - f(G)`` (exact) or ``J_f(G) (-R_j)`` (first-order),
    ``R_j = sum_r w_r g_r``. In the adjoint form the first-order score needs no per-row gradient:
    ``u . J_f (-R_j) = -sum_r w_r (J_f^T u) . g_r``, one VJP through ``f`` and the per-row loss tangents
    along ``J_f^T u`` (:meth:`BatchCurvature.row_loss_tangents`, one forward-mode pass for the batch).
    """

    batch: BatchCurvature
    removal: str

    @abstractmethod
    def step_output(self, gradient: torch.Tensor) -> torch.Tensor:
        """The step's change of a zero state (m, S) for rows of batch gradients ``gradient`` (m, P); differentiable."""

    def injection(self, row_owner: torch.Tensor, rows: torch.Tensor, count: int | None = None) -> torch.Tensor:
        count = int(row_owner.max()) + 1 if count is None else count
        removed = removed_gradients(self.batch, row_owner, rows, count)
        gradient = self.batch.batch_grad[None]
        if self.removal == "exact":
            return self.step_output(gradient - removed) - self.step_output(gradient)
        return jvp(self.step_output, (gradient.expand_as(removed).contiguous(),), (-removed,))[1]

    @property
    def takes_adjoint_blocks(self) -> bool:
        """Exact removal scores a block of adjoints ``(Q, S)`` at once (``(m, Q)``; engine.adjoint)."""
        return self.removal == "exact"

    def injection_scores(self, adjoint: torch.Tensor, row_owner: torch.Tensor, rows: torch.Tensor,
                         count: int | None = None) -> torch.Tensor:
        if self.removal == "exact":  # (f(G_j) - f(G)) . u, a block of samples at a time: never (m, S) at once
            count = int(row_owner.max()) + 1 if count is None else count
            removed = removed_gradients(self.batch, row_owner, rows, count)
            gradient = self.batch.batch_grad[None]
            block = max(1, INJECTION_BLOCK_BYTES // (STEP_TEMPORARIES * adjoint.numel() * adjoint.element_size()))
            adjoint = adjoint.mT if adjoint.dim() == 2 else adjoint  # (S,) or (S, Q)
            moved = torch.cat([self.step_output(gradient - removed[start:start + block]) @ adjoint
                               for start in range(0, count, block)])
            return moved - self.step_output(gradient)[0] @ adjoint
        count = int(row_owner.max()) + 1 if count is None else count
        _, pullback = vjp(self.step_output, self.batch.batch_grad[None])
        direction = pullback(adjoint[None])[0][0]  # J_f^T u
        tangents = self.batch.row_loss_tangents(direction)  # g_r . J_f^T u for every batch row
        contribution = self.batch.row_weight[rows] * tangents[rows]
        return -contribution.new_zeros(count).index_add_(0, row_owner, contribution)
