"""Scores from influence embeddings (DESIGN.md section 2): ``s_j ~= L_val(theta^{-j}_T) - L_val(theta_T)``.

* ``linear``: ``grad L_val(theta_T) . Delta^j_T`` (DESIGN.md's definition; one dot product per sample);
* ``evaluated``: ``L_val(theta_T + Delta^j_T) - L_val(theta_T)``, the objective evaluated exactly at the
  estimated counterfactual parameters of the head. It removes the objective's own linearization
  error, which is common to every estimator and, measured against leave-one-out retraining, can hide
  which estimator predicts the parameters better (docs/ENGINE.md).
"""

from __future__ import annotations

import torch

from ..curvature.base import HeadCurvature
from ..errors import AccInfError

SCORE_KINDS = ("linear", "evaluated")


def scores_from_embeddings(curvature: HeadCurvature, embeddings: torch.Tensor, final_params: dict[str, torch.Tensor],
                           inputs: torch.Tensor, labels: torch.Tensor, kind: str = "linear",
                           chunk: int = 4096) -> torch.Tensor:
    if kind == "linear":
        return embeddings @ curvature.objective_grad(final_params, inputs, labels)
    if kind != "evaluated":
        raise AccInfError(f"Unknown score kind '{kind}': use {' or '.join(SCORE_KINDS)}.")
    zero = torch.zeros(1, curvature.dim, dtype=embeddings.dtype, device=embeddings.device)
    base = curvature.shifted_losses(final_params, zero, inputs, labels)[0]
    return torch.cat([curvature.shifted_losses(final_params, embeddings[lo : lo + chunk], inputs, labels) - base
                      for lo in range(0, len(embeddings), chunk)])
