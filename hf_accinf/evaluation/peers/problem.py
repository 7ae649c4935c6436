"""The one problem every peer scores: a recorded run's trained model, its rows as tensors, and its trajectory.

Peers (kronfluence, dattri, traker, captum) take plain ``nn.Module`` s called on positional tensors and
datasets of tensor tuples ``(*inputs, label)``; HF models take keyword inputs and return a ``ModelOutput``.
:class:`LogitsModel` bridges the two (the HF model inside, so that its ``Linear`` modules stay visible to
the peers' hooks), and :func:`peer_problem` builds, from a recorded run:

* the final model (``RunReader.build_model``, eval mode, dropout off: the model hf_accinf scores);
* the training and evaluation rows collated once, as the Trainer's collator would (text padded to the set's
  longest row, which changes no logit: the attention mask hides the padding);
* per-epoch checkpoints and the learning rate of each epoch, taken from the recorded checkpoints or, between
  them, rebuilt by replay (:class:`~hf_accinf.trajectory.replay.Replay`), for the peers that need a
  trajectory (TracInCP, dattri's TracIn); and every step's parameters, learning rate and rows for DVEmb.

Convention of every adapter's output (DESIGN.md section 2, as :mod:`hf_accinf.scoring.objective`):
``s_j ~= L_val(theta^{-j}) - L_val(theta)``, the predicted change of the mean evaluation loss when row ``j``
is removed: positive for a row whose removal raises the loss (a helpful row).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset

from ...errors import AccInfError
from ...inputs.collate import LABELS, model_collator
from ...trajectory import RunReader


class LogitsModel(nn.Module):
    """An HF classifier called on positional tensors (in the order of ``input_names``), returning its logits."""

    def __init__(self, model: nn.Module, input_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.input_names, inputs))
        mask = named.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            # The additive 4D mask eager attention adds: HF builds it from the 2D one with a data-dependent
            # shortcut (no padding: no mask) that per-row ``vmap`` cannot trace; given in 4D it is used as is.
            dtype = next(self.model.parameters()).dtype
            blocked = (1 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
            named["attention_mask"] = blocked.expand(-1, 1, mask.shape[1], -1)
        return self.model(**named).logits


class RowTensors(Dataset):
    """Row ``i`` as the tuple ``(*inputs[i], labels[i])`` (what the peers' data loaders expect)."""

    def __init__(self, tensors: tuple[torch.Tensor, ...]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[-1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(tensor[index] for tensor in self.tensors)


def batched(rows: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """One row's tensors given with or without their batch dimension, as a batch of one when it is missing
    (dattri's per-sample ``vmap`` strips the batch dimension in some of its attributors, not in others)."""
    return tuple(tensor.unsqueeze(0) for tensor in rows) if rows[-1].dim() == 0 else rows


@dataclass
class Epoch:
    """The model at the end of one epoch (HF ``state_dict``) and the mean learning rate of the epoch's steps."""

    state: dict[str, torch.Tensor]
    learning_rate: float


@dataclass
class PeerProblem:
    """What every peer adapter scores (see the module docstring)."""

    model: LogitsModel
    train: tuple[torch.Tensor, ...]
    eval: tuple[torch.Tensor, ...]
    run: RunReader
    train_dataset: object
    collate_fn: Callable | None
    batch_size: int
    epochs: list[Epoch] = field(default_factory=list)
    model_factory: object = None  # the run's model class or factory, when its class cannot be imported
    _replay: object = None

    @property
    def num_train(self) -> int:
        return len(self.train[-1])

    def train_rows(self) -> RowTensors:
        return RowTensors(self.train)

    def eval_rows(self) -> RowTensors:
        return RowTensors(self.eval)

    def model_at(self, state: dict[str, torch.Tensor]) -> LogitsModel:
        """A copy of the model holding ``state`` (an HF ``state_dict``), eval mode."""
        model = copy.deepcopy(self.model)
        model.model.load_state_dict(state, strict=True)
        return _eager(model).eval()

    def steps(self) -> Iterator[tuple[int, dict[str, torch.Tensor], float, torch.Tensor, torch.Tensor]]:
        """Every recorded step: ``(epoch, parameters before it, learning rate, its rows, their weights)``,
        the parameters rebuilt by replay (DVEmb's trajectory)."""
        replay = self._replay_of()
        trajectory = replay.trajectory
        rows_seen = 0
        for step in range(replay.num_steps):
            rows = trajectory.batch(step)
            weights = trajectory.row_weight[trajectory.rows_of(step)]
            yield rows_seen // self.num_train, replay.parameters_at(step), float(trajectory.lr[step].reshape(-1)[0]), \
                rows, weights
            rows_seen += len(rows)

    def _replay_of(self):
        if self._replay is None:
            from ...trajectory.replay import Replay

            self._replay = Replay(self.run, self.train_dataset, self.collate_fn, model=self.model_factory)
        return self._replay


def _eager(model: LogitsModel) -> LogitsModel:
    """Eager attention: torch's SDPA has no ``vmap`` batching rule on CPU (the peers vmap per-row gradients)."""
    if hasattr(model.model, "set_attn_implementation"):
        model.model.set_attn_implementation("eager")
    return model


def collate_rows(model: nn.Module, dataset, collate_fn: Callable | None) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """Every row of ``dataset`` collated at once as the Trainer would: the input names and ``(*inputs, labels)``."""
    batch = model_collator(model, collate_fn)([dataset[i] for i in range(len(dataset))])
    if LABELS not in batch:
        raise AccInfError("The dataset needs a label column ('label' or 'labels') for the peers' losses.")
    names = [name for name, value in batch.items() if name != LABELS and isinstance(value, torch.Tensor)]
    return names, tuple(batch[name] for name in names) + (torch.as_tensor(batch[LABELS]).long(),)


def epoch_ends(run: RunReader, num_rows: int) -> list[tuple[int, float]]:
    """``(step, mean learning rate of the epoch)`` at the end of each full pass over the ``num_rows`` rows."""
    trajectory = run.trajectory()
    ends, seen, start = [], 0, 0
    for step in range(trajectory.num_steps):
        seen += len(trajectory.batch(step))
        if seen % num_rows == 0:
            ends.append((step + 1, float(trajectory.lr[start : step + 1, 0].mean())))
            start = step + 1
    if not ends or ends[-1][0] != trajectory.num_steps:
        ends.append((trajectory.num_steps, float(trajectory.lr[start:, 0].mean()) if start < trajectory.num_steps
                     else math.nan))
    return ends


def peer_problem(run_dir, train_dataset, eval_dataset, collate_fn: Callable | None = None,
                 with_epochs: bool = True, model=None) -> PeerProblem:
    """The problem of the module docstring for the run recorded in ``run_dir`` (``model``: the run's model
    class or factory when its class cannot be imported, as ``RunReader.build_model``)."""
    run = RunReader(run_dir)
    run.check_dataset(train_dataset)
    final = run.build_model(model=model)
    names, train = collate_rows(final, train_dataset, collate_fn)
    eval_names, evaluation = collate_rows(final, eval_dataset, collate_fn)
    if eval_names != names:
        raise AccInfError(f"The training rows give the model {names}, the evaluation rows {eval_names}: pass "
                          "evaluation rows with the same columns.")
    wrapped = _eager(LogitsModel(final, names)).eval()
    batch_size = len(run.trajectory().batch(0))  # rows of one optimizer step (accumulation and processes included)
    problem = PeerProblem(wrapped, train, evaluation, run, train_dataset, collate_fn, batch_size, model_factory=model)
    if with_epochs:
        replay = problem._replay_of()
        problem.epochs = [Epoch(dict(replay.parameters_at(step)), lr) for step, lr in epoch_ends(run, problem.num_train)]
    return problem
