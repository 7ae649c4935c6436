"""``--verify K``: the agreement of the scores with exact leave-one-out retraining of ``K`` random rows.

DESIGN.md section 2 (the counterfactual: row ``j``'s loss weight changed at every occurrence, the divisor,
batch order, learning rates and dropout masks unchanged) and section 6b ("Trust"). The base run and the
``2K`` counterfactuals (each chosen row at weight 0 and at weight 0.5) are retrained together by
:class:`~.retraining.BatchedRetraining` (one vmapped run, the same code for every row), and each model's
mean evaluation cross-entropy is taken the same way. ``truth(0)`` is the exact effect of removing the row,
``scores`` estimate it (``s_j ~= L_val(theta^{-j}_T) - L_val(theta_T)``); ``truth(0)`` against
``2 x truth(0.5)`` is the linearity ceiling: how far any first-order estimate can agree with the truth on
this run. Kendall tau comes with a seeded bootstrap interval over the ``K`` rows, for the estimate and for
the ceiling: with ``K = 10`` one swapped pair moves tau by 0.044.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from scipy import stats

from ..errors import AccInfError
from ..inputs.evaluation import evaluation_batches
from ..trajectory import RunReader
from ..evaluation.metrics import kendall_tau
from .retraining import BatchedRetraining

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(stats.pearsonr(a, b).statistic)


def bootstrap_interval(a: np.ndarray, b: np.ndarray, seed: int, resamples: int = BOOTSTRAP_RESAMPLES,
                       confidence: float = CONFIDENCE,
                       statistic: Callable[[np.ndarray, np.ndarray], float] = kendall_tau) -> list[float] | None:
    """Percentile bootstrap interval of ``statistic`` (Kendall tau) between ``a`` and ``b`` over rows resampled in
    pairs (seeded). Resamples where it is undefined (one side constant) are left out; ``None`` when most of them are."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(a), size=(resamples, len(a)))
    taus = np.array([statistic(a[pick], b[pick]) for pick in picks])
    taus = taus[np.isfinite(taus)]
    if len(taus) < resamples / 2:
        return None
    tail = 100 * (1 - confidence) / 2
    return [float(np.percentile(taus, tail)), float(np.percentile(taus, 100 - tail))]


@dataclass
class LeaveOneOutEffects:
    """Exact changes of the mean evaluation loss with each row at weight 0 (``zero``) and 0.5 (``half``)."""

    rows: torch.Tensor
    zero: torch.Tensor
    half: torch.Tensor
    base_loss: float  # the retrained base run's mean evaluation loss
    replay_error: float | None  # the base run against the recorded checkpoints, relative to their movement
    loss_error: float | None  # the base run's step losses against the recorded ones (relative)
    models_per_chunk: int


@dataclass
class EvaluationEffects:
    """Exact changes of every evaluation row's loss (``effects``, ``(M, E)``, 0 on rows labelled ``-100``) for
    each row of the weight scales retrained, each against the base run of its own chunk."""

    effects: torch.Tensor
    valid: torch.Tensor  # (E,) float64: 1 where the evaluation row counts in the mean loss
    base_losses: torch.Tensor  # (E,) the retrained base run's loss on every evaluation row (first chunk)
    replay_error: float | None
    loss_error: float | None
    models_per_chunk: int
    seconds: float

    def mean(self, effects: torch.Tensor | None = None) -> torch.Tensor:
        """The change of the mean evaluation loss of each row of ``effects`` (default: all)."""
        return (self.effects if effects is None else effects) @ self.valid / self.valid.sum()


def evaluation_effects(run: RunReader, train_dataset, collate_fn: Callable | None, eval_dataset,
                       weight_scales: torch.Tensor, eval_collate_fn: Callable | None = None, device: str = "cpu",
                       memory_budget: int = 2**30, progress: bool = True, model=None,
                       description: str = "verify", shard=None) -> EvaluationEffects:
    """Retrain the base run and one counterfactual per row of ``weight_scales`` ``(M, N)`` in one batched
    retraining and return the exact change of each evaluation row's cross-entropy (eval mode, float64, on the host).

    ``shard`` (several processes): each retrains its block of the ``M`` rows with a base run of its own, and every
    process gets all ``M`` effects (gathered; only ``(M, E)`` numbers travel)."""
    from ..engine.sharding import ShardContext

    shard = shard or ShardContext.single()
    lo, hi = shard.items_of(len(weight_scales))
    part = None
    if hi > lo:
        retraining = BatchedRetraining(run, train_dataset, collate_fn, device, memory_budget, model)
        batches = evaluation_batches(retraining.model, eval_dataset, eval_collate_fn, device=device)
        valid = torch.cat([labels.cpu() >= 0 for _, labels in batches]).double()
        if not valid.any():
            raise AccInfError("Every evaluation row is ignored (label -100): the evaluation loss is undefined.")
        result = retraining.retrain(weight_scales[lo:hi], lambda parameters: retraining.losses(parameters, batches),
                                    with_base=True, progress=progress and shard.is_main, description=description)
        part = EvaluationEffects(result.effect().double().cpu(), valid, result.base[0].double().cpu(),
                                 result.replay_error, result.loss_error, result.models_per_chunk, result.seconds)
    if shard.world_size == 1:
        return part
    found = [found for found in shard.all_gather_object(part) if found is not None]
    first = found[0]
    return EvaluationEffects(torch.cat([found.effects for found in found]), first.valid, first.base_losses,
                             first.replay_error, first.loss_error, first.models_per_chunk,
                             max(found.seconds for found in found))


def check_rows(rows, length: int) -> torch.Tensor:
    """``rows`` as distinct training row indices in ``[0, length)`` (refused otherwise)."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    if rows.dim() != 1 or len(rows) == 0 or len(rows.unique()) != len(rows) or not (0 <= rows).all() \
            or not (rows < length).all():
        raise AccInfError(f"rows must be distinct training row indices in [0, {length}), got {rows.tolist()}.")
    return rows


def leave_one_out_scales(rows: torch.Tensor, length: int) -> torch.Tensor:
    """``(2K, N)``: each of ``rows`` at weight 0, then each at weight 0.5."""
    count = len(rows)
    scales = torch.ones(2 * count, length, dtype=torch.float64)
    scales[torch.arange(count), rows] = 0.0
    scales[torch.arange(count, 2 * count), rows] = 0.5
    return scales


def leave_one_out_effects(run: RunReader, train_dataset, collate_fn: Callable | None, eval_dataset, rows,
                          eval_collate_fn: Callable | None = None, device: str = "cpu", memory_budget: int = 2**30,
                          progress: bool = True, model=None) -> LeaveOneOutEffects:
    """Retrain the base run and each of ``rows`` at weight 0 and at weight 0.5 in one batched retraining and
    return the exact changes of the mean evaluation cross-entropy (eval mode, float64), each against the base
    run retrained in the same chunk."""
    rows = check_rows(rows, len(train_dataset))
    found = evaluation_effects(run, train_dataset, collate_fn, eval_dataset, leave_one_out_scales(rows, len(train_dataset)),
                               eval_collate_fn, device, memory_budget, progress, model)
    return found_leave_one_out(rows, found)


def found_leave_one_out(rows: torch.Tensor, found: EvaluationEffects, offset: int = 0) -> LeaveOneOutEffects:
    """The leave-one-out part of ``found``: rows ``offset + [0, 2K)`` of its effects (:func:`leave_one_out_scales`)."""
    count = len(rows)
    effect = found.mean(found.effects[offset:offset + 2 * count])
    return LeaveOneOutEffects(rows, effect[:count], effect[count:], float(found.mean(found.base_losses)),
                              found.replay_error, found.loss_error, found.models_per_chunk)


def verify(run: RunReader, train_dataset, collate_fn: Callable | None, eval_dataset, scores, k: int, seed: int = 0,
           eval_collate_fn: Callable | None = None, device: str = "cpu", memory_budget: int = 2**30,
           progress: bool = True, model=None, shard=None) -> dict[str, Any] | None:
    """Retrain ``k`` random rows out (and at half weight) with the base run in one batched retraining, and
    report the agreement of ``scores`` with the exact changes of the mean evaluation loss.

    Returns Kendall tau (with a bootstrap interval), Pearson r and sign agreement of ``scores[rows]`` against
    ``truth(0)``; the linearity ceiling (tau with its interval, and r, of ``truth(0)`` against
    ``2 x truth(0.5)``); the rows and values; the base run's evaluation loss; the base run's relative error
    at the recorded checkpoints (``replay_error``) and the wall time.

    ``shard`` (several processes, docs/ENGINE.md "Many processes"): each process retrains its block of the ``k``
    rows (with a base run of its own), the effects are gathered, and the main process, the only one that needs
    ``scores``, returns the result (``None`` elsewhere).
    """
    from .lds import check_by_replay  # the one path for --verify and --verify_subsets (lds imports this module)

    return check_by_replay(run, train_dataset, collate_fn, eval_dataset, scores, verify=k, seed=seed,
                           eval_collate_fn=eval_collate_fn, device=device, memory_budget=memory_budget,
                           progress=progress, model=model, shard=shard)[0]


def check_scores(scores, length: int) -> torch.Tensor:
    """``scores`` as a float64 ``(N,)`` tensor on the CPU (refused otherwise)."""
    scores = torch.as_tensor(np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores),
                             dtype=torch.float64)
    if scores.shape != (length,):
        raise AccInfError(f"scores must hold one value per training row ({length}), got shape {tuple(scores.shape)}.")
    return scores


def verify_rows(length: int, k: int, seed: int) -> torch.Tensor:
    """The ``k`` random rows ``--verify`` retrains (seeded), sorted."""
    if not 2 <= k <= length:
        raise AccInfError(f"verify needs 2 <= k <= {length} rows, got k={k}.")
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def verify_report(scores: torch.Tensor, effects: LeaveOneOutEffects, seed: int, seconds: float) -> dict[str, Any]:
    """:func:`verify`'s result from the scores and the exact effects of its rows."""
    rows, k = effects.rows, len(effects.rows)
    estimate, zero, half = scores[rows].numpy(), effects.zero.numpy(), effects.half.numpy()
    return {
        "k": k,
        "seed": seed,
        "rows": rows.tolist(),
        "kendall_tau": kendall_tau(estimate, zero),
        "kendall_tau_interval": bootstrap_interval(estimate, zero, seed),
        "pearson_r": _pearson(estimate, zero),
        "sign_agreement": float(np.mean(np.sign(estimate) == np.sign(zero))),
        "linearity_ceiling": {"kendall_tau": kendall_tau(zero, 2 * half),
                              "kendall_tau_interval": bootstrap_interval(zero, 2 * half, seed),
                              "pearson_r": _pearson(zero, 2 * half)},
        "estimate": estimate.tolist(),
        "truth": zero.tolist(),
        "truth_half": half.tolist(),
        "base_eval_loss": effects.base_loss,
        "replay_error": effects.replay_error,
        "replay_loss_error": effects.loss_error,
        "models_per_chunk": effects.models_per_chunk,
        "seconds": seconds,
    }


def describe(check: dict[str, Any]) -> str:
    """One line for people: the agreement of :func:`verify`'s result with its bootstrap intervals and ceiling."""
    def tau(part: dict[str, Any]) -> str:
        interval = part.get("kendall_tau_interval")
        bounds = f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""
        return f"{part['kendall_tau']:.3f}{bounds}"

    return (f"on {check['k']} rows retrained out: Kendall tau {tau(check)}, Pearson r {check['pearson_r']:.3f}, sign "
            f"agreement {check['sign_agreement']:.2f} (linearity ceiling tau {tau(check['linearity_ceiling'])}; "
            f"95% bootstrap intervals)")
