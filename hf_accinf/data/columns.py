"""Scores back into the ``datasets.Dataset`` as columns."""

from __future__ import annotations

import torch
from datasets import Dataset

from ..errors import AccInfError


def add_score_column(dataset: Dataset, scores: torch.Tensor, name: str) -> Dataset:
    """A copy of ``dataset`` with one float column of per-row scores (replacing a column of that name)."""
    if len(scores) != len(dataset):
        raise AccInfError(f"{len(scores)} scores for a dataset of {len(dataset)} rows: score the same dataset.")
    if name in dataset.column_names:
        dataset = dataset.remove_columns(name)
    return dataset.add_column(name, scores.detach().cpu().double().tolist())
