"""Gauge tensors: parameters whose perturbation does not change the model's outputs, found numerically.

DESIGN.md section 6b ("Judge the replay where influence lives"). An attention key bias under absolute
positions adds ``q_i . b`` to the score of every key for query ``i``; softmax ignores a shift shared by
every key, so the outputs do not depend on ``b`` and its true gradient is exactly zero. In float32 its
gradient is rounding noise far below Adam's ``eps``, so Adam moves it by about ``lr x noise / eps`` per
step: a random walk that a replay does not reproduce unless every rounding is the same, while every
tensor that matters replays to round-off. Such a tensor carries no influence (its ``Delta`` is zero in
exact arithmetic, and Adam's ``1 / eps`` gain would amplify its noise): the replay check leaves it out
of its norms, and a deep scope leaves it out of the propagated parameters.

Detection is by the outputs, not by name: on a probe of training rows, in eval mode and float64, the
gradient of a few random projections ``u_k . logits`` with respect to every tensor, relative to the
gradient with respect to all parameters. A gauge tensor's share is float64 rounding (~1e-15); a tensor
that matters has a share many orders above :data:`GAUGE_THRESHOLD`. The probe runs at several parameter
points (the replay uses the first and the last checkpoint), and a tensor is gauge only if it is
insensitive at every one of them: a tensor that is inert at initialization only (the input side of a
zero-initialized product, like a LoRA ``A`` while ``B = 0``) is not gauge.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from ..inputs.collate import LABEL_NAMES

GAUGE_THRESHOLD = 1e-8
"""Largest share ``||d(u . logits)/dW|| / ||d(u . logits)/d theta||`` (float64, several random ``u``) of a gauge
tensor ``W``: eight orders above float64 rounding (~1e-16), and far below any tensor that changes outputs."""
GAUGE_PROJECTIONS = 4
"""Random projections of the logits per probe batch (each one backward pass)."""

Probe = tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]  # (state_dict, model inputs without labels)


def probe_inputs(inputs: dict) -> dict[str, torch.Tensor]:
    """Collated model inputs for a float64 probe: tensors only, labels dropped, floating ones in float64."""
    return {key: value.double() if value.is_floating_point() else value for key, value in inputs.items()
            if isinstance(value, torch.Tensor) and key not in LABEL_NAMES}


def output_sensitivity(model: nn.Module, probes: Iterable[Probe], projections: int = GAUGE_PROJECTIONS,
                       seed: int = 0) -> dict[str, float]:
    """Per parameter name: the largest share, over the probe points, of the outputs' gradient that the
    tensor holds (``||g_W|| / ||g||`` for ``g`` the gradient of random projections of the logits).

    ``model`` is evaluated as given (cast it to float64 and put it in eval mode first); each probe's
    ``state_dict`` is loaded into it."""
    params = dict(model.named_parameters())
    share = dict.fromkeys(params, 0.0)
    generator = torch.Generator().manual_seed(seed)
    device = next(iter(params.values())).device
    for weights, batches in probes:
        model.load_state_dict(weights, strict=True)
        squared = {name: torch.zeros((), dtype=torch.float64, device=device) for name in params}
        for inputs in batches:
            output = model(**inputs)
            logits = output if isinstance(output, torch.Tensor) else \
                output.logits if hasattr(output, "logits") else output[0]
            for _ in range(projections):
                direction = torch.randn(logits.shape, generator=generator, dtype=torch.float64).to(logits)
                grads = torch.autograd.grad((direction * logits).sum(), list(params.values()), retain_graph=True,
                                            allow_unused=True)
                for name, gradient in zip(params, grads):
                    if gradient is not None:
                        squared[name] += gradient.detach().double().square().sum()
        values = torch.stack(list(squared.values())).tolist()  # one host transfer per probe point
        total = sum(values)
        for name, value in zip(squared, values):
            own = math.sqrt(value / total) if total > 0 else 0.0
            share[name] = max(share[name], own)
    return share


def find_gauge(model: nn.Module, probes: Iterable[Probe], threshold: float = GAUGE_THRESHOLD,
               projections: int = GAUGE_PROJECTIONS, seed: int = 0) -> tuple[str, ...]:
    """The parameters (``named_parameters`` names, in the model's order) whose share of the outputs'
    gradient stays below ``threshold`` at every probe point: the gauge tensors."""
    share = output_sensitivity(model, probes, projections, seed)
    return tuple(name for name, value in share.items() if value < threshold)
