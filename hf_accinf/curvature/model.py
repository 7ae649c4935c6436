"""Curvature of any scope by running the whole model functionally (DESIGN.md section 6b).

At step ``t`` the whole model is called with ``torch.func.functional_call`` at ``theta_t`` (every
parameter, from a :class:`TrajectoryStates` provider) on the step's real batch (the recorded rows,
collated from the training dataset, with the recorded labels and per-row loss weights and the
manifest's label smoothing); derivatives are taken only with respect to the scope, the other
parameters stay at their values of the step. ``H_B X`` is ``vmap`` over the K vectors of
forward-over-reverse ``jvp(grad(L_B))``; per-row loss tangents ``d/de l_r(theta + e v)`` are one
forward-mode ``jvp`` of the rows' losses.

**Per-row gradients and ``H_r x_r``: vmap over single rows.** ``vmap(grad(l_r))`` runs the rows as one
batched forward and backward in which each Linear's weight gradient becomes a batched outer product of
its backprops and activations summed over positions, i.e. exactly the per-sample-gradient computation
that opacus's ``GradSampleModule`` does with hooks, in one batched backward pass. Measured on a MiniLM-shaped
BERT (float32, 16 rows of 64 tokens, one CPU thread on a loaded machine, ``scripts/bench_model_step.py``):
per-row gradients of the whole model 2.1x a plain training step (forward and backward) of the batch, most
of it writing the dense (16, P) result (each row's word-embedding gradient is a dense vocab x hidden
block); the batch gradient 1.4x, one HVP 2.9x, the per-row loss tangents 0.8x.
It covers every parameter, including those a module holds directly (ViT's ``cls_token`` and position
embeddings) that per-layer hooks do not see, gives ``H_r x_r`` by the same vmap over forward-over-reverse,
and works in float64 and float32 on a ``functional_call`` of any parameter point. opacus (1.6 on PyPI)
would add a dependency, needs the parameters loaded into the module, has no per-row HVPs, and needs its
vmap fallback for directly held parameters anyway; so it is not used. BERT's forward refuses vmap over
single rows only in its mask preparation (``transformers.masking_utils`` skips the mask by testing the
mask's values); a mask already in 4D additive form is passed through as is. So the backend hands the model
the 4D form ``where(mask, 0, finfo.min)`` (what the eager attention builds itself, broadcast over queries)
after checking once that the model's logits are unchanged by it (a model that reads a 4D mask otherwise,
e.g. a causal decoder, keeps its 2D mask). Models that still refuse vmap over rows fall back
(``per_row="auto"``, logged once) to vmap over one-hot per-row loss weights ``e_r``, ``g_r = grad(e_r . l)``:
one forward, one backward per row.

**Memory.** Every quantity is computed over blocks of rows of one micro-batch, and products with several
vectors a chunk of vectors at a time, sized by :mod:`hf_accinf.curvature.memory` from ``memory_budget``,
the scope size and the activation bytes of one row (measured once per input shape). The budget bounds
the working memory; the result asked for (e.g. the (m, P) per-row gradients) is the caller's.
``vector_chunk`` optionally caps the vectors per chunk.

**Reusing the replay's batch gradient.** The replay computes ``G_t`` (the accumulated gradient of the
step's weighted loss, before clipping) of the step it replays; it equals
:attr:`ModelBatch.batch_grad` (up to rounding) only where the two forwards are the same function: dropout
off in the run (this backend runs in eval mode), the same dtype (the replay runs the training dtype; the
backend ``dtype``), and attention that differs at most by rounding (the run's SDPA against eager here).
``batch_grad`` is computed lazily, so a caller that holds such a ``G_t`` (flattened in this layout) may
assign it to ``batch.batch_grad`` and skip the recomputation.

Conventions: offline passes run the model in **eval mode** (no dropout) with eager attention (the fused
SDPA kernels have no forward-mode derivative); the fidelity recipes train with dropout off, so the
linearization is around the steps that really happened. Other dtypes (float32 for deep scopes, float64
for oracles) work on a cast copy of the model. Vectors are the scope's parameters flattened and
concatenated in the model's ``named_parameters`` order; :meth:`ModelCurvature.unflatten` names them.
"""

from __future__ import annotations

import copy
import logging
from functools import cached_property
from typing import Callable, Protocol

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from ..errors import AccInfError
from ..losses import cross_entropy_rows, mean_weights, target_distribution
from ..trajectory import Trajectory
from . import memory
from .attention import EXACT_ATTENTION
from .base import BatchCurvature, FlatLayout, HeadCurvature

logger = logging.getLogger(__name__)

PER_ROW_MODES = ("auto", "vmap", "weights")
DEFAULT_MEMORY_BUDGET = 2 * 2**30


class TrajectoryStates(Protocol):
    """What the model backend needs of a run at every step (implemented by replay, or by a run
    checkpointed at every step)."""

    def parameters_at(self, step: int) -> dict[str, torch.Tensor]:
        """Every model parameter before step ``step`` (``state_dict`` names)."""

    def batch_inputs(self, step: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """The step's model inputs as collated micro-batches (no labels), each with the positions of its
        rows among the step's recorded rows (``trajectory.rows_of(step)``)."""

    # Optional, for optimizer rules that read their state (Adam): ``optimizer_state_at(step)`` mapping
    # ``"<parameter>.<state key>"`` to the state before step ``step`` (the trajectory's naming).


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output.logits if hasattr(output, "logits") else output[0]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (b, kv) padding mask as the (b, 1, 1, kv) additive mask of eager attention (0 kept, ``finfo.min`` not)."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask[:, None, None, :].bool(), zero, torch.finfo(dtype).min)


class _Micro:
    """Rows of one micro-batch: model inputs, target distributions, loss weights, positions in the step."""

    def __init__(self, inputs: dict[str, torch.Tensor], targets: torch.Tensor, weights: torch.Tensor,
                 where: torch.Tensor):
        self.inputs, self.targets, self.weights, self.where = inputs, targets, weights, where

    def __len__(self) -> int:
        return len(self.where)

    def take(self, local: torch.Tensor) -> "_Micro":
        on_device = local.to(self.targets.device)
        return _Micro({key: value[on_device] for key, value in self.inputs.items()}, self.targets[on_device],
                      self.weights[on_device], self.where[local.cpu()])

    def blocks(self, size: int):
        for start in range(0, len(self), size):
            yield self.take(torch.arange(start, min(start + size, len(self))))

    def shape_key(self) -> tuple:
        return tuple((key, tuple(value.shape[1:]), value.dtype) for key, value in sorted(self.inputs.items()))


class ModelBatch(BatchCurvature):
    """One step's batch at ``theta_t``: every quantity computed block by block within the owner's budget.

    Derivatives are taken with respect to the scope's parameters as named views of the flat ``point`` and
    written straight into their columns of the (rows, P) results (no flattened copy per block)."""

    def __init__(self, owner: "ModelCurvature", params: dict[str, torch.Tensor], micros: list[_Micro],
                 size: int | None = None):
        self.owner, self.micros = owner, micros
        self.fixed = {name: value for name, value in params.items() if name not in owner.chosen_set}
        self.point = owner.flatten({name: params[name] for name in owner.chosen})
        self.named = owner.unflatten(self.point)
        # ``size``: the step's rows when the micro-batches hold only some of them (:meth:`restrict`)
        self.size = sum(len(micro) for micro in micros) if size is None else size
        self.held = torch.cat([micro.where for micro in micros]).sort().values if micros \
            else torch.zeros(0, dtype=torch.long)
        self.micro_of = torch.full((self.size,), -1, dtype=torch.long)
        self.local = torch.full((self.size,), -1, dtype=torch.long)
        self.row_weight = torch.zeros(self.size, dtype=owner.dtype, device=owner.device)
        for index, micro in enumerate(micros):
            self.micro_of[micro.where] = index
            self.local[micro.where] = torch.arange(len(micro))
            self.row_weight[micro.where.to(owner.device)] = micro.weights

    def restrict(self, rows: torch.Tensor) -> "ModelBatch":
        """The rows ``rows`` of this step only (the adjoint's row split): the others are dropped from the
        micro-batches, so every batch quantity costs those rows' share."""
        keep = torch.zeros(self.size, dtype=torch.bool)
        keep[rows.cpu()] = True
        micros = [micro.take(keep[micro.where].nonzero().flatten()) for micro in self.micros]
        params = {**self.fixed, **self.named}
        return ModelBatch(self.owner, params, [micro for micro in micros if len(micro)], self.size)

    def _plan(self, cost: memory.BlockCost, micro: _Micro, rows: int, vectors: int = 1,
              cap: int | None = None) -> tuple[int, int]:
        owner = self.owner
        return memory.plan_block(cost, rows, vectors, owner.row_bytes(self, micro),
                                 owner.dim * self.point.element_size(), owner.memory_budget, cap)

    def _place(self, out: torch.Tensor, named: dict[str, torch.Tensor], rows: torch.Tensor | None = None,
               accumulate: bool = False) -> None:
        """Write (or add) ``named`` values, (n, *shape) each, into their columns of ``out`` (n rows, or ``rows``)."""
        if rows is not None:
            first = int(rows[0])
            if torch.equal(rows.cpu(), torch.arange(first, first + len(rows))):
                return self._place(out[first:first + len(rows)], named)
            block = torch.empty(len(rows), out.shape[1], dtype=out.dtype, device=out.device)
            self._place(block, named)
            out.index_copy_(0, rows.to(out.device), block)
            return
        for name, columns in self.owner.columns.items():
            value, target = named[name].reshape(len(out), -1), out[:, columns]
            if accumulate:
                target += value
            else:
                target.copy_(value)

    # -- losses of the scope's named parameters --------------------------------------------------------------

    def _losses(self, named: dict[str, torch.Tensor], micro: _Micro) -> torch.Tensor:
        return cross_entropy_rows(self.owner.logits_named(named, self.fixed, micro.inputs), micro.targets)

    def _weighted_loss(self, micro: _Micro) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        return lambda named: (micro.weights * self._losses(named, micro)).sum()

    def _row_loss(self, named: dict[str, torch.Tensor], row_inputs: dict, target: torch.Tensor) -> torch.Tensor:
        inputs = {key: value[None] for key, value in row_inputs.items()}
        return cross_entropy_rows(self.owner.logits_named(named, self.fixed, inputs), target[None])[0]

    # -- batch quantities ----------------------------------------------------------------------------------

    @cached_property
    def batch_grad(self) -> torch.Tensor:
        total = torch.zeros_like(self.point)
        for micro in self.micros:
            rows, _ = self._plan(memory.BATCH_GRAD, micro, len(micro))
            for block in micro.blocks(rows):
                self._place(total[None], grad(self._weighted_loss(block))(self.named), accumulate=True)
        return total

    def hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(vectors)
        for micro in self.micros:
            rows, chunk = self._plan(memory.BATCH_HVP, micro, len(micro), len(vectors), self.owner.vector_chunk)
            for block in micro.blocks(rows):
                gradient = grad(self._weighted_loss(block))
                product = vmap(lambda v: jvp(gradient, (self.named,), (self.owner.unflatten(v),))[1])
                for start in range(0, len(vectors), chunk):
                    self._place(total[start:start + chunk], product(vectors[start:start + chunk]), accumulate=True)
        return total

    def row_loss_tangents(self, vector: torch.Tensor) -> torch.Tensor:
        """``d/de l_r(theta + e v)`` for every row of the step (unweighted), one forward-mode pass: (b,)."""
        tangents = torch.zeros(self.size, dtype=self.point.dtype, device=self.point.device)
        direction = self.owner.unflatten(vector)
        for micro in self.micros:
            rows, _ = self._plan(memory.ROW_TANGENTS, micro, len(micro))
            for block in micro.blocks(rows):
                values = jvp(lambda named: self._losses(named, block), (self.named,), (direction,))[1]
                tangents[block.where.to(tangents.device)] = values
        return tangents

    def shifted_batch_losses(self, shifts: torch.Tensor) -> torch.Tensor:
        """``L_B(theta + s)`` for each row ``s`` of ``shifts`` (K, P): (K,)."""
        total = torch.zeros(len(shifts), dtype=self.point.dtype, device=self.point.device)
        for micro in self.micros:
            rows, chunk = self._plan(memory.SHIFTED_LOSSES, micro, len(micro), len(shifts), self.owner.vector_chunk)
            for block in micro.blocks(rows):
                loss = self._weighted_loss(block)
                shifted = vmap(lambda shift: loss(self.owner.unflatten(self.point + shift)))
                for start in range(0, len(shifts), chunk):
                    total[start:start + chunk] += shifted(shifts[start:start + chunk])
        return total

    # -- per-row quantities --------------------------------------------------------------------------------

    def keep_row_grads(self) -> None:
        if "_kept_row_grads" not in self.__dict__:
            kept = self._dispatch(self.held, None)
            self._kept_row_grads = kept
            self._kept_index = torch.full((self.size,), -1, dtype=torch.long)
            self._kept_index[self.held] = torch.arange(len(self.held))
            # sum_r w_r g_r: no second backward
            self.__dict__.setdefault("batch_grad", self.row_weight[self.held.to(kept.device)] @ kept)

    def row_grads(self, rows: torch.Tensor) -> torch.Tensor:
        if "_kept_row_grads" in self.__dict__:
            index = self._kept_index[rows.cpu()]
            if bool((index < 0).any()):
                raise AccInfError("Rows outside this process's share of the step were asked for (engine.sharding).")
            return self._kept_row_grads[index.to(self._kept_row_grads.device)]
        return self._dispatch(rows, None)

    def row_hvp(self, vectors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self._dispatch(rows, vectors)

    def _dispatch(self, rows: torch.Tensor, vectors: torch.Tensor | None) -> torch.Tensor:
        owner = self.owner
        if not len(rows):  # a process's share of a step can be empty (engine.sharding): decide nothing on it
            return torch.empty(0, owner.dim, dtype=self.point.dtype, device=self.point.device)
        if owner.per_row == "auto":
            try:
                result = self._per_micro(rows, vectors, self._rows_vmap)
                owner.per_row = "vmap"
                return result
            except AccInfError:
                raise
            except Exception as error:  # noqa: BLE001 - any refusal of vmap means: use per-row weights
                logger.info("Per-row quantities by per-row loss weights: %s cannot be vmapped over single rows (%s).",
                            type(owner.model).__name__, type(error).__name__)
                owner.per_row = "weights"
        compute = self._rows_vmap if owner.per_row == "vmap" else self._rows_weights
        return self._per_micro(rows, vectors, compute)

    def _per_micro(self, rows: torch.Tensor, vectors: torch.Tensor | None, compute) -> torch.Tensor:
        """``compute(micro, local rows, their positions in rows, vectors, out)`` per micro-batch holding ``rows``."""
        rows = rows.cpu()
        out = torch.empty(len(rows), self.owner.dim, dtype=self.point.dtype, device=self.point.device)
        owners = self.micro_of[rows]
        for index in owners.unique().tolist():
            selected = (owners == index).nonzero().flatten()
            compute(self.micros[index], self.local[rows[selected]], selected, vectors, out)
        return out

    def _rows_vmap(self, micro: _Micro, local: torch.Tensor, selected: torch.Tensor, vectors: torch.Tensor | None,
                   out: torch.Tensor) -> None:
        if vectors is None:
            per_row = vmap(grad(self._row_loss), in_dims=(None, 0, 0))
        else:
            def one(v, row_inputs, target):
                gradient = grad(lambda named: self._row_loss(named, row_inputs, target))
                return jvp(gradient, (self.named,), (self.owner.unflatten(v),))[1]

            per_row = vmap(one)
        rows, _ = self._plan(memory.ROW_GRADS if vectors is None else memory.ROW_HVP, micro, len(local))
        for start in range(0, len(local), rows):
            part = selected[start:start + rows]
            block = micro.take(local[start:start + rows])
            first = self.named if vectors is None else vectors[part.to(vectors.device)]
            self._place(out, per_row(first, block.inputs, block.targets), part)

    def _rows_weights(self, micro: _Micro, local: torch.Tensor, selected: torch.Tensor,
                      vectors: torch.Tensor | None, out: torch.Tensor) -> None:
        cost = memory.WEIGHTED_GRADS if vectors is None else memory.WEIGHTED_HVP
        rows, chunk = self._plan(cost, micro, len(local), len(local))
        for start in range(0, len(local), rows):
            part = selected[start:start + rows]
            block = micro.take(local[start:start + rows])
            one_hot = torch.eye(len(part), dtype=self.point.dtype, device=self.point.device)

            def weighted(named, weights):
                return (weights * self._losses(named, block)).sum()

            if vectors is None:
                values = vmap(grad(weighted), in_dims=(None, 0), chunk_size=chunk)(self.named, one_hot)
            else:
                def one(v, weights):
                    gradient = grad(lambda named: weighted(named, weights))
                    return jvp(gradient, (self.named,), (self.owner.unflatten(v),))[1]

                values = vmap(one, chunk_size=chunk)(vectors[part.to(vectors.device)], one_hot)
            self._place(out, values, part)


class ModelCurvature(FlatLayout, HeadCurvature):
    """The model backend. ``scope``: full parameter names; ``states``: ``theta_t`` and the step's inputs
    (may be ``None`` when only the objective side is used: ``objective_grad``, ``example_grads``).
    ``memory_budget``: bytes of working memory for one block of a batched quantity (module docstring);
    ``vector_chunk``: an optional cap on the vectors vmapped at once."""

    def __init__(self, trajectory: Trajectory | None, model: nn.Module, scope: list[str] | tuple[str, ...],
                 states: TrajectoryStates | None, label_smoothing: float = 0.0, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu", per_row: str = "auto", vector_chunk: int | None = None,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET):
        if per_row not in PER_ROW_MODES:
            raise ValueError(f"per_row must be one of {PER_ROW_MODES}, got {per_row}")
        if memory_budget <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
        self.trajectory, self.states = trajectory, states
        self.label_smoothing, self.dtype, self.device = label_smoothing, dtype, torch.device(device)
        self.per_row, self.vector_chunk, self.memory_budget = per_row, vector_chunk, int(memory_budget)
        self.additive_mask: bool | None = None  # decided on the first padding mask seen
        self._row_bytes: dict[tuple, int] = {}
        self.model = copy.deepcopy(model).to(self.device, dtype).eval()
        if hasattr(self.model, "set_attn_implementation"):
            # Fused SDPA kernels have no forward-mode AD; eager attention in the model's dtype is the same function.
            self.model.set_attn_implementation(EXACT_ATTENTION)
        shapes = {name: p.shape for name, p in self.model.named_parameters()}
        missing = [name for name in scope if name not in shapes]
        if missing:
            raise ValueError(f"scope names {missing[:5]} are not parameters of {type(model).__name__}")
        self.chosen = [name for name in shapes if name in set(scope)]
        self.chosen_set = set(self.chosen)
        self.shapes = {name: shapes[name] for name in self.chosen}
        self.sizes = [int(torch.Size(shape).numel()) for shape in self.shapes.values()]
        self.dim = sum(self.sizes)
        ends = torch.tensor(self.sizes).cumsum(0).tolist()
        self.columns = {name: slice(end - size, end) for name, size, end in zip(self.chosen, self.sizes, ends)}
        self._names = set(shapes) | {name for name, _ in self.model.named_buffers()}
        self.num_classes = int(getattr(getattr(model, "config", None), "num_labels", 0) or 0)
        if trajectory is not None:
            self._labels = trajectory.labels.to(self.device)
            self._weights = trajectory.row_weight.to(self.device, dtype)

    def logits_named(self, named: dict[str, torch.Tensor], fixed: dict, inputs: dict) -> torch.Tensor:
        """The model's logits at the scope's parameters ``named`` and the others ``fixed``."""
        return _logits(functional_call(self.model, {**fixed, **named}, (), inputs))

    def row_bytes(self, batch: ModelBatch, micro: _Micro) -> int:
        """Bytes autograd saves for one row of ``micro``'s shape (measured once per shape)."""
        key = micro.shape_key()
        if key not in self._row_bytes:
            point = batch.point.detach().requires_grad_()
            one = micro.take(torch.zeros(1, dtype=torch.long))
            measured = memory.saved_bytes(lambda: batch._losses(self.unflatten(point), one).sum(),
                                          [point, *batch.fixed.values()])
            self._row_bytes[key] = max(measured, 1)
        return self._row_bytes[key]

    def _with_additive_mask(self, params: dict, inputs: dict) -> dict:
        """``inputs`` with a 2D padding mask in the 4D additive form, where the model's logits do not change
        (module docstring: what lets vmap run BERT over single rows)."""
        mask = inputs.get("attention_mask")
        if mask is None or mask.ndim != 2 or self.per_row == "weights" or self.additive_mask is False:
            return inputs
        expanded = {**inputs, "attention_mask": additive_mask(mask, self.dtype)}
        if self.additive_mask is None:
            with torch.no_grad():
                plain = _logits(functional_call(self.model, params, (), inputs))
                try:
                    rewritten = _logits(functional_call(self.model, params, (), expanded))
                except Exception:  # noqa: BLE001 - a model that cannot take a 4D mask keeps its 2D mask
                    rewritten = None
            tolerance = 64 * torch.finfo(self.dtype).eps * max(1.0, float(plain.abs().max()))
            self.additive_mask = (rewritten is not None and rewritten.shape == plain.shape
                                  and bool((plain - rewritten).abs().max() <= tolerance))
            if not self.additive_mask:
                logger.info("%s reads a 4D attention mask differently from its 2D padding mask: the 2D mask is kept.",
                            type(self.model).__name__)
                return inputs
        return expanded

    def _cast_params(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
                for name, value in params.items() if name in self._names}

    def _cast_inputs(self, inputs: dict) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
                for key, value in inputs.items() if isinstance(value, torch.Tensor) and key != "labels"}

    def _targets(self, labels: torch.Tensor, params: dict, inputs: dict) -> torch.Tensor:
        if not self.num_classes:
            with torch.no_grad():
                self.num_classes = _logits(functional_call(self.model, params, (), inputs)).shape[-1]
        return target_distribution(labels.to(self.device), self.num_classes, self.label_smoothing, self.dtype)

    def _batch(self, params: dict, batches: list[tuple[dict, torch.Tensor]], labels: torch.Tensor,
               weights: torch.Tensor) -> ModelBatch:
        params = self._cast_params(params)
        micros = []
        for inputs, where in batches:
            where = torch.as_tensor(where, dtype=torch.long).cpu()
            inputs = self._with_additive_mask(params, self._cast_inputs(inputs))
            micros.append(_Micro(inputs, self._targets(labels[where.to(labels.device)], params, inputs),
                                 weights[where.to(weights.device)], where))
        return ModelBatch(self, params, micros)

    def at_step(self, step: int) -> ModelBatch:
        rows = self.trajectory.rows_of(step)
        return self._batch(self.states.parameters_at(step), self.states.batch_inputs(step),
                           self._labels[rows], self._weights[rows])

    # The objective side: ``inputs`` is a list of collated model-input batches, ``labels`` their labels.

    def evaluation_inputs(self, model: nn.Module, head_name: str, dataset, collate_fn=None, tokenizer=None,
                          batch_size: int = 64):
        from ..inputs.evaluation import labelled_batches
        from ..inputs.collate import eval_collator

        pairs = list(labelled_batches(dataset, eval_collator(model, tokenizer, collate_fn), batch_size))
        return [inputs for inputs, _ in pairs], torch.cat([labels.cpu() for _, labels in pairs])

    def parameters_at(self, step: int) -> dict[str, torch.Tensor]:
        return self.states.parameters_at(step)

    def optimizer_state(self, step: int, key: str) -> torch.Tensor:
        """The scope's optimizer state ``key`` before ``step`` from the provider (replay), in this layout."""
        if key == "param":
            return self.flatten(self.states.parameters_at(step))
        if not hasattr(self.states, "optimizer_state_at"):
            raise AccInfError("This method needs the optimizer state of the scope at every step: score a run "
                              "recorded by this version of hf_accinf (replay restores it from the checkpoints).")
        state = self.states.optimizer_state_at(step)
        values = {}
        for name in self.chosen:
            held = state.get(name)
            if not held:  # torch creates a parameter's state at its first step: zero before it
                values[name] = torch.zeros(self.shapes[name])
            elif key not in held:
                raise AccInfError(f"The optimizer state of '{name}' before step {step} has no '{key}' (it holds "
                                  f"{sorted(held)}): the run's optimizer is not the one recorded in its manifest, or "
                                  "its checkpoints are incomplete. Record the run again.")
            else:
                values[name] = held[key]
        return self.flatten(values)

    def _eval_batch(self, params, inputs: list[dict], labels: torch.Tensor, weights: torch.Tensor) -> ModelBatch:
        bounds = torch.tensor([0] + [len(next(iter(b.values()))) for b in inputs]).cumsum(0)
        batches = [(batch, torch.arange(int(lo), int(hi))) for batch, lo, hi in zip(inputs, bounds[:-1], bounds[1:])]
        return self._batch(params, batches, labels.to(self.device), weights)

    def example_grads(self, params, inputs, labels) -> torch.Tensor:
        weights = torch.ones(len(labels), dtype=self.dtype, device=self.device)
        batch = self._eval_batch(params, inputs, labels, weights)
        return batch.row_grads(torch.arange(len(labels)))

    def objective_grad(self, params, inputs, labels) -> torch.Tensor:
        return self._eval_batch(params, inputs, labels, mean_weights(labels, self.dtype, self.device)).batch_grad

    def shifted_losses(self, params, shifts, inputs, labels) -> torch.Tensor:
        batch = self._eval_batch(params, inputs, labels, mean_weights(labels, self.dtype, self.device))
        return batch.shifted_batch_losses(shifts.to(batch.point))
