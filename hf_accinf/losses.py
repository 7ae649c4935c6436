"""The per-row training loss the estimators model: cross-entropy against (optionally smoothed) labels; the clip coefficient."""

from __future__ import annotations

import math

import torch
from torch import nn


def target_distribution(labels: torch.Tensor, num_classes: int, label_smoothing: float = 0.0,
                        dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Rows of the label distribution the cross-entropy is taken against (smoothing as HF's LabelSmoother).

    Rows labelled -100 (ignored by the Trainer) get an all-zero target, hence zero loss and gradient.
    """
    valid = (labels >= 0)[:, None]
    # Masks, not boolean indexing: no data-dependent shapes (no host synchronisation on a GPU).
    target = (labels[:, None] == torch.arange(num_classes, device=labels.device)).to(dtype)
    if label_smoothing:
        target = (1 - label_smoothing) * target + label_smoothing / num_classes
    return target * valid.to(dtype)


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy ``-sum_c t_c log softmax(z)_c``."""
    return -(target * torch.log_softmax(logits, dim=-1)).sum(-1)


def mean_weights(labels: torch.Tensor, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Row weights of the mean loss over the rows the loss does not ignore (label -100 gets weight 0)."""
    valid = (labels >= 0).to(dtype)
    return (valid / valid.sum().clamp(min=1)).to(device or labels.device)


CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: a = max_norm / (norm + 1e-6); the one copy in the package


def clip_coefficient(norm: float, max_norm: float | None) -> float:
    """The Trainer's global clip coefficient ``min(1, c / (n + CLIP_EPS))`` (1 when clipping is off or n is not finite)."""
    if not max_norm or max_norm <= 0 or not math.isfinite(norm):
        return 1.0
    return min(1.0, max_norm / (norm + CLIP_EPS))
