"""Ground truth by retraining: a recorded SGD run of a small model and its leave-one-out counterfactuals.

:func:`train_sgd` trains a small classifier with ``torch.optim.SGD`` on given batches (global clipping
as the HF Trainer does it) and records the run as a :class:`~hf_accinf.trajectory.Trajectory` whose
head is the whole model. :func:`leave_one_out_sgd` retrains it without each chosen sample, with the
identical batch order, initial weights, learning rates, clipping and divisor (DESIGN.md section 2),
vectorized over counterfactuals with ``torch.func.vmap``; parameters outside ``chosen`` follow their
recorded trajectory ("chosen modules only" retraining). :func:`retrain_sgd_without` does the same for
removed sets of samples (one keep-mask row per counterfactual), as data cleansing needs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..losses import cross_entropy_rows
from ..problem import OptimizerSpec
from ..trajectory import Trajectory
from ..trajectory.schema import ParamGroupSpec

NORM_EPS = 1e-6


def train_sgd(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, batches: list[torch.Tensor],
              lrs: list[float], momentum: float = 0.0, weight_decay: float = 0.0, max_grad_norm: float = 0.0,
              nesterov: bool = False) -> tuple[Trajectory, OptimizerSpec]:
    """Train ``model`` in place on ``batches`` (row indices; repeats allowed) and record the trajectory."""
    names = [name for name, _ in model.named_parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=lrs[0], momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    record = {key: [] for key in ("params", "grads", "states", "lr", "clip", "norm", "loss")}
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lrs[step]
        record["params"].append({n: p.detach().clone() for n, p in model.named_parameters()})
        record["states"].append({
            f"{n}.momentum_buffer": optimizer.state.get(p, {}).get("momentum_buffer", torch.zeros_like(p)).detach().clone()
            for n, p in model.named_parameters()
        })
        optimizer.zero_grad()
        logits = model(features[batch])
        loss = nn.functional.cross_entropy(logits, labels[batch], reduction="sum") / len(batch)
        loss.backward()
        norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
        clip = min(1.0, max_grad_norm / (float(norm) + NORM_EPS)) if max_grad_norm > 0 else 1.0
        for p in model.parameters():
            p.grad.mul_(clip)
        record["grads"].append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        record["lr"].append(lrs[step])
        record["clip"].append(clip)
        record["norm"].append(float(norm))
        record["loss"].append(loss.item())
        optimizer.step()
    sizes = torch.tensor([len(b) for b in batches])
    dtype = next(model.parameters()).dtype

    def stack(key):
        return {name: torch.stack([entry[name] for entry in record[key]]) for name in record[key][0]}

    trajectory = Trajectory(
        row_offsets=torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]),
        row_index=torch.cat(batches).long(),
        row_weight=torch.cat([torch.full((len(b),), 1.0 / len(b), dtype=torch.float64) for b in batches]),
        labels=labels[torch.cat(batches)].long(),
        head_input=features[torch.cat(batches)],
        lr=torch.tensor(record["lr"], dtype=torch.float64)[:, None],
        clip_coef=torch.tensor(record["clip"], dtype=torch.float64),
        grad_norm=torch.tensor(record["norm"], dtype=torch.float64),
        epoch=torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]]) // len(features),  # rows seen / N
        optimizer_step_count=torch.arange(len(batches)),
        params=stack("params"), grads=stack("grads"), states=stack("states"),
        loss=torch.tensor(record["loss"], dtype=dtype),
    )
    spec = OptimizerSpec(
        name="SGD",
        groups=[ParamGroupSpec(index=0, weight_decay=weight_decay, initial_lr=lrs[0], momentum=momentum,
                               dampening=0.0, nesterov=nesterov)],
        group_of={name: 0 for name in names}, max_grad_norm=max_grad_norm,
    )
    return trajectory, spec


def leave_one_out_sgd(model: nn.Module, trajectory: Trajectory, optimizer: OptimizerSpec, features: torch.Tensor,
                      labels: torch.Tensor, samples: torch.Tensor, chosen: list[str] | None = None,
                      chunk: int = 256) -> dict[str, torch.Tensor]:
    """Final chosen parameters of the run retrained without each sample in ``samples`` (K,): dict of (K, ...)."""
    def keep_of(block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        keep = torch.ones(len(block), len(features), dtype=dtype)
        keep[torch.arange(len(block)), block] = 0
        return keep

    return _retrain_sgd(model, trajectory, optimizer, features, labels, len(samples),
                        lambda lo, hi, dtype: keep_of(samples[lo:hi], dtype), chosen, chunk)


def retrain_sgd_without(model: nn.Module, trajectory: Trajectory, optimizer: OptimizerSpec, features: torch.Tensor,
                        labels: torch.Tensor, keep: torch.Tensor, chosen: list[str] | None = None,
                        chunk: int = 256) -> dict[str, torch.Tensor]:
    """Final chosen parameters of the run retrained once per row of ``keep`` (K, N): each row's 0 entries
    are removed sets of samples (or any per-sample loss weights), same batches, order and divisor."""
    return _retrain_sgd(model, trajectory, optimizer, features, labels, len(keep),
                        lambda lo, hi, dtype: keep[lo:hi].to(dtype), chosen, chunk)


def _retrain_sgd(model: nn.Module, trajectory: Trajectory, optimizer: OptimizerSpec, features: torch.Tensor,
                 labels: torch.Tensor, count_all: int, keep_block, chosen: list[str] | None,
                 chunk: int) -> dict[str, torch.Tensor]:
    """Counterfactual runs in chunks; ``keep_block(lo, hi, dtype)`` gives the (hi - lo, N) row weights."""
    names = [name for name, _ in model.named_parameters()]
    chosen = list(chosen or names)
    group = optimizer.groups[0]
    momentum, decay, nesterov = group.momentum or 0.0, group.weight_decay, bool(group.nesterov)
    max_norm = optimizer.max_grad_norm

    def step_one(params, buffers, keep, fixed, rows, lr):
        def batch_loss(p):
            logits = functional_call(model, {**fixed, **p}, (features[rows],))
            weights = keep[rows] / len(rows)
            return (weights * cross_entropy_rows(logits, nn.functional.one_hot(labels[rows], logits.shape[-1]).to(logits.dtype))).sum()

        grads = grad(batch_loss)(params)
        if max_norm > 0:
            rest = sum(((fixed_grad**2).sum() for fixed_grad in fixed_grads.values()), torch.zeros((), dtype=torch.float64))
            norm = torch.sqrt(rest + sum((g**2).sum() for g in grads.values()))
            clip = torch.clamp(max_norm / (norm + NORM_EPS), max=1.0)
            grads = {n: clip * g for n, g in grads.items()}
        new_params, new_buffers = {}, {}
        for n, p in params.items():
            d = grads[n] + decay * p
            if momentum:
                b = momentum * buffers[n] + d
                update = d + momentum * b if nesterov else b
                new_buffers[n] = b
            else:
                update, new_buffers[n] = d, buffers[n]
            new_params[n] = p - lr * update
        return new_params, new_buffers

    results = []
    for lo in range(0, count_all, chunk):
        count = min(chunk, count_all - lo)
        params = {n: trajectory.params[n][0].expand(count, *trajectory.params[n].shape[1:]).clone() for n in chosen}
        buffers = {n: torch.zeros_like(v) for n, v in params.items()}
        keep = keep_block(lo, lo + count, params[chosen[0]].dtype)
        for step in range(trajectory.num_steps):
            rows = trajectory.batch(step)
            fixed = {n: trajectory.params[n][step] for n in names if n not in chosen}
            # Unchosen parameters' recorded (unclipped) gradients enter the clipping norm unchanged.
            fixed_grads = {n: trajectory.grads[n][step] / trajectory.clip_coef[step] for n in names if n not in chosen}
            lr = float(trajectory.lr[step, 0])
            params, buffers = vmap(step_one, in_dims=(0, 0, 0, None, None, None))(params, buffers, keep, fixed, rows, lr)
        results.append(params)
    return {n: torch.cat([r[n] for r in results]) for n in chosen}


def mean_loss(model: nn.Module, params: dict[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``model`` with ``params`` (batched over a leading dimension) on a set."""
    def one(p):
        return nn.functional.cross_entropy(functional_call(model, p, (features,)), labels)

    return vmap(one)(params)
