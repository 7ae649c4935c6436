"""Ground truth by retraining: a recorded run of a small model and its leave-one-out counterfactuals.

:func:`train_recorded` trains a small classifier with ``torch.optim`` SGD, Adam or AdamW on given
batches (global clipping as the HF Trainer does it; :func:`train_sgd` for SGD) and records the run as a :class:`~hf_accinf.trajectory.Trajectory` whose
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

from ..losses import clip_coefficient, cross_entropy_rows
from ..problem import OptimizerSpec
from ..trajectory import Trajectory
from ..trajectory.schema import ParamGroupSpec
from ..optimizers import OPTIMIZERS
from .optim import optimizer_step


def train_sgd(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, batches: list[torch.Tensor],
              lrs: list[float], momentum: float = 0.0, weight_decay: float = 0.0, max_grad_norm: float = 0.0,
              nesterov: bool = False) -> tuple[Trajectory, OptimizerSpec]:
    """Train ``model`` in place with ``torch.optim.SGD`` on ``batches`` (row indices; repeats allowed) and record it."""
    return train_recorded(model, features, labels, batches, lrs, "SGD", weight_decay=weight_decay,
                          max_grad_norm=max_grad_norm, momentum=momentum, nesterov=nesterov)


def train_recorded(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, batches: list[torch.Tensor],
                   lrs: list[float], optimizer: str = "SGD", weight_decay: float = 0.0, max_grad_norm: float = 0.0,
                   momentum: float = 0.0, nesterov: bool = False, betas: tuple[float, float] | None = None,
                   eps: float | None = None, no_decay: tuple[str, ...] = ()) -> tuple[Trajectory, OptimizerSpec]:
    """Train ``model`` in place with the torch optimizer ``optimizer`` (SGD, Adam, AdamW) and record the run.

    Parameters whose name ends with a suffix in ``no_decay`` (HF: ``("bias",)`` and norm weights) form a
    second group without weight decay. The whole model is the head of the recorded trajectory.
    """
    names = [name for name, _ in model.named_parameters()]
    group_of = {name: int(bool(no_decay) and name.endswith(tuple(no_decay))) for name in names}
    named = dict(model.named_parameters())
    decays = [weight_decay, 0.0] if no_decay else [weight_decay]
    groups = [{"params": [named[n] for n in names if group_of[n] == index], "weight_decay": decay}
              for index, decay in enumerate(decays)]
    kind = OPTIMIZERS[optimizer]
    if kind.adaptive:
        torch_optimizer = getattr(torch.optim, optimizer)(groups, lr=lrs[0], betas=betas or kind.betas,
                                                          eps=kind.eps if eps is None else eps)
    else:
        torch_optimizer = torch.optim.SGD(groups, lr=lrs[0], momentum=momentum, nesterov=nesterov)
    keys = kind.state_keys
    record = {key: [] for key in ("params", "grads", "states", "lr", "clip", "norm", "loss", "count")}
    for step, batch in enumerate(batches):
        for group in torch_optimizer.param_groups:
            group["lr"] = lrs[step]
        record["params"].append({n: p.detach().clone() for n, p in model.named_parameters()})
        record["states"].append({
            f"{n}.{key}": torch_optimizer.state.get(p, {}).get(key, torch.zeros_like(p)).detach().clone()
            for n, p in model.named_parameters() for key in keys
        })
        record["count"].append(int(torch_optimizer.state.get(named[names[0]], {}).get("step", 0)))
        torch_optimizer.zero_grad()
        logits = model(features[batch])
        loss = nn.functional.cross_entropy(logits, labels[batch], reduction="sum") / len(batch)
        loss.backward()
        norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
        clip = clip_coefficient(float(norm), max_grad_norm)
        for p in model.parameters():
            p.grad.mul_(clip)
        record["grads"].append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        record["lr"].append([lrs[step]] * len(decays))
        record["clip"].append(clip)
        record["norm"].append(float(norm))
        record["loss"].append(loss.item())
        torch_optimizer.step()
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
        lr=torch.tensor(record["lr"], dtype=torch.float64),
        clip_coef=torch.tensor(record["clip"], dtype=torch.float64),
        grad_norm=torch.tensor(record["norm"], dtype=torch.float64),
        epoch=torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]]) // len(features),  # rows seen / N
        optimizer_step_count=torch.tensor(record["count"]),
        params=stack("params"), grads=stack("grads"), states=stack("states"),
        loss=torch.tensor(record["loss"], dtype=dtype),
    )
    adam = kind.adaptive
    betas, eps = (betas or kind.betas, kind.eps if eps is None else eps) if adam else (None, None)
    spec = OptimizerSpec(
        name=optimizer,
        groups=[ParamGroupSpec(index=index, weight_decay=decay, initial_lr=lrs[0],
                               momentum=None if adam else momentum, dampening=None if adam else 0.0,
                               nesterov=None if adam else nesterov, betas=list(betas) if adam else None,
                               eps=eps, amsgrad=False if adam else None)
                for index, decay in enumerate(decays)],
        group_of=group_of, max_grad_norm=max_grad_norm,
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
    """Counterfactual runs in chunks; ``keep_block(lo, hi, dtype)`` gives the (hi - lo, N) row weights.

    Each counterfactual step is :func:`.optim.optimizer_step` (any modelled optimizer), with the recorded
    learning rates, bias-correction counts, row weights (scaled by the keep weights: same divisor) and
    the unchosen parameters' recorded gradients in the clipping norm."""
    names = [name for name, _ in model.named_parameters()]
    chosen = list(chosen or names)
    state_names = [f"{n}.{key}" for n in chosen for key in OPTIMIZERS[optimizer.name].state_keys if f"{n}.{key}" in trajectory.states]

    def step_one(params, state, keep, fixed, rows, weights, lrs, count, rest):
        def batch_loss(p):
            logits = functional_call(model, {**fixed, **p}, (features[rows],))
            targets = nn.functional.one_hot(labels[rows], logits.shape[-1]).to(logits.dtype)
            return (weights * keep[rows] * cross_entropy_rows(logits, targets)).sum()

        return optimizer_step(optimizer, params, state, grad(batch_loss)(params), lrs, count, rest)

    results = []
    for lo in range(0, count_all, chunk):
        count = min(chunk, count_all - lo)
        params = {n: trajectory.params[n][0].expand(count, *trajectory.params[n].shape[1:]).clone() for n in chosen}
        state = {n: trajectory.states[n][0].expand(count, *trajectory.states[n].shape[1:]).clone() for n in state_names}
        keep = keep_block(lo, lo + count, params[chosen[0]].dtype)
        for step in range(trajectory.num_steps):
            rows = trajectory.batch(step)
            weights = trajectory.row_weight[trajectory.rows_of(step)].to(keep.dtype)
            fixed = {n: trajectory.params[n][step] for n in names if n not in chosen}
            # Unchosen parameters' recorded (unclipped) gradients enter the clipping norm unchanged.
            rest = sum((float(((trajectory.grads[n][step] / trajectory.clip_coef[step]) ** 2).sum())
                        for n in names if n not in chosen), 0.0)
            lrs = {n: float(trajectory.lr[step, optimizer.group_of[n]]) for n in chosen}
            step_count = int(trajectory.optimizer_step_count[step])
            params, new_state = vmap(step_one, in_dims=(0, 0, 0, None, None, None, None, None, None))(
                params, state, keep, fixed, rows, weights, lrs, step_count, rest)
            state = {n: new_state.get(n, value) for n, value in state.items()}
        results.append(params)
    return {n: torch.cat([r[n] for r in results]) for n in chosen}


def mean_loss(model: nn.Module, params: dict[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``model`` with ``params`` (batched over a leading dimension) on a set."""
    def one(p):
        return nn.functional.cross_entropy(functional_call(model, p, (features,)), labels)

    return vmap(one)(params)
