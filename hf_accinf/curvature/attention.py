"""The attention the model backend runs: eager attention computed in the model's own dtype.

HF's eager attention of ViT (and of many other models) takes its softmax in float32 whatever the inputs'
dtype, so a float64 backend would carry float32 round-off through every step (measured: 1.7e-3 of the
largest Adam-IE embedding on a tiny ViT). The fused SDPA kernels have no forward-mode derivative. This
one is the same function, registered with ``transformers.AttentionInterface`` under :data:`EXACT_ATTENTION`.
Offline passes run in eval mode: no attention dropout.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

EXACT_ATTENTION = "hf_accinf_exact"


def exact_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``softmax(q k^T * scaling + mask) v`` in the inputs' dtype; boolean masks keep ``True`` positions."""
    scale = query.size(-1) ** -0.5 if scaling is None else scaling
    key = key.repeat_interleave(query.size(1) // key.size(1), dim=1) if key.size(1) != query.size(1) else key
    value = value.repeat_interleave(query.size(1) // value.size(1), dim=1) if value.size(1) != query.size(1) else value
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if attention_mask is not None:
        mask = attention_mask[..., : key.size(-2)]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask.to(scores.dtype)
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


AttentionInterface.register(EXACT_ATTENTION, exact_attention)
# Its masks are eager attention's (additive, in the model's dtype), not a custom implementation's default.
AttentionMaskInterface.register(EXACT_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
