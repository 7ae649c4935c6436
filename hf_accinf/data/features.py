"""Head inputs of any dataset under a model: what the objective is evaluated on (eval mode, no dropout).

Batches follow the ``transformers.Trainer``'s conventions, so a dataset that trains also scores:
the label column may be ``label``, ``label_ids`` or ``labels``; columns the model's ``forward`` does not
take (raw text, ids) are dropped; the default collator is ``DataCollatorWithPadding`` when a tokenizer
is known and otherwise ``default_data_collator`` after padding variable-length sequences (dynamic
padding with the model's ``pad_token_id``).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, default_data_collator

from ..errors import AccInfError

logger = logging.getLogger(__name__)

LABEL_NAMES = ("labels", "label", "label_ids")


def model_input_names(model: nn.Module) -> set[str]:
    """The arguments of ``model.forward`` (the Trainer's signature columns) plus the label names."""
    return set(inspect.signature(model.forward).parameters) | set(LABEL_NAMES)


class TrainerStyleCollator:
    """Drops the columns ``forward`` does not take, maps ``label``/``label_ids`` to ``labels`` and pads."""

    def __init__(self, keep: set[str], collator: Callable | None = None, pad_token_id: int = 0):
        self.keep, self.collator, self.pad_token_id = keep, collator, pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [self._row(row) for row in rows]
        if self.collator is not None:
            return self.collator(rows)
        return default_data_collator(self._pad(rows))

    def _row(self, row) -> dict[str, Any]:
        if not isinstance(row, dict):
            raise AccInfError(
                f"Evaluation rows must be dicts of model inputs and a label (as a Trainer takes them), got "
                f"{type(row).__name__}. Wrap the dataset, or pass collate_fn= returning a dict with 'labels'."
            )
        row = {key: value for key, value in row.items() if key in self.keep}
        for name in ("label", "label_ids"):
            if name in row and "labels" not in row:
                row["labels"] = row.pop(name)
        return row

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


def _is_sequence(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 1
    return isinstance(value, (list, tuple)) and all(isinstance(item, (int, float)) for item in value)


def eval_collator(model: nn.Module, tokenizer=None, collate_fn: Callable | None = None) -> Callable:
    """The collator the Trainer would use for ``model``: ``collate_fn`` if given (used as is), else
    ``DataCollatorWithPadding(tokenizer)`` or tokenizer-free dynamic padding, after dropping unused columns."""
    if collate_fn is not None:
        return collate_fn
    padding = DataCollatorWithPadding(tokenizer) if tokenizer is not None else None
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return TrainerStyleCollator(model_input_names(model), padding, int(pad) if pad is not None else 0)


@torch.no_grad()
def head_inputs(model: nn.Module, head_name: str, dataset, batch_size: int = 64, collate_fn=None,
                device: str | torch.device = "cpu", tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` of the head for every row of ``dataset``, in order."""
    head = model.get_submodule(head_name)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, args, output: captured.append(args[0].detach().cpu()))
    labels: list[torch.Tensor] = []
    model = model.to(device).eval()
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=eval_collator(model, tokenizer, collate_fn)):
            if "labels" not in batch:
                raise AccInfError(
                    "The evaluation dataset needs a label column ('label', 'label_ids' or 'labels'; on the command "
                    "line --label_column NAME) to define its loss."
                )
            labels.append(torch.as_tensor(batch.pop("labels")).cpu())
            model(**{key: value.to(device) for key, value in batch.items() if isinstance(value, torch.Tensor)})
    finally:
        handle.remove()
    if not labels:
        raise AccInfError("The evaluation dataset is empty: pass at least one labelled row.")
    return torch.cat(captured), torch.cat(labels)


def check_eval_labels(labels: torch.Tensor, num_labels: int) -> int:
    """Refuse labels outside ``[0, num_labels)`` (negative labels are the ignore index); warn about ignored rows
    and refuse a set where every row is ignored. Returns the number of rows the objective uses."""
    if labels.is_floating_point() or labels.dim() != 1:
        raise AccInfError(
            f"Evaluation labels must be one class index per row (got {labels.dtype} of shape {tuple(labels.shape)}); "
            "multi-label or regression targets are not modelled."
        )
    high = labels >= num_labels
    if high.any():
        bad = sorted(set(labels[high].tolist()))[:5]
        raise AccInfError(
            f"{int(high.sum())} evaluation rows have labels {bad} outside the model's {num_labels} classes "
            f"(0..{num_labels - 1}). Map the labels to the training run's classes."
        )
    ignored = int((labels < 0).sum())
    if ignored == len(labels):
        raise AccInfError(
            f"All {len(labels)} evaluation rows have a negative label (the ignore index, e.g. -100 or -1): the "
            "objective would be empty and every score zero. Pass a labelled evaluation set."
        )
    if ignored:
        logger.warning("%d of %d evaluation rows have a negative label (ignore index) and do not count in the "
                       "evaluation loss.", ignored, len(labels))
    return len(labels) - ignored
