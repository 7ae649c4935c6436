"""Exact retraining of many counterfactual runs at once: the one retraining entry point.

DESIGN.md section 2 (the counterfactual): run ``m`` is the recorded run replayed from checkpoint 0 with
row ``j``'s loss weight multiplied by ``weight_scales[m, j]`` at every occurrence, the divisors, batch
order, learning rates, clipping and dropout masks unchanged. Section 6b (replay) gives the recipe:
per recorded micro-batch the CPU (and CUDA) random state is restored before the forward pass, the
loss is ``sum_r w_r l_r``, gradients accumulate over the step's micro-batches, and the optimizer of the
manifest steps with the recorded learning rate of each parameter group.

The ``M`` runs share one model: their parameters are stacked along a leading dimension and the
forward pass is ``torch.func.vmap`` of ``functional_call`` over it (``randomness="same"``: each model
draws the dropout mask the unbatched replay draws); one backward pass gives every model's gradient
(the models are independent), and the functional optimizer step (:func:`~hf_accinf.evaluation.optim.optimizer_step`,
global clipping per model) is vmapped too. Every row, the base run (a row of ones) included, goes
through the same code, so that differences between rows carry no rounding of their own. ``M`` is cut
into chunks that fit the memory budget; with ``with_base`` each chunk retrains the base run too, and
each row's effect is taken against the base of its own chunk.

``--verify`` (:mod:`.verify`) calls it with rows of weight 0 and 0.5; subset verification calls it with
rows that put whole subsets at 0.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from ..errors import AccInfError
from ..evaluation.optim import optimizer_step
from ..optimizers import OPTIMIZERS
from ..losses import cross_entropy_rows, target_distribution
from ..problem import OptimizerSpec
from ..trajectory import RunReader
from ..trajectory.replay import CHEAP_CHECK_TOLERANCE, Replay
from ..trajectory.schema import OPTIMIZER_KEY_SEPARATOR

logger = logging.getLogger(__name__)

Parameters = dict[str, torch.Tensor]
WORKSPACE_COPIES = 4
"""Per model, besides the optimizer state: parameters, accumulated gradients, and the optimizer step's new
parameters and temporaries, each the size of the trainable parameters (what the chunking budgets for)."""
ACTIVATION_COPIES = 3
"""Per model, the bytes the forward pass saves for the backward pass times this: the saved tensors, their
gradients during the backward pass and the batched forward's contiguous copies. Measured on the quickstart
ViT (101 models): about 13.5 MB of peak resident memory per model against 4.7 MB of saved tensors."""


@dataclass
class RetrainingResult:
    """What :meth:`BatchedRetraining.retrain` returns.

    ``values``: per counterfactual row (first dimension ``M``), ``evaluate``'s output at its final parameters,
    or the final parameters themselves (a dict of ``(M, *shape)`` tensors) without ``evaluate``.
    ``base``: the same for the base run (a row of ones) retrained alongside each chunk (``with_base``), first
    dimension the number of chunks; ``chunk_of[m]`` is the chunk of row ``m``, so that row ``m``'s effect is
    ``values[m] - base[chunk_of[m]]``.
    """

    values: torch.Tensor | Parameters
    base: torch.Tensor | Parameters | None
    chunk_of: torch.Tensor
    models_per_chunk: int
    replay_error: float | None  # the base run's parameters at the recorded checkpoints (see BatchedRetraining.retrain)
    loss_error: float | None  # the base run's step losses against the recorded ones, largest relative difference
    seconds: float

    def effect(self) -> torch.Tensor:
        """``values[m] - base[chunk_of[m]]`` (evaluated results with ``with_base`` only)."""
        if self.base is None or not isinstance(self.values, torch.Tensor):
            raise AccInfError("effect() needs evaluated values and the base run: retrain with evaluate= and "
                              "with_base=True.")
        return self.values - self.base[self.chunk_of]


class BatchedRetraining:
    """The recorded run's model, optimizer and batches, ready to retrain many counterfactuals together.

    >>> retraining = BatchedRetraining(RunReader("run"), train_dataset)  # doctest: +SKIP
    >>> scales = torch.ones(3, len(train_dataset)); scales[1, 7] = 0; scales[2, 7] = 0.5  # doctest: +SKIP
    >>> final = retraining.retrain(scales).values  # {name: (3, *shape)}  # doctest: +SKIP
    """

    def __init__(self, run: RunReader, train_dataset, collate_fn: Callable | None = None,
                 device: str | torch.device = "cpu", memory_budget: int = 2**30, model=None):
        self.run = run
        # checks, batch inputs, the model at step 0 (``model``: the run's model or a factory, RunReader.build_model)
        self.replay = Replay(run, train_dataset, collate_fn, device, model=model)
        self.device = self.replay.device
        self.model = self.replay.model
        config = getattr(self.model, "config", None)
        attention_dropout = max(float(getattr(config, key, 0.0) or 0.0)
                                for key in ("attention_probs_dropout_prob", "attention_dropout"))
        if getattr(config, "_attn_implementation", None) == "sdpa" and attention_dropout == 0.0 \
                and hasattr(self.model, "set_attn_implementation"):
            # torch's SDPA has no vmap batching rule on CPU: its per-model fallback makes the backward pass
            # quadratic in the number of models. Eager attention is the same function (to round-off); with
            # attention dropout SDPA is kept, as its fused kernels may draw the masks otherwise.
            self.model.set_attn_implementation("eager")
        self.trajectory = self.replay.trajectory
        self.length = run.manifest.dataset.length
        self.num_labels, self.smoothing = self.replay.num_labels, self.replay.smoothing
        tensors, metadata = run.load_optimizer_state(0)
        self.spec = _optimizer_spec(run, metadata)
        named = dict(self.model.named_parameters())
        self.names = [name for name in named if name in self.spec.group_of and named[name].requires_grad]
        self.initial = {name: named[name].detach() for name in self.names}
        self.initial_state = _initial_state(self.spec.name, self.initial, tensors)
        self.memory_budget = memory_budget
        trainable = sum(p.numel() * p.element_size() for p in self.initial.values())
        self.model_bytes = trainable * (WORKSPACE_COPIES + len(OPTIMIZERS[self.spec.name].state_keys)) \
            + ACTIVATION_COPIES * self._activation_bytes()

    # -- public ------------------------------------------------------------------------------------
    def models_per_chunk(self, with_base: bool = False) -> int:
        """How many models one chunk retrains within the memory budget (the base included)."""
        fits = int(self.memory_budget // max(self.model_bytes, 1))
        if fits < 1 + int(with_base):
            raise AccInfError(
                f"The retraining budget of {self.memory_budget / 2**30:.3g} GiB cannot hold {1 + int(with_base)} "
                f"models of about {self.model_bytes / 2**20:.1f} MiB each (parameters, gradients, optimizer state "
                "and activations of the largest micro-batch); raise --memory_budget_gb."
            )
        return fits

    def retrain(self, weight_scales: torch.Tensor, evaluate: Callable[[Parameters], torch.Tensor] | None = None,
                with_base: bool = False, models_per_chunk: int | None = None, progress: bool = True,
                description: str = "retraining") -> RetrainingResult:
        """Retrain one run per row of ``weight_scales`` ``(M, N)`` from step 0 to the end, chunk by chunk.

        ``evaluate(parameters)`` maps the stacked final parameters ``{name: (m, *shape)}`` of a chunk to one
        tensor with first dimension ``m`` (e.g. :meth:`losses`); without it the final parameters are returned.
        Rows of ones (and the base with ``with_base``) are checked against the record: each step's loss
        (``loss_error``, relative; refused beyond the replay's step tolerance at the first step, where a different
        collator shows, and warned about beyond it later) and the parameters at every checkpoint
        (``replay_error``: normwise, relative to the interval's movement, without the gauge tensors that the
        replay finds (:meth:`Replay.gauge_parameters`: tensors such as attention key biases whose true gradient is
        zero, which Adam moves by amplified round-off and which do not change the model's outputs).
        """
        scales = self._check_scales(weight_scales)
        started = time.perf_counter()
        size = models_per_chunk or self.models_per_chunk(with_base)
        size = size - 1 if with_base else size
        if size < 1:
            raise AccInfError("models_per_chunk must leave room for one counterfactual besides the base run.")
        chunks = [scales[lo:lo + size] for lo in range(0, len(scales), size)]
        bar = tqdm(total=len(chunks) * self.trajectory.num_steps, desc=f"{description} ({len(scales)} models)",
                   disable=not progress, unit="step")
        values, bases, errors, loss_errors = [], [], [], []
        try:
            for chunk in chunks:
                if with_base:
                    chunk = torch.cat([torch.ones(1, self.length, dtype=chunk.dtype), chunk])
                final, replay_error, loss_error = self._retrain_chunk(chunk, bar)
                result = evaluate(final) if evaluate is not None else {n: v.detach() for n, v in final.items()}
                errors.append(replay_error)
                loss_errors.append(loss_error)
                if with_base:
                    bases.append(_take(result, slice(0, 1)))
                    result = _take(result, slice(1, None))
                values.append(result)
        finally:
            bar.close()
        chunk_of = torch.cat([torch.full((len(chunk),), index, dtype=torch.long) for index, chunk in enumerate(chunks)])
        replay_error = max((e for e in errors if e is not None), default=None)
        loss_error = max((e for e in loss_errors if e is not None), default=None)
        if loss_error is not None and loss_error > CHEAP_CHECK_TOLERANCE:
            logger.warning("the retrained base run's step losses differ from the recorded ones by up to %.3g "
                           "(relative): counterfactual effects are taken against the retrained base, but it does not "
                           "reproduce the recorded run", loss_error)
        return RetrainingResult(_cat(values), _cat(bases) if with_base else None, chunk_of, size + int(with_base),
                                replay_error, loss_error, time.perf_counter() - started)

    @torch.no_grad()
    def losses(self, parameters: Parameters,
               batches: list[tuple[dict[str, torch.Tensor], torch.Tensor]]) -> torch.Tensor:
        """``(m, E)`` float64: each model's cross-entropy on every evaluation row, in eval mode (label ``-100``
        rows: 0). ``batches``: ``(inputs, labels)`` pairs on this device, as :func:`~hf_accinf.inputs.evaluation.evaluation_batches` builds them."""
        self.model.eval()
        rows = []
        for inputs, labels in batches:
            logits = vmap(lambda p: functional_call(self.model, p, (), inputs).logits)(parameters).double()
            rows.append(torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), labels.expand(len(logits), -1), reduction="none").cpu())
        return torch.cat(rows, dim=1)

    # -- one chunk ------------------------------------------------------------------------------------
    def _retrain_chunk(self, scales: torch.Tensor, bar) -> tuple[Parameters, float | None, float | None]:
        count, trajectory = len(scales), self.trajectory
        parameters = {n: v.unsqueeze(0).expand(count, *v.shape).clone() for n, v in self.initial.items()}
        state = {k: v.unsqueeze(0).expand(count, *v.shape).clone() for k, v in self.initial_state.items()}
        ones = (scales == 1).all(dim=1).nonzero().flatten()
        reference = int(ones[0]) if len(ones) else None
        step_losses = torch.zeros(trajectory.num_steps, dtype=torch.float64, device=self.device)
        checkpoints = sorted(self.run.manifest.checkpoints)
        replay_error = None
        previous = self.run.load_checkpoint(0) if reference is not None else None
        for step in range(trajectory.num_steps):
            gradients, loss = self._gradients(step, parameters, scales)
            if reference is not None:
                step_losses[step] = loss[reference]
                if step == 0:
                    self._check_loss(0, float(loss[reference]))
            lrs = trajectory.lr[step].tolist()
            stepped = [n for n in self.names if gradients.get(n) is not None]  # torch skips those without one
            step_lrs = {n: lrs[self.spec.group_of[n]] for n in stepped}
            count_before = int(trajectory.optimizer_step_count[step])
            with torch.no_grad():
                new_parameters, new_state = vmap(
                    lambda p, s, g: optimizer_step(self.spec, p, s, g, step_lrs, count_before))(
                    {n: parameters[n] for n in stepped}, {k: v for k, v in state.items() if _owner(k) in stepped},
                    {n: gradients[n] for n in stepped})
            parameters.update(new_parameters)
            state.update(new_state)
            if reference is not None and step + 1 in checkpoints:
                recorded = self.run.load_checkpoint(step + 1)
                error = _relative_error({n: v[reference] for n, v in parameters.items()}, recorded, previous,
                                        skip=set(self.replay.gauge_parameters()))
                replay_error = max(replay_error or 0.0, error)
                previous = recorded
            bar.update(1)
        loss_error = None
        if reference is not None and trajectory.loss is not None:
            recorded_loss, step_losses = trajectory.loss.double(), step_losses.cpu()
            loss_error = float(((step_losses - recorded_loss).abs() / recorded_loss.abs().clamp(min=1e-12)).max())
        return parameters, replay_error, loss_error

    def _gradients(self, step: int, parameters: Parameters, scales: torch.Tensor) -> tuple[Parameters, torch.Tensor]:
        """Every model's accumulated gradient of step ``step`` and its loss ``sum_r w_r l_r`` (float64, ``(m,)``)."""
        trajectory = self.trajectory
        rows = trajectory.rows_of(step)
        weights = trajectory.row_weight[rows].unsqueeze(0) * scales[:, trajectory.row_index[rows]]  # (m, R) float64
        micro = trajectory.micro_batches_of(step)
        leaves = {n: p.detach().requires_grad_() for n, p in parameters.items()}
        forward = vmap(lambda p, inputs: functional_call(self.model, p, (), inputs).logits,
                       in_dims=(0, None), randomness="same")
        gradients: Parameters = {}
        total = torch.zeros(len(scales), dtype=torch.float64, device=self.device)
        saved_rng = torch.get_rng_state()
        self.model.train()
        try:
            for index, (inputs, positions) in zip(range(micro.start, micro.stop), self.replay.batch_inputs(step)):
                labels = inputs.pop("labels")
                if not torch.equal(labels.cpu(), trajectory.labels[rows][positions]):
                    raise AccInfError(f"The collated labels of step {step} differ from the recorded ones: pass the "
                                      "training dataset and collator the run was recorded with.")
                torch.set_rng_state(trajectory.rng_cpu[index].clone())
                if self.replay.restore_cuda_rng:  # a GPU run replayed elsewhere has no randomness (Replay)
                    torch.cuda.set_rng_state(trajectory.rng_cuda[index].clone(), self.device)
                logits = forward(leaves, inputs)  # (m, b, C)
                target = target_distribution(labels, self.num_labels, self.smoothing, dtype=logits.dtype)
                losses = cross_entropy_rows(logits, target)  # (m, b)
                row_weights = weights[:, positions].to(self.device)
                found = torch.autograd.grad((row_weights.to(logits.dtype) * losses).sum(), list(leaves.values()),
                                            allow_unused=True)
                for name, value in zip(leaves, found):
                    if value is not None:
                        gradients[name] = value if name not in gradients else gradients[name] + value
                total += (row_weights * losses.detach().double()).sum(1)
        finally:
            torch.set_rng_state(saved_rng)
        return gradients, total

    # -- checks and sizes ------------------------------------------------------------------------------
    def _check_scales(self, weight_scales) -> torch.Tensor:
        scales = torch.as_tensor(weight_scales, dtype=torch.float64).cpu()
        if scales.dim() != 2 or scales.shape[1] != self.length or len(scales) == 0:
            raise AccInfError(f"weight_scales must be (M, {self.length}): one row of loss-weight factors per "
                              f"retrained run, one column per training row; got {tuple(scales.shape)}.")
        if not torch.isfinite(scales).all():
            raise AccInfError("weight_scales must be finite.")
        return scales

    def _check_loss(self, step: int, loss: float) -> None:
        recorded = float(self.trajectory.loss[step]) if self.trajectory.loss is not None else math.nan
        if math.isfinite(recorded) and abs(loss - recorded) > CHEAP_CHECK_TOLERANCE * max(abs(recorded), 1e-12):
            raise AccInfError(f"Retraining does not reproduce the recorded run: the loss of step {step} is {loss:.8g}, "
                              f"recorded {recorded:.8g}. Pass the training dataset and collator the run was recorded "
                              "with.")

    def _activation_bytes(self) -> int:
        """Bytes the autograd graph saves for one model on the largest micro-batch of step 0 (an estimate)."""
        inputs = max(self.replay.batch_inputs(0), key=lambda item: len(item[1]))[0]
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        saved = [0]

        def pack(tensor):
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        self.model.train()
        with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.model(**inputs)
        return saved[0]


def retrain_many(run: RunReader, train_dataset, collate_fn: Callable | None, weight_scales: torch.Tensor,
                 evaluate: Callable[[Parameters], torch.Tensor] | None = None, with_base: bool = False,
                 device: str | torch.device = "cpu", memory_budget: int = 2**30,
                 progress: bool = True, model=None) -> RetrainingResult:
    """Retrain the recorded run once per row of ``weight_scales`` ``(M, N)`` (see :class:`BatchedRetraining`)."""
    retraining = BatchedRetraining(run, train_dataset, collate_fn, device, memory_budget, model)
    return retraining.retrain(weight_scales, evaluate, with_base=with_base, progress=progress)


# -- helpers -------------------------------------------------------------------------------------------------
def _optimizer_spec(run: RunReader, metadata: dict[str, str]) -> OptimizerSpec:
    """The functional step's description of the recorded optimizer: hyperparameters from the manifest, group
    membership of every parameter from the checkpoint's optimizer metadata."""
    manifest = run.manifest
    if manifest.optimizer_class not in OPTIMIZERS:
        raise AccInfError(f"Retraining supports torch SGD, Adam and AdamW, not {manifest.optimizer_class}.")
    members = json.loads(metadata["group_params"])
    if len(members) != len(manifest.param_groups):
        raise AccInfError(f"The checkpoint's optimizer has {len(members)} parameter groups, the manifest "
                          f"{len(manifest.param_groups)}: record the run again.")
    for group in manifest.param_groups:
        if group.amsgrad or group.maximize or (group.dampening or 0.0) != 0.0:
            raise AccInfError("Retraining models SGD without dampening and Adam/AdamW without amsgrad or maximize.")
    group_of = {name: index for index, names in enumerate(members) for name in names}
    return OptimizerSpec(manifest.optimizer_class, manifest.param_groups, group_of,
                         manifest.training.max_grad_norm)


def _owner(state_key: str) -> str:
    """``"<param>.<state key>"`` -> ``"<param>"`` (parameter names contain dots, state keys do not)."""
    return state_key.rpartition(".")[0]


def _initial_state(optimizer: str, parameters: Parameters, tensors: dict[str, torch.Tensor]) -> Parameters:
    """The optimizer state before step 0, in the functional step's keys (zeros where the checkpoint has none)."""
    state = {}
    for name, value in parameters.items():
        for key in OPTIMIZERS[optimizer].state_keys:
            recorded = tensors.get(f"{name}{OPTIMIZER_KEY_SEPARATOR}{key}")
            state[f"{name}.{key}"] = recorded.to(value) if recorded is not None else torch.zeros_like(value)
    return state


def _relative_error(replayed: Parameters, recorded: Parameters, start: Parameters, skip: set[str] = frozenset()) -> float:
    """``||replayed - recorded|| / ||recorded - start||`` over the replayed parameters but the gauge tensors ``skip``
    (they do not change the outputs, and Adam moves them by amplified round-off: DESIGN.md section 6b)."""
    names = [n for n in replayed if n not in skip]
    error = sum(float((replayed[n].double().cpu() - recorded[n].double()).square().sum()) for n in names)
    moved = sum(float((recorded[n].double() - start[n].double()).square().sum()) for n in names)
    return math.sqrt(error / moved) if moved > 0 else (0.0 if error == 0 else math.inf)


def _take(result, index: slice):
    return {n: v[index] for n, v in result.items()} if isinstance(result, dict) else result[index]


def _cat(parts):
    if isinstance(parts[0], dict):
        return {n: torch.cat([part[n] for part in parts]) for n in parts[0]}
    return torch.cat(parts)
