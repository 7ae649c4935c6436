"""Small float64 problems trained with real torch Adam/AdamW (HF recipe: warm-up then linear decay, clipping,
no decay on biases), for the method tests."""

from __future__ import annotations

import torch

from hf_accinf.evaluation.retrain import train_recorded
from hf_accinf.problem import InfluenceProblem, make_curvature
from tests.engine.helpers import shuffled_batches, tiny_mlp


def warmup_linear(num_steps: int, peak: float, warmup: float = 0.2) -> list[float]:
    """The HF default schedule: linear warm-up over the first ``warmup`` fraction, then linear decay to 0."""
    ramp = max(1, int(warmup * num_steps))
    return [peak * (t + 1) / ramp if t < ramp else peak * (num_steps - t) / (num_steps - ramp) for t in range(num_steps)]


def make_adam_problem(optimizer="AdamW", num_samples=10, features=4, classes=2, batch_size=4, epochs=3,
                      lr=0.05, weight_decay=0.1, max_grad_norm=0.5, chosen=None, seed=0, repeat_row=True):
    model = tiny_mlp(features, 3, classes, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(num_samples, features, generator=generator, dtype=torch.float64)
    y = torch.randint(0, classes, (num_samples,), generator=generator)
    batches = shuffled_batches(num_samples, batch_size, epochs, seed, repeat_row)
    trajectory, spec = train_recorded(model, x, y, batches, warmup_linear(len(batches), lr), optimizer,
                                      weight_decay=weight_decay, max_grad_norm=max_grad_norm, no_decay=("bias",))
    chosen = chosen or [name for name, _ in model.named_parameters()]
    spec.group_of = {name: spec.group_of[name] for name in chosen}
    curvature = make_curvature(trajectory, model, chosen, 0.0, torch.float64, "cpu")
    problem = InfluenceProblem(trajectory, curvature, spec, num_samples)
    problem.model, problem.features, problem.labels = model, x, y
    return problem
