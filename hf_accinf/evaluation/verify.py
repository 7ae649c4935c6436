"""Whole-model leave-one-out truth by replay, and the agreement check behind ``--verify K``.

DESIGN.md section 2 (the counterfactual: row ``j``'s loss weight changed at every occurrence, the
divisor, batch order, learning rates and dropout masks unchanged) and section 6b ("Trust"): retrain
the recorded run by replay (:class:`~hf_accinf.trajectory.replay.Replay`) with ``k`` random rows at
weight 0 and at weight 0.5, evaluate the mean eval cross-entropy at each counterfactual, and report
how well the estimated scores ``s_j ~= L_val(theta^{-j}_T) - L_val(theta_T)`` agree with these exact
changes. ``truth(0)`` against ``2 x truth(0.5)`` is the linearity ceiling: how far any first-order
estimate can agree with the truth on this run. This is the exact-retraining harness, not an
estimator: the ``k`` counterfactuals are retrained one after another.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any, Callable

import numpy as np
import torch
from scipy import stats
from transformers import default_data_collator

from ..errors import AccInfError
from ..trajectory import RunReader
from ..trajectory.replay import Replay
from .metrics import kendall_tau


def retrain(run: RunReader, train_dataset, collate_fn: Callable | None = None,
            weight_scale: dict[int, float] | None = None, device: str = "cpu",
            replay: Replay | None = None) -> dict[str, torch.Tensor]:
    """The final ``state_dict`` of the recorded run retrained from step 0 with row ``j``'s loss weight multiplied
    by ``weight_scale[j]`` at every occurrence (the divisor unchanged). Pass ``replay`` to reuse one."""
    replay = replay or Replay(run, train_dataset, collate_fn, device)
    return replay.train(weight_scale)


def counterfactual_losses(run: RunReader, parameter_sets: list[dict[str, torch.Tensor]], eval_dataset,
                          collate_fn: Callable | None = None, batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    """``(len(parameter_sets),)`` float64: the mean cross-entropy over ``eval_dataset`` of the recorded model
    class at each set of parameters (a ``state_dict``), in eval mode."""
    model = run.build_model().to(device).eval()
    collate = collate_fn or default_data_collator
    keep = set(inspect.signature(model.forward).parameters) | {"label", "label_ids", "labels"}
    batches = []
    for start in range(0, len(eval_dataset), batch_size):
        stop = min(start + batch_size, len(eval_dataset))
        batch = collate([{k: v for k, v in eval_dataset[i].items() if k in keep} for i in range(start, stop)])
        if "labels" not in batch:
            raise AccInfError("The evaluation dataset needs a 'labels' column.")
        batches.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    losses = []
    with torch.no_grad():
        for parameters in parameter_sets:
            model.load_state_dict(parameters, strict=True)
            total, count = torch.zeros((), dtype=torch.float64), 0
            for batch in batches:
                inputs = dict(batch)
                labels = inputs.pop("labels")
                logits = model(**inputs).logits.double()
                valid = labels >= 0
                total += torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum").cpu()
                count += int(valid.sum())
            losses.append(total / max(count, 1))
    return torch.stack(losses)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(stats.pearsonr(a, b).statistic)


def verify(run: RunReader, train_dataset, collate_fn: Callable | None, eval_dataset, scores, k: int, seed: int = 0,
           eval_collate_fn: Callable | None = None, device: str = "cpu") -> dict[str, Any]:
    """Retrain ``k`` random rows out by replay and report the agreement of ``scores`` with the exact changes.

    Returns Kendall tau, Pearson r and sign agreement of ``scores[rows]`` against ``truth(0)``, the linearity
    ceiling (tau and r of ``truth(0)`` against ``2 x truth(0.5)``), the rows and values, the replay error
    and the wall time.
    """
    scores = torch.as_tensor(np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores), dtype=torch.float64)
    length = len(train_dataset)
    if scores.shape != (length,):
        raise AccInfError(f"scores must hold one value per training row ({length}), got shape {tuple(scores.shape)}.")
    if not 2 <= k <= length:
        raise AccInfError(f"verify needs 2 <= k <= {length} rows, got k={k}.")
    started = time.perf_counter()
    replay = Replay(run, train_dataset, collate_fn, device)
    rows = torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:k].sort().values.tolist()
    base = counterfactual_losses(run, [replay.train()], eval_dataset, eval_collate_fn, device=device)[0]
    truth = {}
    for factor in (0.0, 0.5):
        truth[factor] = torch.stack([
            counterfactual_losses(run, [replay.train({row: factor})], eval_dataset, eval_collate_fn, device=device)[0]
            for row in rows
        ]) - base
    estimate = scores[rows].numpy()
    zero, half = truth[0.0].numpy(), truth[0.5].numpy()
    return {
        "k": k,
        "seed": seed,
        "rows": rows,
        "kendall_tau": kendall_tau(estimate, zero),
        "pearson_r": _pearson(estimate, zero),
        "sign_agreement": float(np.mean(np.sign(estimate) == np.sign(zero))),
        "linearity_ceiling": {"kendall_tau": kendall_tau(zero, 2 * half), "pearson_r": _pearson(zero, 2 * half)},
        "estimate": estimate.tolist(),
        "truth": zero.tolist(),
        "truth_half": half.tolist(),
        "base_eval_loss": float(base),
        "replay_error": replay.report().max_rel,
        "seconds": time.perf_counter() - started,
    }
