"""Head inputs of any dataset under a model: what the objective is evaluated on (eval mode, no dropout)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import default_data_collator

from ..errors import AccInfError


@torch.no_grad()
def head_inputs(model: nn.Module, head_name: str, dataset, batch_size: int = 64, collate_fn=None,
                device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` of the head for every row of ``dataset``, in order."""
    head = model.get_submodule(head_name)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, args, output: captured.append(args[0].detach().cpu()))
    labels: list[torch.Tensor] = []
    model = model.to(device).eval()
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn or default_data_collator):
            if "labels" not in batch:
                raise AccInfError("The evaluation dataset needs a 'labels' column to define its loss.")
            labels.append(batch.pop("labels").cpu())
            model(**{key: value.to(device) for key, value in batch.items() if isinstance(value, torch.Tensor)})
    finally:
        handle.remove()
    return torch.cat(captured), torch.cat(labels)
