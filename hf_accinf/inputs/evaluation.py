"""What the model computes on an evaluation set: the one runner over its labelled batches (eval mode, no
dropout, batches collated as the Trainer would), the head's inputs it yields, and the label check.

The objective of DESIGN.md section 1 is the mean loss of these rows: :func:`labelled_batches` splits every
collated batch into model inputs and labels, :func:`head_inputs` captures what the recorded head sees on them
(the head backends' input form), :func:`evaluation_batches` keeps the batches themselves (the model backend,
retraining), and :func:`check_eval_labels` refuses labels the loss cannot take.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import AccInfError
from .collate import LABELS, eval_collator, model_collator

logger = logging.getLogger(__name__)


def labelled_batches(dataset, collate: Callable, batch_size: int = 64) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """``(model inputs, labels)`` of every collated batch of ``dataset``, in order (the inputs' tensors only);
    refuses a set without a label column or without rows."""
    empty = True
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        if LABELS not in batch:
            raise AccInfError(
                "The evaluation dataset needs a label column ('label', 'label_ids' or 'labels'; on the command "
                "line --label_column NAME) to define its loss."
            )
        labels = torch.as_tensor(batch.pop(LABELS))
        empty = False
        yield {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)}, labels
    if empty:
        raise AccInfError("The evaluation dataset is empty: pass at least one labelled row.")


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
        for inputs, batch_labels in labelled_batches(dataset, eval_collator(model, tokenizer, collate_fn), batch_size):
            labels.append(batch_labels.cpu())
            model(**{key: value.to(device) for key, value in inputs.items()})
    finally:
        handle.remove()
    return torch.cat(captured), torch.cat(labels)


def evaluation_batches(model: nn.Module, eval_dataset, collate_fn: Callable | None = None,
                       batch_size: int = 64, device: str | torch.device = "cpu",
                       tokenizer=None) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """``(inputs, labels)`` pairs of ``eval_dataset`` on ``device``, collated as the Trainer would
    (:func:`~.collate.eval_collator`; a given ``collate_fn`` sees only the columns ``model.forward`` takes and
    the label)."""
    collate = model_collator(model, collate_fn) if collate_fn is not None else eval_collator(model, tokenizer)
    return [({key: value.to(device) for key, value in inputs.items()}, labels.to(device))
            for inputs, labels in labelled_batches(eval_dataset, collate, batch_size)]


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
