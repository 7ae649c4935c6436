"""``--verify_subsets M --verify_fraction f ...``: the linear datamodeling score (LDS) by replay.

DESIGN.md section 2 (the counterfactual, here of a whole subset: every row of ``S`` at weight 0 at every
occurrence, everything else as recorded) and section 6b ("Trust"). For each fraction ``f``, ``M`` random
subsets of ``round(f N)`` training rows are retrained out together with ``--verify``'s rows and the base run
in the one batched retraining (:func:`.verify.evaluation_effects`), each subset at weight 0 and at weight
0.5. The scores predict ``L_val(theta^{-S}_T) - L_val(theta_T) ~= sum_{j in S} s_j`` (the sign of
:mod:`.objective`: a positive score is a row whose removal raises the evaluation loss).

* objective-level LDS: Spearman's rho across the ``M`` subsets between the measured change of the mean
  evaluation loss and ``sum_{j in S} s_j``, with a bootstrap interval over subsets;
* per-query LDS (the field's): for each of ``Q`` random evaluation rows, rho across the subsets between the
  change of that row's loss and the sum of its own per-query scores (one adjoint per query, carried as one
  block, :func:`~hf_accinf.engine.adjoint.adjoint_scores`), averaged over queries, with a bootstrap interval
  over queries;
* the subset linearity ceiling of each: the same statistic of ``2 x truth(S at 0.5)`` against
  ``truth(S at 0)``, how far any estimate linear in the weights can agree with the truth on this run.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import numpy as np
import torch
from scipy import stats

from ..errors import AccInfError
from .verify import (BOOTSTRAP_RESAMPLES, CONFIDENCE, bootstrap_interval, check_rows, check_scores, evaluation_effects,
                     found_leave_one_out, leave_one_out_scales, verify_report, verify_rows)

logger = logging.getLogger(__name__)

SUBSET_STREAM, QUERY_STREAM = 1, 2  # seed streams of --verify_seed, apart from --verify's rows


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (``nan`` when either side is constant or has fewer than 2 values)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


def subset_size(length: int, fraction: float) -> int:
    size = round(fraction * length)
    if not 1 <= size < length:
        raise AccInfError(f"--verify_fraction {fraction} of {length} rows gives subsets of {size} rows: choose a "
                          f"fraction that leaves between 1 and {length - 1} rows.")
    return size


def check_sizes(length: int, verify: int, subsets: int, fractions: list[float]) -> None:
    """Refuse, before any work, a ``--verify`` or ``--verify_subsets`` that ``length`` training rows cannot hold."""
    if verify and not 2 <= verify <= length:
        raise AccInfError(f"verify needs 2 <= k <= {length} rows, got k={verify}.")
    for fraction in fractions if subsets else ():
        subset_size(length, fraction)


def draw_subsets(length: int, fractions: list[float], count: int, seed: int) -> list[torch.Tensor]:
    """Per fraction, ``(count, round(f N))`` rows: ``count`` random subsets of distinct rows (seeded)."""
    sizes = [subset_size(length, f) for f in fractions]
    rng = np.random.default_rng((seed, SUBSET_STREAM))
    return [torch.as_tensor(np.stack([np.sort(rng.choice(length, size, replace=False)) for _ in range(count)]))
            for size in sizes]


def subset_scales(subsets: torch.Tensor, length: int, weight: float) -> torch.Tensor:
    """``(M, N)`` weight scales: row ``m`` puts the rows of ``subsets[m]`` at ``weight``, the others at 1."""
    scales = torch.ones(len(subsets), length, dtype=torch.float64)
    scales.scatter_(1, subsets, weight)
    return scales


def choose_queries(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` random evaluation rows among those with a label (sorted; all of them when fewer)."""
    valid = (torch.as_tensor(labels).cpu() >= 0).nonzero().flatten().numpy()
    rng = np.random.default_rng((seed, QUERY_STREAM))
    return torch.as_tensor(np.sort(rng.choice(valid, min(count, len(valid)), replace=False)), dtype=torch.long)


def _mean_interval(values: np.ndarray, seed: int, resamples: int = BOOTSTRAP_RESAMPLES,
                   confidence: float = CONFIDENCE) -> list[float] | None:
    """Percentile bootstrap interval of the mean of ``values`` (seeded); ``None`` below 2 values."""
    if len(values) < 2:
        return None
    picks = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    means = values[picks].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]


def objective_lds(predicted: np.ndarray, measured: np.ndarray, half: np.ndarray, seed: int) -> dict[str, Any]:
    """Spearman of ``predicted`` against ``measured`` across subsets, with its bootstrap interval, and the
    subset linearity ceiling (``2 x half`` against ``measured``)."""
    def part(estimate: np.ndarray) -> dict[str, Any]:
        return {"spearman": spearman(estimate, measured),
                "spearman_interval": bootstrap_interval(estimate, measured, seed, statistic=spearman)}

    return {**part(predicted), "linearity_ceiling": part(2 * half)}


def per_query_lds(predicted: np.ndarray, measured: np.ndarray, half: np.ndarray, seed: int) -> dict[str, Any]:
    """Per query (columns of the ``(M, Q)`` arrays), Spearman across the subsets; their mean with a bootstrap
    interval over queries, and the same for the ceiling. Queries whose truth is constant are left out."""
    def part(estimate: np.ndarray) -> dict[str, Any]:
        per_query = np.array([spearman(estimate[:, q], measured[:, q]) for q in range(measured.shape[1])])
        defined = per_query[np.isfinite(per_query)]
        return {"spearman": float(defined.mean()) if len(defined) else math.nan,
                "spearman_interval": _mean_interval(defined, seed), "per_query": per_query.tolist()}

    return {**part(predicted), "linearity_ceiling": part(2 * half)}


def select_evaluation_rows(inputs, rows: torch.Tensor):
    """The evaluation ``rows`` of a backend's evaluation inputs: a tensor's rows, or (the model backend's list
    of collated batches) one single-row batch per row, padded as its batch was."""
    if isinstance(inputs, torch.Tensor):
        return inputs[rows.to(inputs.device)]
    bounds = np.cumsum([0] + [len(next(iter(batch.values()))) for batch in inputs])
    found = []
    for row in rows.tolist():
        index = int(np.searchsorted(bounds, row, side="right")) - 1
        position = row - int(bounds[index])
        found.append({key: value[position:position + 1] for key, value in inputs[index].items()})
    return found


def query_gradients(curvature, parameters: dict[str, torch.Tensor], inputs, labels: torch.Tensor,
                    queries: torch.Tensor) -> torch.Tensor:
    """``(Q, P)``: the gradient of each query row's own loss at ``parameters`` (the backend's per-example
    gradients of the selected rows)."""
    return curvature.example_grads(parameters, select_evaluation_rows(inputs, queries), labels[queries])


def query_scores(form: str, method, problem, final: dict[str, torch.Tensor], inputs, labels: torch.Tensor,
                 queries: torch.Tensor, embeddings: torch.Tensor | None = None, progress: bool = True,
                 shard=None, policy=None) -> torch.Tensor | None:
    """``(Q, N)``: every training row's linear score for each query row's own loss, by the form that ran:
    one blocked adjoint pass, the forward form's embeddings (``(N, S)``, or this process's rows under ``shard``)
    dotted with each query's gradient, or (direct scorers) one pass per query. Under several processes every
    process takes part and the main process gets the result (``None`` elsewhere)."""
    from ..engine.adjoint import adjoint_scores
    from ..engine.sharding import ShardContext

    shard = shard or ShardContext.single()
    progress = progress and shard.is_main
    curvature = problem.curvature
    if form == "direct":
        return torch.stack([method.scores(lambda step, q=q: query_gradients(
            curvature, curvature.parameters_at(step), inputs, labels, q[None])[0], progress, shard=shard)
            for q in queries])
    gradients = method.embed_gradient(query_gradients(curvature, final, inputs, labels, queries))
    if form == "forward":
        own = gradients.to(embeddings.dtype) @ embeddings.T  # (Q, this process's rows)
        if shard.world_size == 1:
            return own
        gathered = shard.gather_rows(own.T.contiguous(), problem.num_samples).T
        return gathered if shard.is_main else None
    backward = adjoint_scores(method, problem, gradients, shard=shard, progress=progress, policy=policy)  # the hybrid too
    return backward.scores if backward is not None else None


def check_by_replay(run, train_dataset, collate_fn: Callable | None, eval_dataset, scores, *, verify: int = 0,
                    subsets: int = 0, fractions: list[float] = (), seed: int = 0,
                    queries: torch.Tensor | None = None, per_query: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    eval_collate_fn: Callable | None = None, device: str = "cpu", memory_budget: int = 2**30,
                    progress: bool = True, model=None, shard=None) -> tuple[dict | None, dict | None, torch.Tensor | None]:
    """``--verify`` and ``--verify_subsets`` in one batched retraining (one base run per chunk for both).

    ``shard`` (several processes): every process takes part in ``per_query`` and in the retraining (each its
    block of the counterfactuals, :func:`.verify.evaluation_effects`); the main process, the only one that
    holds ``scores``, returns the reports (``(None, None, None)`` elsewhere).

    ``queries``: evaluation rows for the per-query LDS (:func:`choose_queries`) and ``per_query(queries)`` their
    ``(Q, N)`` scores (:func:`query_scores`); without them only the objective-level LDS is reported.
    Returns ``(verify, lds, query scores)``: :func:`~.verify.verify`'s report (``None`` without ``verify``), the
    LDS report (``None`` without ``subsets``) and the per-query scores (``None`` without queries).
    """
    from ..engine.sharding import ShardContext

    shard = shard or ShardContext.single()
    length = len(train_dataset)
    if shard.is_main:
        scores = check_scores(scores, length)
    if not verify and not subsets:
        raise AccInfError("Nothing to check: pass verify (rows) or subsets (with fractions).")
    if subsets and subsets < 3:
        raise AccInfError(f"--verify_subsets needs at least 3 subsets for a rank correlation, got {subsets}.")
    drawn = draw_subsets(length, list(fractions), subsets, seed) if subsets else []
    rows = verify_rows(length, verify, seed) if verify else None
    started = time.perf_counter()
    scored = None
    if drawn and queries is not None and len(queries) and per_query is not None:
        scored = per_query(queries)
        scored = scored.detach().double().cpu() if scored is not None else None
        if scored is not None and scored.shape != (len(queries), length):
            raise AccInfError(f"per-query scores must be (Q, N) = ({len(queries)}, {length}), got {tuple(scored.shape)}.")
    query_seconds = time.perf_counter() - started
    parts = [leave_one_out_scales(check_rows(rows, length), length)] if rows is not None else []
    parts += [subset_scales(chosen, length, 0.0) for chosen in drawn] + [subset_scales(chosen, length, 0.5)
                                                                         for chosen in drawn]
    logger.info("retraining the base run, %d verify rows (weight 0 and 0.5) and %d subsets (weight 0 and 0.5) "
                "together by replay", verify, subsets * len(drawn))
    found = evaluation_effects(run, train_dataset, collate_fn, eval_dataset, torch.cat(parts), eval_collate_fn, device,
                               memory_budget, progress, model, description="verify" if not drawn else "verify+lds",
                               shard=shard)
    if not shard.is_main:
        return None, None, None
    verified = verify_report(scores, found_leave_one_out(rows, found), seed, found.seconds) if rows is not None else None
    if not drawn:
        return verified, None, scored
    offset = 2 * verify
    total = subsets * len(drawn)
    zero, half = found.effects[offset:offset + total], found.effects[offset + total:offset + 2 * total]
    reports = []
    for index, (fraction, chosen) in enumerate(zip(fractions, drawn)):
        block = slice(index * subsets, (index + 1) * subsets)
        measured, measured_half = found.mean(zero[block]).numpy(), found.mean(half[block]).numpy()
        predicted = scores[chosen].sum(1).numpy()
        report = {"fraction": float(fraction), "size": int(chosen.shape[1]),
                  "objective": objective_lds(predicted, measured, measured_half, seed),
                  "predicted": predicted.tolist(), "measured": measured.tolist(), "measured_half": measured_half.tolist()}
        if scored is not None:
            predicted_per_query, measured_per_query = scored[:, chosen].sum(2).T, zero[block][:, queries]
            report["per_query"] = per_query_lds(predicted_per_query.numpy(), measured_per_query.numpy(),
                                                half[block][:, queries].numpy(), seed)
            report["predicted_per_query"] = predicted_per_query.tolist()  # (M, Q)
            report["measured_per_query"] = measured_per_query.tolist()
        reports.append(report)
    lds = {"subsets": subsets, "seed": seed, "queries": queries.tolist() if scored is not None else [],
           "fractions": reports, "counterfactuals": len(found.effects), "models_per_chunk": found.models_per_chunk,
           "base_eval_loss": float(found.mean(found.base_losses)), "replay_error": found.replay_error,
           "retraining_seconds": found.seconds, "query_scores_seconds": query_seconds}
    return verified, lds, scored


def describe(lds: dict[str, Any]) -> list[str]:
    """Lines for people: per fraction, the objective-level and per-query LDS with intervals and ceilings."""
    def figure(part: dict[str, Any]) -> str:
        interval = part.get("spearman_interval")
        bounds = f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""
        return f"{part['spearman']:.3f}{bounds}"

    lines = []
    for report in lds["fractions"]:
        objective = report["objective"]
        line = (f"LDS at {report['fraction']:g} ({lds['subsets']} subsets of {report['size']} rows retrained out): "
                f"objective {figure(objective)} (ceiling {figure(objective['linearity_ceiling'])})")
        if report.get("per_query"):
            queries = report["per_query"]
            line += (f"; per-query over {len(lds['queries'])} queries {figure(queries)} "
                     f"(ceiling {figure(queries['linearity_ceiling'])})")
        lines.append(line + "; Spearman, 95% bootstrap intervals")
    return lines


def pruning_check(run, train_dataset, collate_fn: Callable | None, eval_dataset, scores, dropped, *,
                  query_scores: torch.Tensor | None = None, queries: torch.Tensor | None = None, seed: int = 0,
                  eval_collate_fn: Callable | None = None, device: str = "cpu", memory_budget: int = 2**30,
                  progress: bool = True, model=None) -> dict[str, Any]:
    """``prune --check``: the run retrained by replay without the ``dropped`` rows (weight 0), in the one batched
    retraining with the base run; the measured change of the mean evaluation loss against the predicted one
    (the sum of the dropped rows' scores).

    With ``query_scores`` ``(Q, N)`` of the evaluation rows ``queries`` (``query_scores.safetensors`` of
    ``--verify_subsets``), also the QLD-style figure: each query retrained without its own most influential
    rows, as many as were dropped (the highest per-query scores: the rows whose removal the scores say raises
    that query's loss most), and the rise of that query's loss, averaged over queries; beside it the rise
    predicted by the scores and the rise for as many random rows (seeded), retrained in the same batch.
    """
    length = len(train_dataset)
    scores = check_scores(scores, length)
    dropped = check_rows(dropped, length)
    count = len(dropped)
    parts = [subset_scales(dropped[None], length, 0.0)]
    if query_scores is not None:
        query_scores = torch.as_tensor(query_scores, dtype=torch.float64).cpu()
        queries = torch.as_tensor(queries, dtype=torch.long)
        if query_scores.shape != (len(queries), length):
            raise AccInfError(f"query scores must be (Q, N) = ({len(queries)}, {length}), got {tuple(query_scores.shape)}.")
        top = query_scores.topk(count, dim=1).indices  # (Q, k): each query's most influential rows
        rng = np.random.default_rng((seed, SUBSET_STREAM))
        random = torch.as_tensor(np.stack([rng.choice(length, count, replace=False) for _ in queries]))
        parts += [subset_scales(top, length, 0.0), subset_scales(random, length, 0.0)]
    found = evaluation_effects(run, train_dataset, collate_fn, eval_dataset, torch.cat(parts), eval_collate_fn, device,
                               memory_budget, progress, model, description="prune --check")
    report = {"dropped": count, "predicted": float(scores[dropped].sum()), "measured": float(found.mean(found.effects[:1])[0]),
              "base_eval_loss": float(found.mean(found.base_losses)), "replay_error": found.replay_error,
              "seconds": found.seconds}
    if query_scores is not None:
        own = torch.arange(len(queries))
        rise = found.effects[1:1 + len(queries)][own, queries]
        random_rise = found.effects[1 + len(queries):][own, queries]
        report["qld"] = {"queries": queries.tolist(), "rows_per_query": count, "mean_rise": float(rise.mean()),
                         "predicted_mean_rise": float(query_scores.gather(1, top).sum(1).mean()),
                         "random_mean_rise": float(random_rise.mean()), "rise": rise.tolist(),
                         "random_rise": random_rise.tolist()}
    return report


def describe_pruning_check(report: dict[str, Any]) -> list[str]:
    """Lines for people: predicted against measured, and the QLD-style figure."""
    lines = [f"check: retrained without the {report['dropped']} dropped rows, the mean evaluation loss changes by "
             f"{report['measured']:+.4g} (predicted {report['predicted']:+.4g} by the sum of their scores; base loss "
             f"{report['base_eval_loss']:.4g})"]
    qld = report.get("qld")
    if qld:
        lines.append(f"QLD: retrained without its own {qld['rows_per_query']} most influential rows (highest per-query "
                     f"scores), a query's loss rises by {qld['mean_rise']:+.4g} on average over {len(qld['queries'])} "
                     f"queries (predicted {qld['predicted_mean_rise']:+.4g}; as many random rows: "
                     f"{qld['random_mean_rise']:+.4g})")
    return lines
