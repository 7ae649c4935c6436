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

from typing import Callable

import torch
from torch.func import jvp

from ..curvature.base import BatchCurvature
from ..errors import AccInfError
from ..losses import CLIP_EPS, clip_coefficient

REMOVALS = ("exact", "first-order")


def check_removal(removal: str) -> None:
    if removal not in REMOVALS:
        raise AccInfError(f"removal must be 'exact' or 'first-order', got '{removal}'.")


class ClipMap:
    """The clip map of one step: the batch gradient ``G`` of the chosen parameters, the rest of the norm fixed."""

    def __init__(self, batch: BatchCurvature, max_norm: float, recorded_norm: float):
        self.batch, self.max_norm = batch, max_norm
        gradient = batch.batch_grad
        squared = float(gradient @ gradient)
        self.rest = max(recorded_norm**2 - squared, 0.0)
        # a and n as rows() computes them, so that shared step and occurrences agree to the last bit.
        norm = (self.rest + squared) ** 0.5
        self.coef = clip_coefficient(norm, max_norm)
        self.active = self.coef < 1.0
        if self.active:
            self.projection = 1.0 / (norm * (norm + CLIP_EPS))
            self.curved_gradient = batch.hvp(gradient[None])[0]  # H_B G, for the rank-one term

    @property
    def clipped_gradient(self) -> torch.Tensor:
        return self.coef * self.batch.batch_grad

    def rows(self, gradient: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-wise ``(clip(G, e), a(G) G)`` for gradients ``G`` and vectors ``e`` (m, P); differentiable."""
        if self.max_norm <= 0:
            return vectors, gradient
        norm = (self.rest + (gradient * gradient).sum(-1)).sqrt()
        clip = (self.max_norm / (norm + CLIP_EPS)).clamp(max=1.0)
        active = (clip < 1).to(norm.dtype)
        dots = (gradient * vectors).sum(-1) * active / (norm * (norm + CLIP_EPS))
        return clip[:, None] * (vectors - gradient * dots[:, None]), clip[:, None] * gradient

    def curvature_term(self, theta: torch.Tensor, base: torch.Tensor | None, scale: float,
                       transpose: bool = False) -> torch.Tensor:
        """``base + scale clip(G, H_B theta)`` (or ``H_B clip(G, .)`` transposed), rows of ``theta``.

        ``G . H_B theta = (H_B G) . theta``: one product with the block and a rank-one update.
        """
        result = self.batch.hvp_add(theta, base, scale * self.coef)
        if self.active:
            gradient, curved = self.batch.batch_grad, self.curved_gradient
            left, right = (curved, gradient) if transpose else (gradient, curved)
            result.addr_(theta @ right, left, alpha=-scale * self.coef * self.projection)
        return result


def removed_terms(batch: BatchCurvature, theta: torch.Tensor, row_owner: torch.Tensor, rows: torch.Tensor,
                  coefficient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per occurring sample: ``sum_r w_r g_r`` and, where ``c != 0``, ``sum_r w_r H_r theta`` (repeats counted)."""
    weights = batch.row_weight[rows][:, None]
    removed_grad = torch.zeros_like(theta).index_add_(0, row_owner, weights * batch.row_grads(rows))
    removed_hvp = torch.zeros_like(theta)
    corrected = coefficient[row_owner] != 0
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
