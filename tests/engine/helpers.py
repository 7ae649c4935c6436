"""Small float64 problems trained with real SGD, for the engine tests."""

from __future__ import annotations

import torch
from torch import nn

from hf_accinf.curvature.attention import EXACT_ATTENTION
from hf_accinf.evaluation.paper.experiments import ZeroLogit
from hf_accinf.evaluation.retrain import leave_one_out_sgd, mean_loss, train_sgd
from hf_accinf.engine import estimate_influence, every_occurrence
from hf_accinf.methods.registry import build_method
from hf_accinf.problem import InfluenceProblem, make_curvature


# The float64 oracles run the model with the backend's dtype-exact eager attention (HF's eager attention of
# ViT takes its softmax in float32).
FLOAT64_ATTENTION = EXACT_ATTENTION


def estimate(problem, name: str, removal: str = "exact", policy=None, **kwargs):
    """The engine on the registered method ``name``; an accumulative method's policy defaults to ACC at every
    occurrence."""
    rule = build_method(problem, name, removal=removal)
    return estimate_influence(problem, rule, policy or every_occurrence(rule), **kwargs)


def tiny_mlp(inputs=4, hidden=3, classes=2, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, classes)).double()


def shuffled_batches(num_samples: int, batch_size: int, epochs: int, seed: int = 0, repeat_row: bool = True):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(epochs):
        order = torch.randperm(num_samples, generator=generator)
        batches.extend(order[i : i + batch_size] for i in range(0, num_samples, batch_size))
    if repeat_row:  # distributed padding: one row twice in a step, and again in the next step
        batches[1] = torch.cat([batches[1], batches[1][:1]])
        batches[2] = torch.cat([batches[2], batches[1][:1]])
    return batches


def make_problem(model=None, num_samples=10, features=4, classes=2, batch_size=4, epochs=3, momentum=0.9,
                 weight_decay=0.01, max_grad_norm=0.3, chosen=None, backend="auto", nesterov=False, seed=0,
                 repeat_row=True):
    model = model if model is not None else tiny_mlp(features, 3, classes, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(num_samples, features, generator=generator, dtype=torch.float64)
    y = torch.randint(0, classes, (num_samples,), generator=generator)
    batches = shuffled_batches(num_samples, batch_size, epochs, seed, repeat_row)
    lrs = [0.5 * (1 + 0.1 * (t % 3)) for t in range(len(batches))]
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trajectory, spec = train_sgd(model, x, y, batches, lrs, momentum, weight_decay, max_grad_norm, nesterov)
    chosen = chosen or [name for name, _ in model.named_parameters()]
    spec.group_of = {name: 0 for name in chosen}
    curvature = make_curvature(trajectory, model, chosen, 0.0, torch.float64, "cpu", backend)
    problem = InfluenceProblem(trajectory, curvature, spec, num_samples)
    problem.model, problem.features, problem.labels, problem.initial = model, x, y, initial
    return problem


def oracle_occurrence(step, state, delta, w, ids, j: int, c: float, removal: str):
    """The naive per-sample oracle's tangent move at step ``state`` (DESIGN.md section 4), from ``torch.func.jvp``
    of a functional optimizer ``step(state, weights)``: the shared transition where ``j`` is absent, else
    exact removal (``J_s step(w^-j) delta + step(w^-j) - step(w)``, ``J_s step(w)`` for the classical twin)
    or first-order removal (``J_s step delta + J_w step (-e_j) + c`` times the mixed derivative)."""
    from torch.func import jvp

    if not bool((ids == j).any()):
        return jvp(lambda s: step(s, w), (state,), (delta,))[1]
    w_removed = torch.where(ids == j, torch.zeros_like(w), w)
    if removal == "exact":
        transition_weights = w_removed if c else w
        return (jvp(lambda s: step(s, transition_weights), (state,), (delta,))[1]
                + step(state, w_removed) - step(state, w))
    direction = w_removed - w
    moved = jvp(lambda s: step(s, w), (state,), (delta,))[1]
    injected = jvp(lambda v: step(state, v), (w,), (direction,))[1]
    mixed = jvp(lambda e: jvp(lambda s: step(s, w + e * direction), (state,), (delta,))[1],
                (torch.zeros((), dtype=torch.float64),), (torch.ones((), dtype=torch.float64),))[1]
    return moved + injected + c * mixed


def digits_1_vs_7(num_train=200, num_val=200, flip=0.1, seed=0):
    """DESIGN.md's calibration data: scikit-learn digits 1 vs 7, ``flip`` of the training labels flipped."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.isin(digits.target, (1, 7))
    x = torch.tensor(digits.data[keep] / 16.0, dtype=torch.float64)
    y = torch.tensor((digits.target[keep] == 7).astype(np.int64))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=generator)
    train, val = order[:num_train], order[num_train : num_train + num_val]
    y_train = y[train].clone()
    flipped = torch.randperm(num_train, generator=generator)[: int(flip * num_train)]
    y_train[flipped] = 1 - y_train[flipped]
    return x[train], y_train, x[val], y[val]


def calibration_mlp(seed: int = 0) -> nn.Module:
    """DESIGN.md's calibration model: 64-8-8-1 tanh MLP, its one logit z read as cross-entropy logits [0, z]."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1), ZeroLogit()).double()


def whole_model_leave_one_out(model: nn.Module, initial: dict, trajectory, spec, x, y, x_val, y_val):
    """A recorded run of ``model`` (started from ``initial``) as a whole-model problem, with every row retrained
    out: ``(problem, final parameters, retrained parameters, truth)``, the truth being the change of the mean
    validation loss without each row."""
    final = {k: v.detach().clone() for k, v in model.named_parameters()}
    curvature = make_curvature(trajectory, model, list(spec.group_of), 0.0, torch.float64, "cpu")
    problem = InfluenceProblem(trajectory, curvature, spec, len(y))
    model.load_state_dict(initial)
    retrained = leave_one_out_sgd(model, trajectory, spec, x, y, torch.arange(len(y)))
    base = mean_loss(model, {k: v[None] for k, v in final.items()}, x_val, y_val)[0]
    return problem, final, retrained, mean_loss(model, retrained, x_val, y_val) - base
