"""Functional optimizer steps (torch SGD, Adam, AdamW) under the HF Trainer's global clipping.

Pure functions of ``(params, state, grads)`` dicts, so that ``torch.func`` can vmap them over
counterfactual runs (leave-one-out retraining) and differentiate them (the tests' naive oracle).
They follow torch's update rules to the letter (DESIGN.md sections 3 and 4) and share no code with
the update rules of :mod:`hf_accinf.methods`; per-row weights enter through the caller's loss.

State keys are the trajectory's: ``"<param>.momentum_buffer"``, ``"<param>.exp_avg"``,
``"<param>.exp_avg_sq"``. ``step_count`` is the optimizer's count before the step (the recorded
``optimizer_step_count``): bias correction uses ``k = step_count + 1``.
"""

from __future__ import annotations

import torch

from ..errors import AccInfError
from ..losses import CLIP_EPS
from ..optimizers import OPTIMIZERS
from ..problem import OptimizerSpec



def clip_gradients(grads: dict[str, torch.Tensor], max_norm: float,
                   rest_squared: torch.Tensor | float = 0.0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Global-norm clipping of ``grads`` with ``rest_squared`` the squared norm of gradients outside them."""
    norm = torch.sqrt(rest_squared + sum((g * g).sum() for g in grads.values()))
    if max_norm <= 0:
        return grads, torch.ones_like(norm)
    coef = torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)
    return {name: coef * g for name, g in grads.items()}, coef


def optimizer_step(spec: OptimizerSpec, params: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                   grads: dict[str, torch.Tensor], lrs: dict[str, float], step_count: int,
                   rest_squared: torch.Tensor | float = 0.0,
                   preconditioner: dict[str, torch.Tensor] | None = None) -> tuple[dict, dict]:
    """One step of ``spec``'s optimizer on unclipped batch gradients ``grads``; returns new params and state.

    ``preconditioner`` (Adam family) replaces ``v'`` in the parameter update by given values (the
    frozen-preconditioner ablation's oracle); the state still records the true ``v'``.
    """
    if spec.name not in OPTIMIZERS:
        raise AccInfError(f"No functional step for {spec.name}: use SGD, Adam or AdamW.")
    kind = OPTIMIZERS[spec.name]
    grads, _ = clip_gradients(grads, spec.max_grad_norm, rest_squared)
    new_params, new_state = {}, {}
    for name, p in params.items():
        group = spec.groups[spec.group_of[name]]
        lr, decay, g = lrs[name], group.weight_decay or 0.0, grads[name]
        if not kind.adaptive:
            mu = group.momentum or 0.0
            d = g + decay * p
            if mu:
                buffer = mu * state[f"{name}.momentum_buffer"] + d
                d = d + mu * buffer if group.nesterov else buffer
                new_state[f"{name}.momentum_buffer"] = buffer
            new_params[name] = p - lr * d
            continue
        beta1, beta2 = group.betas or kind.betas
        eps = group.eps if group.eps is not None else kind.eps
        if kind.decoupled_decay:
            p = p * (1 - lr * decay)
        else:
            g = g + decay * p
        m = beta1 * state[f"{name}.exp_avg"] + (1 - beta1) * g
        v = beta2 * state[f"{name}.exp_avg_sq"] + (1 - beta2) * g * g
        k = step_count + 1
        used = v if preconditioner is None else preconditioner[name]
        new_params[name] = p - lr * (m / (1 - beta1**k)) / ((used / (1 - beta2**k)).sqrt() + eps)
        new_state[f"{name}.exp_avg"], new_state[f"{name}.exp_avg_sq"] = m, v
    return new_params, new_state
