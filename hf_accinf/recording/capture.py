"""What the training loop really consumed: row indices carried with the batch, and the head's view of it.

* :class:`RowIndexedDataset` / :class:`RowIndexCollator` carry each row's dataset index through the
  sampler, the accelerate sharding (padding included) and the collator, so the recorded batch is the
  one each process actually used, never one re-derived from a sampler.
* :class:`HeadCapture` hooks the head: its inputs and logits on every training micro-batch, and the
  gradient that reached the logits, from which the per-row loss weight the Trainer really applied is
  measured (DESIGN.md section 3, "record the per-row loss weights of each step"), and the random
  generator state taken just before each micro-batch's forward, which decides its dropout masks. It keeps
  them where they are (no copy and no host synchronisation inside the training step); :func:`to_host`
  brings a whole optimizer step's tensors to the CPU at once (on CUDA: asynchronous copies into pinned
  memory, one synchronisation).
* :func:`optimizer_checkpoint` turns the optimizer's state into named tensors and metadata, so that a
  replay from a sparse checkpoint (DESIGN.md section 6b) restarts the optimizer where it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import AccInfError
from ..losses import target_distribution
from ..trajectory import schema

ROW_INDEX_KEY = "accinf_row_index"


class RowIndexedDataset(torch.utils.data.Dataset):
    """A map-style view of ``dataset`` whose items also carry their row index."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, dict):
            raise AccInfError(
                f"Training rows must be dicts of model inputs (got {type(item).__name__}); "
                "use a datasets.Dataset or a torch Dataset returning dicts."
            )
        return {**item, ROW_INDEX_KEY: int(index)}


class RowIndexCollator:
    """Wraps the user's collator: row indices are taken out before it runs and put back as a tensor."""

    def __init__(self, collator: Callable):
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [feature.pop(ROW_INDEX_KEY) for feature in features]
        batch = self.collator(features)
        batch[ROW_INDEX_KEY] = torch.tensor(rows, dtype=torch.long)
        return batch


@dataclass
class MicroBatch:
    rows: torch.Tensor
    labels: torch.Tensor
    head_input: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    logits_grad: torch.Tensor | None = None
    rng_cpu: torch.Tensor | None = None
    rng_cuda: torch.Tensor | None = None


@dataclass
class HeadCapture:
    """Forward hook on the head, active only inside training steps."""

    head: nn.Module
    micro_batches: list[MicroBatch] = field(default_factory=list)
    active: MicroBatch | None = None
    handle: Any = None

    def attach(self) -> None:
        self.handle = self.head.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def begin(self, rows: torch.Tensor, labels: torch.Tensor) -> None:
        self.active = MicroBatch(
            rows=rows.detach(), labels=labels.detach(), rng_cpu=torch.get_rng_state(),
            rng_cuda=torch.cuda.get_rng_state(labels.device) if labels.is_cuda else None,
        )

    def end(self) -> None:
        batch, self.active = self.active, None
        if batch is None or batch.head_input is None:
            raise AccInfError(
                "The head module was not called during the training step, so its inputs could not be recorded. "
                "Choose modules that the model's forward uses."
            )
        self.micro_batches.append(batch)

    def take(self) -> list[MicroBatch]:
        """The micro-batches captured since the last call, their tensors on the training device (read them
        through :func:`host_micro_batches`)."""
        batches, self.micro_batches = self.micro_batches, []
        return batches

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        batch = self.active
        if batch is None or not torch.is_grad_enabled():
            return
        tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
        if len(tensors) != 1 or not isinstance(output, torch.Tensor):
            raise AccInfError(
                f"The head {type(module).__name__} must map one tensor to the logits tensor "
                f"(it got {len(tensors)} tensor inputs). Choose a head module of that kind."
            )
        if batch.head_input is not None:
            raise AccInfError("The head module was called twice in one training step; choose a head used once.")
        batch.head_input = tensors[0].detach()
        batch.logits = output.detach().float()

        def keep_grad(grad: torch.Tensor) -> None:
            batch.logits_grad = grad.detach().float()

        if output.requires_grad:
            output.register_hook(keep_grad)


def to_host(tensors: list[torch.Tensor | None], copy: bool | list[bool] = False) -> list[torch.Tensor | None]:
    """CPU versions of ``tensors`` (``None`` kept): CUDA ones copied asynchronously into pinned memory and
    waited for once (one synchronisation per device for the whole list); CPU ones returned as they are, or
    cloned where ``copy`` (one flag, or one per tensor) is set (tensors the training step will change, like
    parameters)."""
    copies = copy if isinstance(copy, list) else [copy] * len(tensors)
    hosts, devices = [], set()
    for tensor, cloned in zip(tensors, copies):
        if tensor is None or tensor.device.type == "cpu":
            hosts.append(tensor.detach().clone() if cloned and tensor is not None else tensor)
            continue
        cuda = tensor.device.type == "cuda"
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=cuda)
        hosts.append(host.copy_(tensor.detach(), non_blocking=cuda))
        devices.add(tensor.device)
    for device in devices:
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
    return hosts


def host_micro_batches(batches: list[MicroBatch], *others: torch.Tensor | None,
                       copy_others: bool = True) -> tuple[list[MicroBatch], list[torch.Tensor | None]]:
    """The micro-batches with their tensors on the CPU, and ``others`` (copies, by default), in one
    :func:`to_host` (one synchronisation for the optimizer step)."""
    names = ("rows", "labels", "head_input", "logits", "logits_grad", "rng_cpu", "rng_cuda")
    flat = [getattr(batch, name) for batch in batches for name in names]
    hosts = to_host(flat + list(others), copy=[False] * len(flat) + [copy_others] * len(others))
    width = len(names)
    moved = [MicroBatch(**dict(zip(names, hosts[i * width:(i + 1) * width]))) for i in range(len(batches))]
    return moved, hosts[len(flat):]


def measure_row_weights(batch: MicroBatch, label_smoothing: float, tolerance: float = 1e-3) -> torch.Tensor:
    """The loss weight of every row of a micro-batch, read off the gradient that reached the logits.

    The Trainer backpropagates ``sum_i w_i l_i`` with ``dl_i/dz_i = p_i - t_i`` for cross-entropy; every
    loss scaling the Trainer applies (batch mean, ``num_items_in_batch``, gradient accumulation) is
    uniform within a micro-batch, so one least-squares scale per micro-batch recovers it. A loss that
    is not a uniformly weighted cross-entropy is refused here.
    """
    if batch.logits_grad is None:
        raise AccInfError("No gradient reached the head's logits; the head must be trained with the model's loss.")
    logits = batch.logits.double()
    grad = batch.logits_grad.double()
    valid = batch.labels >= 0
    residual = torch.softmax(logits, dim=-1) - target_distribution(batch.labels, logits.shape[-1], label_smoothing)
    residual[~valid] = 0
    denominator = (residual * residual).sum()
    if denominator == 0:
        return torch.zeros(len(batch.rows), dtype=torch.float64)
    scale = (grad * residual).sum() / denominator
    mismatch = (grad - scale * residual).norm()
    if mismatch > tolerance * max(grad.norm().item(), 1e-30):
        raise AccInfError(
            "The training loss is not a uniformly weighted cross-entropy of the logits (custom compute_loss, "
            "class weights or a loss the estimators do not model). Train with the model's own "
            "single-label classification loss."
        )
    weights = torch.full((len(batch.rows),), scale.item(), dtype=torch.float64)
    weights[~valid] = 0
    return weights


def replay_state(batch: MicroBatch) -> dict[str, torch.Tensor]:
    """What a replay needs of one micro-batch besides its rows: its size and its random state."""
    state = {schema.MICRO_SIZE: torch.tensor([len(batch.rows)]), schema.RNG_CPU: batch.rng_cpu[None]}
    if batch.rng_cuda is not None:
        state[schema.RNG_CUDA] = batch.rng_cuda[None]
    return state


def stack_replay_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The micro-batch keys of one step record, micro-batches in the order of the step's rows."""
    keys = [key for key in schema.MICRO_KEYS if all(key in state for state in states)]
    return {key: torch.cat([state[key] for state in states]) for key in keys}


def _json_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    return value


def optimizer_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The optimizer's state as ``{"<param>::<key>": tensor}`` plus metadata (class, groups, membership)."""
    names = {id(param): name for name, param in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    groups, members = [], []
    for group in optimizer.param_groups:
        hyper = {key: _json_value(value) for key, value in group.items() if key != "params"}
        groups.append({key: value for key, value in hyper.items()
                       if value is None or isinstance(value, (bool, int, float, str, list))})
        members.append([names[id(param)] for param in group["params"] if id(param) in names])
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                tensors[f"{names[id(param)]}{schema.OPTIMIZER_KEY_SEPARATOR}{key}"] = tensor
    metadata = {
        "optimizer_class": type(optimizer).__name__,
        "param_groups": json.dumps(groups),
        "group_params": json.dumps(members),
    }
    return tensors, metadata
