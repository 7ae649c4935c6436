"""Evaluate a score column against ground truth (the ``hf-accinf evaluate`` command is :mod:`hf_accinf.commands.evaluate`).

A source is ``PATH`` or ``PATH:NAME``:

* ``scores.safetensors:scores``: a tensor of a safetensors file (the only tensor when ``NAME`` is omitted);
* ``dataset_dir:influence_acc_sgd_ie``: a column of a dataset saved with ``Dataset.save_to_disk``;
* ``values.npy``, ``values.pt``: a saved array or tensor;
* ``values.csv:column`` or ``values.txt``: a CSV column by header name (or the only column).

Both sources must hold one value per training row, in the same row order.

>>> evaluate_scores([0.1, -0.2, 0.3, 0.0], [0.1, -0.1, 0.2, 0.0])["kendall_tau"]
1.0
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import AccInfError
from .metrics import agreement

DEFAULT_PERCENTS = (10, 30, 50, 70)


def split_source(source: str) -> tuple[Path, str | None]:
    """``PATH[:NAME]``: the name is what follows the last colon when the whole string is not a path."""
    if Path(source).exists() or ":" not in source:
        return Path(source), None
    path, name = source.rsplit(":", 1)
    return Path(path), name or None


def _only(names: list[str], what: str, path: Path) -> str:
    if len(names) != 1:
        raise AccInfError(f"{path} holds several {what} ({', '.join(names)}): name one as {path}:NAME.")
    return names[0]


def load_values(source: str) -> np.ndarray:
    """One float64 value per row from a safetensors file, a saved dataset, .npy, .pt, .csv or .txt."""
    path, name = split_source(source)
    if not path.exists():
        raise AccInfError(f"{path} does not exist.")
    if path.is_dir():
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        column = name or _only([c for c in dataset.column_names if c.startswith("influence_")] or dataset.column_names,
                               "columns", path)
        if column not in dataset.column_names:
            raise AccInfError(f"{path} has no column '{column}'; columns: {', '.join(dataset.column_names)}.")
        return np.asarray(dataset[column], dtype=np.float64)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        key = name or _only(sorted(tensors), "tensors", path)
        if key not in tensors:
            raise AccInfError(f"{path} has no tensor '{key}'; tensors: {', '.join(sorted(tensors))}.")
        return tensors[key].astype(np.float64).ravel()
    if suffix == ".npy":
        return np.load(path).astype(np.float64).ravel()
    if suffix == ".pt":
        import torch

        return torch.load(path, map_location="cpu").double().numpy().ravel()
    if suffix in (".csv", ".txt", ".tsv"):
        import pandas as pd

        has_header = name is not None
        separator = {".csv": ",", ".tsv": "\t"}.get(suffix, r"\s+")
        frame = pd.read_csv(path, sep=separator, header=0 if has_header else None)
        column = name if has_header else _only(list(frame.columns), "columns", path)
        return frame[column].to_numpy(np.float64)
    raise AccInfError(f"Cannot read scores from {path}: use .safetensors, .npy, .pt, .csv/.txt or a saved dataset.")


def evaluate_scores(scores, truth, percents=DEFAULT_PERCENTS) -> dict[str, float]:
    """RMSE, Kendall tau and two-tailed Jaccard@k of ``scores`` against ``truth`` (DESIGN.md section 7)."""
    scores, truth = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(truth, dtype=np.float64).ravel()
    if scores.shape != truth.shape:
        raise AccInfError(f"Scores and truth differ in length: {len(scores)} against {len(truth)}.")
    if not (np.isfinite(scores).all() and np.isfinite(truth).all()):
        raise AccInfError("Scores or truth hold NaN or infinite values.")
    return agreement(scores, truth, percents)


def evaluate_sources(scores: str, truth: str, percents=DEFAULT_PERCENTS) -> dict[str, float]:
    return evaluate_scores(load_values(scores), load_values(truth), percents)


def format_report(report: dict[str, float]) -> str:
    width = max(len(key) for key in report)
    return "\n".join(f"{key:<{width}}  {value:.6g}" for key, value in report.items())
