"""The cleansing check (the paper's section 6.5): does removing the rows a score column flags as harmful
help more than removing as many rows at random, or by another column?

Each ranking drops the same number of rows (:func:`hf_accinf.data.prune.select_rows`, most harmful
first), the user's training recipe retrains on what is left, and the recipe's test accuracy is
reported. With injected label noise (:func:`inject_label_noise`), each ranking's recall of the noisy
rows among the flagged ones is reported too (a random ranking's expected recall is the dropped fraction).
"""

from __future__ import annotations

from collections.abc import Callable
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
    return noisy_dataset.with_format(form["type"], columns=form["columns"], **form["format_kwargs"]), noisy


@dataclass
class CleansingRow:
    ranking: str
    removed: int
    test_accuracy: float
    noisy_recall: float | None  # share of the noisy rows among the removed ones
    noisy_precision: float | None  # share of the removed rows that are noisy


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


def cleansing_check(dataset: Dataset, columns: list[str], drop_fraction: float,
                    train_and_evaluate: Callable[[Dataset], float], noisy_rows: np.ndarray | None = None,
                    random_draws: int = 1, seed: int = 0, baseline: bool = True) -> CleansingReport:
    """Retrain with ``train_and_evaluate`` (the recipe: rows in, test accuracy out) without the rows each
    column in ``columns`` flags, without as many random rows (``random_draws`` times), and on all rows."""
    if not 0.0 < drop_fraction < 1.0:
        raise AccInfError(f"drop_fraction {drop_fraction} must lie in (0, 1).")
    flagged = {column: flagged_rows(dataset, column, drop_fraction) for column in columns}  # refuses bad columns first
    removed = int(np.floor(drop_fraction * len(dataset)))
    rng = np.random.default_rng(seed)
    sets = list(flagged.items()) + [(RANDOM, rng.permutation(len(dataset))[:removed]) for _ in range(random_draws)]
    rows = [CleansingRow(NONE, 0, float(train_and_evaluate(dataset)), None, None)] if baseline else []
    noisy = set() if noisy_rows is None else set(np.asarray(noisy_rows).tolist())
    for ranking, dropped in sets:
        keep = np.setdiff1d(np.arange(len(dataset)), dropped)
        accuracy = float(train_and_evaluate(dataset.select(keep)))
        hits = len(noisy & set(dropped.tolist()))
        rows.append(CleansingRow(ranking, len(dropped), accuracy, hits / len(noisy) if noisy else None,
                                 hits / len(dropped) if noisy and len(dropped) else None))
    random_rows = [row for row in rows if row.ranking == RANDOM]
    if len(random_rows) > 1:  # one row: the mean over the draws
        rows = [row for row in rows if row.ranking != RANDOM]
        mean = lambda key: None if getattr(random_rows[0], key) is None else float(np.mean([getattr(r, key) for r in random_rows]))  # noqa: E731
        rows.append(CleansingRow(f"{RANDOM} (mean of {len(random_rows)})", removed, mean("test_accuracy"),
                                 mean("noisy_recall"), mean("noisy_precision")))
    return CleansingReport(rows)
