"""The one Trainer-style collator: which columns reach ``model.forward`` and how a batch of rows is padded.

Batches follow the ``transformers.Trainer``'s conventions, so a dataset that trains also replays and scores:
columns the model's ``forward`` does not take (raw text, ids) are dropped (the Trainer's
``remove_unused_columns``), the label column may be ``label``, ``label_ids`` or ``labels``; the rows then go to
the given collator, else to ``default_data_collator`` after padding variable-length sequences (dynamic
padding with the model's ``pad_token_id``). No DESIGN.md equation lives here.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

import torch
from torch import nn
from transformers import DataCollatorWithPadding, default_data_collator

from ..errors import AccInfError

LABELS = "labels"
LABEL_NAMES = (LABELS, "label", "label_ids")


def model_input_names(model: nn.Module) -> set[str]:
    """The arguments of ``model.forward`` (the Trainer's signature columns) plus the label names."""
    return set(inspect.signature(model.forward).parameters) | set(LABEL_NAMES)


class TrainerStyleCollator:
    """Keeps the columns in ``keep`` of every row, then collates them with ``collator`` (as the Trainer hands
    rows to its data collator), or, without one, maps ``label``/``label_ids`` to ``labels``, pads and stacks."""

    def __init__(self, keep: Iterable[str], collator: Callable | None = None, pad_token_id: int = 0):
        self.keep, self.collator, self.pad_token_id = set(keep), collator, pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [self._row(row) for row in rows]
        if self.collator is not None:
            return self.collator(rows)
        return default_data_collator(self._pad([_labels_renamed(row) for row in rows]))

    def _row(self, row) -> dict[str, Any]:
        if not isinstance(row, dict):
            raise AccInfError(
                f"Rows must be dicts of model inputs and a label (as a Trainer takes them), got "
                f"{type(row).__name__}. Wrap the dataset, or pass collate_fn= returning a dict with 'labels'."
            )
        return {key: value for key, value in row.items() if key in self.keep}

    def _pad(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for key in rows[0]:
            values = [row.get(key) for row in rows]
            if not all(_is_sequence(value) for value in values):
                continue
            lengths = {len(value) for value in values}
            if len(lengths) < 2:
                continue
            width, fill = max(lengths), (self.pad_token_id if key == "input_ids" else 0)
            for row, value in zip(rows, values):
                value = torch.as_tensor(value)
                row[key] = torch.cat([value, value.new_full((width - len(value),), fill)])
        return rows


def _labels_renamed(row: dict[str, Any]) -> dict[str, Any]:
    for name in LABEL_NAMES[1:]:
        if name in row and LABELS not in row:
            row[LABELS] = row.pop(name)
    return row


def _is_sequence(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 1
    return isinstance(value, (list, tuple)) and all(isinstance(item, (int, float)) for item in value)


def model_collator(model: nn.Module, collate_fn: Callable | None = None) -> TrainerStyleCollator:
    """``collate_fn`` (default: ``default_data_collator``) fed only the columns ``model.forward`` takes and the
    label, as the Trainer feeds its data collator."""
    return TrainerStyleCollator(model_input_names(model), collate_fn or default_data_collator)


def eval_collator(model: nn.Module, tokenizer=None, collate_fn: Callable | None = None) -> Callable:
    """The collator the Trainer would use for ``model``: ``collate_fn`` if given (used as is), else
    ``DataCollatorWithPadding(tokenizer)`` or tokenizer-free dynamic padding, after dropping unused columns."""
    if collate_fn is not None:
        return collate_fn
    padding = DataCollatorWithPadding(tokenizer) if tokenizer is not None else None
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return TrainerStyleCollator(model_input_names(model), padding, int(pad) if pad is not None else 0)
