"""The cleansing check (the paper's section 6.5): does removing the rows a score column flags as harmful
help more than removing as many rows at random, or by another column?

Each ranking drops the same number of rows (:func:`hf_accinf.data.prune.select_rows`, most harmful
first), the user's training recipe retrains on what is left, and the recipe's test accuracy is
reported (and its test loss, when the recipe returns both). With injected label noise
(:func:`inject_label_noise`), each ranking's recall of the noisy rows among the flagged ones is reported
too (:func:`noisy_recall`; a random ranking's expected recall is the dropped fraction). Several seeds'
reports are summarized row by row as mean and standard deviation (:func:`summarize_seeds`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from datasets import Dataset

from ..errors import AccInfError
from .prune import ranking_values, select_rows

RANDOM = "random"
NONE = "none (all rows)"


def inject_label_noise(dataset: Dataset, fraction: float, num_labels: int, seed: int = 0,
                       label_column: str = "labels") -> tuple[Dataset, np.ndarray]:
    """A copy of ``dataset`` with the labels of a random ``fraction`` of rows moved to another class,
    and the sorted indices of those rows."""
    if not 0.0 < fraction < 1.0:
        raise AccInfError(f"Label noise fraction {fraction} must lie in (0, 1).")
    if label_column not in dataset.column_names:
        raise AccInfError(f"No label column '{label_column}' in {dataset.column_names}: name it with --label_column.")
    if num_labels < 2:
        raise AccInfError(f"Label noise needs at least 2 classes, not {num_labels}.")
    labels = np.asarray(dataset.with_format("numpy")[label_column]).astype(np.int64)
    rng = np.random.default_rng(seed)
    noisy = np.sort(rng.choice(len(labels), size=int(round(fraction * len(labels))), replace=False))
    labels[noisy] = (labels[noisy] + rng.integers(1, num_labels, size=len(noisy))) % num_labels
    form = dataset.format
    staging = f"_{label_column}_with_noise"
    noisy_dataset = (dataset.add_column(staging, labels.tolist()).remove_columns(label_column)
                     .rename_column(staging, label_column).cast_column(label_column, dataset.features[label_column]))
    return noisy_dataset.with_format(form["type"], columns=form["columns"], output_all_columns=form["output_all_columns"],
                                     **form["format_kwargs"]), noisy


def noisy_recall(dropped: np.ndarray, noisy_rows: np.ndarray) -> tuple[float, float]:
    """``(recall, precision)`` of the noisy rows among the dropped ones: the share of the noisy rows that
    were dropped, and the share of the dropped rows that are noisy (0 for an empty side)."""
    hits = len(np.intersect1d(np.asarray(dropped), np.asarray(noisy_rows)))
    return (hits / len(noisy_rows) if len(noisy_rows) else 0.0, hits / len(dropped) if len(dropped) else 0.0)


@dataclass
class CleansingRow:
    ranking: str
    removed: int
    test_accuracy: float
    noisy_recall: float | None  # share of the noisy rows among the removed ones
    noisy_precision: float | None  # share of the removed rows that are noisy
    test_loss: float | None = None  # when the recipe returns (accuracy, loss)


@dataclass
class CleansingReport:
    rows: list[CleansingRow]

    def to_dict(self) -> dict:
        return {"rows": [asdict(row) for row in self.rows]}

    def to_markdown(self) -> str:
        lines = ["| ranking | rows removed | test accuracy | noisy rows recalled | removed rows noisy |", "|---|---|---|---|---|"]
        for row in self.rows:
            recall = "" if row.noisy_recall is None else f"{row.noisy_recall:.3f}"
            precision = "" if row.noisy_precision is None else f"{row.noisy_precision:.3f}"
            lines.append(f"| {row.ranking} | {row.removed} | {row.test_accuracy:.4f} | {recall} | {precision} |")
        return "\n".join(lines)

    def row(self, ranking: str) -> CleansingRow:
        return next(row for row in self.rows if row.ranking == ranking)


def flagged_rows(dataset: Dataset, column: str, drop_fraction: float) -> np.ndarray:
    """The rows ``column`` flags: the most harmful ``drop_fraction`` of them, most harmful first."""
    return select_rows(ranking_values(dataset, [column]), drop_fraction=drop_fraction)[1]


def _measure(train_and_evaluate: Callable, rows: Dataset) -> tuple[float, float | None]:
    measured = train_and_evaluate(rows)
    if isinstance(measured, tuple):
        return float(measured[0]), float(measured[1])
    return float(measured), None


def cleansing_check(dataset: Dataset, columns: list[str], drop_fraction: float,
                    train_and_evaluate: Callable[[Dataset], float | tuple[float, float]],
                    noisy_rows: np.ndarray | None = None, random_draws: int = 1, seed: int = 0,
                    baseline: bool = True) -> CleansingReport:
    """Retrain with ``train_and_evaluate`` (the recipe: rows in, test accuracy or ``(accuracy, loss)`` out)
    without the rows each column in ``columns`` flags, without as many random rows (``random_draws`` times),
    and on all rows (``baseline``)."""
    if not 0.0 < drop_fraction < 1.0:
        raise AccInfError(f"drop_fraction {drop_fraction} must lie in (0, 1).")
    flagged = {column: flagged_rows(dataset, column, drop_fraction) for column in columns}  # refuses bad columns first
    removed = int(np.floor(drop_fraction * len(dataset)))
    rng = np.random.default_rng(seed)
    sets = list(flagged.items()) + [(RANDOM, rng.permutation(len(dataset))[:removed]) for _ in range(random_draws)]
    rows = []
    if baseline:
        accuracy, loss = _measure(train_and_evaluate, dataset)
        rows.append(CleansingRow(NONE, 0, accuracy, None, None, loss))
    noisy = None if noisy_rows is None or len(noisy_rows) == 0 else np.asarray(noisy_rows)
    for ranking, dropped in sets:
        keep = np.setdiff1d(np.arange(len(dataset)), dropped)
        accuracy, loss = _measure(train_and_evaluate, dataset.select(keep))
        recall, precision = (None, None) if noisy is None else noisy_recall(dropped, noisy)
        rows.append(CleansingRow(ranking, len(dropped), accuracy, recall, precision if len(dropped) else None, loss))
    random_rows = [row for row in rows if row.ranking == RANDOM]
    if len(random_rows) > 1:  # one row: the mean over the draws
        rows = [row for row in rows if row.ranking != RANDOM]
        mean = lambda key: None if getattr(random_rows[0], key) is None else float(np.mean([getattr(r, key) for r in random_rows]))  # noqa: E731
        rows.append(CleansingRow(f"{RANDOM} (mean of {len(random_rows)})", removed, mean("test_accuracy"),
                                 mean("noisy_recall"), mean("noisy_precision"), mean("test_loss")))
    return CleansingReport(rows)


@dataclass
class SeedSummary:
    """One ranking at one removal size over seeds: mean and standard deviation (ddof 1; 0 for one seed)."""

    ranking: str
    removed: int
    seeds: int
    accuracy: tuple[float, float]
    loss: tuple[float, float] | None
    recall: tuple[float, float] | None

    def to_dict(self) -> dict:
        return asdict(self)


def _mean_std(values: list[float | None]) -> tuple[float, float] | None:
    if not values or any(v is None for v in values):
        return None
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def summarize_seeds(reports: Sequence[CleansingReport]) -> list[SeedSummary]:
    """Each (ranking, rows removed) of ``reports`` (one per seed) as mean and std over the seeds that have it,
    in the order first seen."""
    groups: dict[tuple[str, int], list[CleansingRow]] = {}
    for report in reports:
        for row in report.rows:
            groups.setdefault((row.ranking, row.removed), []).append(row)
    return [SeedSummary(ranking, removed, len(rows), _mean_std([r.test_accuracy for r in rows]),
                        _mean_std([r.test_loss for r in rows]), _mean_std([r.noisy_recall for r in rows]))
            for (ranking, removed), rows in groups.items()]
