"""Scores from influence embeddings (DESIGN.md section 2): ``s_j ~= L_val(theta^{-j}_T) - L_val(theta_T)``.

* ``linear``: ``grad L_val(theta_T) . Delta^j_T`` (DESIGN.md's definition; one dot product per sample);
* ``cosine``: ``cos(grad L_val(theta_T), Delta^j_T)``, the LESS-style score (DESIGN.md section 4): the
  direction of a row's influence without its size;
* ``evaluated``: ``L_val(theta_T + Delta^j_T) - L_val(theta_T)``, the objective evaluated exactly at the
  estimated counterfactual parameters of the head. It removes the objective's own linearization
  error, which is common to every estimator and, measured against leave-one-out retraining, can hide
  which estimator predicts the parameters better (docs/ENGINE.md). Parameter-space embeddings only.

A method whose embeddings live in another space (DVEmb's projection) puts the objective's gradient there
with ``rule.embed_gradient``.
"""

from __future__ import annotations

import torch

from ..curvature.base import HeadCurvature
from ..errors import AccInfError
from ..options import SCORE_KINDS, check_choice


def check_score_kind(kind: str, rule=None) -> None:
    """Refuse an unknown kind, or ``evaluated`` for embeddings that are not parameter changes, before any work."""
    check_choice("score kind", kind, SCORE_KINDS, AccInfError)
    if kind == "evaluated" and not getattr(rule, "parameter_space", True):
        name = getattr(getattr(rule, "spec", None), "name", type(rule).__name__)
        raise AccInfError(f"score_kind 'evaluated' moves the parameters by the embeddings; {name} embeddings are "
                          "in a projected space, not parameter changes: use linear or cosine.")


def scores_from_embeddings(curvature: HeadCurvature, embeddings: torch.Tensor, final_params: dict[str, torch.Tensor],
                           inputs: torch.Tensor, labels: torch.Tensor, kind: str = "linear",
                           chunk: int = 4096, rule=None) -> torch.Tensor:
    """Scores of every row from its embedding (``rule``: the method, when its embeddings are not in the
    curvature's parameter layout)."""
    check_score_kind(kind, rule)
    if kind in ("linear", "cosine"):
        gradient = curvature.objective_grad(final_params, inputs, labels)
        if rule is not None:
            gradient = rule.embed_gradient(gradient)
        gradient = gradient.to(embeddings.dtype)
        scores = embeddings @ gradient
        if kind == "cosine":
            scores = scores / (embeddings.norm(dim=1) * gradient.norm()).clamp_min(torch.finfo(scores.dtype).tiny)
        return scores
    zero = torch.zeros(1, curvature.dim, dtype=embeddings.dtype, device=embeddings.device)
    base = curvature.shifted_losses(final_params, zero, inputs, labels)[0]
    return torch.cat([curvature.shifted_losses(final_params, embeddings[lo : lo + chunk], inputs, labels) - base
                      for lo in range(0, len(embeddings), chunk)])
