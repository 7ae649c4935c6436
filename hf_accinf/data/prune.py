"""Pruning a scored dataset: drop the most harmful rows, or keep the most helpful ones.

The ranking is one score column, or a weighted mix of columns made comparable by rank
normalization: each column's rows are ranked (most harmful 0, most helpful 1, ties averaged) and the
ranks are mixed with the given weights. Scores follow DESIGN.md section 1's sign (> 0 helpful, < 0
harmful). The pruned dataset keeps the original row order and records in its provenance which rows
were dropped (original indices and their ranking values) and by which rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset

from ..errors import AccInfError
from .columns import read_provenance, score_columns, with_provenance


@dataclass
class PruneArguments:
    """What to drop or keep, and by which column(s)."""

    columns: list[str] = field(default_factory=list, metadata={"help": "Score column(s) ranking the rows; default: the only score column."})
    weights: list[float] | None = field(default=None, metadata={"help": "One weight per column for a rank-normalized mix (default: equal)."})
    drop_fraction: float | None = field(default=None, metadata={"help": "Drop this fraction of rows, most harmful first (0 <= f < 1)."})
    keep_top: int | None = field(default=None, metadata={"help": "Keep only the k most helpful rows."})
    check: bool = field(default=False, metadata={
        "help": "Retrain the scored run by replay without the dropped rows (their weight 0, everything else as "
                "recorded) and print the measured change of the mean evaluation loss against the predicted one (the "
                "sum of their scores), and the QLD-style figure when the scores have per-query scores "
                "(score --verify_subsets). Needs the run and the data the scores were made from (the scores' "
                "scores.json names the run; --train_data/--eval_data as given to score); about one training run's time "
                "per retrained model batch."})

    def __post_init__(self) -> None:
        if (self.drop_fraction is None) == (self.keep_top is None):
            raise AccInfError("Give exactly one of --drop_fraction (e.g. 0.1) or --keep_top (e.g. 1000).")
        if self.drop_fraction is not None and not (0.0 <= self.drop_fraction < 1.0):
            raise AccInfError(f"--drop_fraction {self.drop_fraction} must lie in [0, 1): the fraction of rows to drop.")
        if self.keep_top is not None and self.keep_top < 1:
            raise AccInfError(f"--keep_top {self.keep_top} must be a positive number of rows.")
        if self.weights is not None:
            if len(self.weights) != len(self.columns):
                raise AccInfError(f"{len(self.weights)} weights for {len(self.columns)} columns: give one weight per column.")
            if any(not math.isfinite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise AccInfError(f"--weights {self.weights} must be non-negative and not all zero.")


def rank_normalize(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (lowest value 0, highest 1; tied values share their mean rank)."""
    from scipy.stats import rankdata

    if len(values) < 2:
        return np.full(len(values), 0.5)
    return (rankdata(values, method="average") - 1.0) / (len(values) - 1.0)


def ranking_values(dataset: Dataset, columns: list[str], weights: list[float] | None = None) -> np.ndarray:
    """Per-row value ordering the rows, higher = more helpful: the column itself, or the weighted mix of ranks."""
    missing = [c for c in columns if c not in dataset.column_names]
    if not columns or missing:
        raise AccInfError(f"Unknown score column(s) {missing or columns}: the dataset has {dataset.column_names}.")
    matrix = np.stack([np.asarray(dataset.with_format("numpy")[c], dtype=np.float64) for c in columns])
    if matrix.ndim != 2:
        raise AccInfError(f"Columns {columns} are not one number per row: pass score columns.")
    bad = [c for c, row in zip(columns, matrix) if not np.isfinite(row).all()]
    if bad:
        raise AccInfError(f"Column(s) {bad} hold NaN or infinite scores: rescore the run before pruning.")
    if len(columns) == 1:
        return matrix[0]
    weights = np.asarray(weights if weights is not None else [1.0] * len(columns), dtype=np.float64)
    ranks = np.stack([rank_normalize(row) for row in matrix])
    return weights @ ranks / weights.sum()


def select_rows(values: np.ndarray, drop_fraction: float | None = None, keep_top: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, dropped)`` row indices: kept in original order, dropped most harmful (lowest value) first."""
    harmful_first = np.argsort(values, kind="stable")
    if keep_top is not None:
        if keep_top > len(values):
            raise AccInfError(f"--keep_top {keep_top} exceeds the {len(values)} rows of the dataset.")
        num_dropped = len(values) - keep_top
    else:
        num_dropped = int(math.floor(drop_fraction * len(values)))
    dropped = harmful_first[:num_dropped]
    return np.sort(harmful_first[num_dropped:]), dropped


def prune_dataset(dataset: Dataset, args: PruneArguments) -> Dataset:
    """The rows of ``dataset`` that survive ``args``, with what was dropped and why in its provenance."""
    columns = args.columns or _only_score_column(dataset)
    values = ranking_values(dataset, columns, args.weights)
    kept, dropped = select_rows(values, args.drop_fraction, args.keep_top)
    mix = "" if len(columns) == 1 else f" (rank-normalized mix, weights {args.weights or [1.0] * len(columns)})"
    rule = (f"the {len(dropped)} most harmful rows by {', '.join(columns)}{mix}" if args.keep_top is None
            else f"kept the {args.keep_top} most helpful rows by {', '.join(columns)}{mix}")
    provenance = read_provenance(dataset)
    provenance["prune"] = {
        "rule": rule, "columns": columns, "weights": args.weights, "drop_fraction": args.drop_fraction,
        "keep_top": args.keep_top, "num_rows_before": len(dataset), "num_dropped": len(dropped),
        "dropped_rows": dropped.tolist(), "dropped_values": values[dropped].tolist(),
        "earlier": provenance.get("prune"),
    }
    return with_provenance(dataset.select(kept), provenance)


def _only_score_column(dataset: Dataset) -> list[str]:
    found = score_columns(dataset)
    if len(found) != 1:
        raise AccInfError(f"Choose the ranking with --columns: the dataset has score columns {found or 'none'}.")
    return found
