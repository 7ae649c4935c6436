"""Exact ``theta_t`` of every parameter by replaying the recorded steps from sparse checkpoints.

DESIGN.md section 6b ("Exact theta_t for every parameter: replay from sparse checkpoints"). From the
checkpoint at or before ``t`` (model weights and optimizer state), each recorded step is rerun: for
every recorded micro-batch the random state that decided its dropout masks is restored, the model
runs in train mode on the collated rows, the loss is ``sum_r w_r l_r`` (recorded per-row weights,
cross-entropy with the manifest's label smoothing), gradients accumulate, they are clipped with
``max_grad_norm`` as the Trainer clips, every parameter group gets its recorded learning rate, and a
torch optimizer of the recorded class and hyperparameters steps.

Checks: each replayed step's loss and pre-clip gradient norm against the recorded ones (cheap, at
every step), and each interval's end against the next checkpoint where influence lives (DESIGN.md
section 6b, "Judge the replay where influence lives"): (a) the model's outputs, the logits of the replayed
and the recorded parameters on the interval's first and last steps' rows (float64, eval mode), relative
to how far the interval moved them; (b) the parameters relative to how far the interval moved them and
(c) each optimizer-state key relative to its size, both without the gauge tensors
(:mod:`.gauge`: tensors that do not change the outputs, like attention key biases under absolute
positions, whose float32 random walk no replay reproduces; their error is reported apart). A replay
beyond :data:`REPLAY_TOLERANCE` (``--replay_tolerance``) in (a), (b) or (c) is refused with the reason it
can happen. :func:`replay_unavailable` says beforehand why a run cannot be replayed at all.

Random states: a run trained on a GPU recorded each micro-batch's CUDA generator state too. On a CUDA device
the replay restores both; elsewhere it accepts the run only when its randomness decides nothing (no positive
dropout-like config field, no active ``nn.Dropout``, and a training-mode forward draws no random number:
:func:`draws_random_numbers`), ignores the CUDA states and says so (``ReplayReport.randomness``); otherwise
it refuses and names ``--device cuda``.

Numerics: the replay runs under the training run's thread count (``numerics.torch_threads`` in the
manifest, capped at the CPUs available here), because CPU reductions are split by thread, and weighs the
rows by the recorded weights snapped to the reciprocal integers the Trainer used (:func:`exact_weights`).
Measured with ``scripts/replay_threads.py`` (BERT with the HF default AdamW recipe; docs/RECORDING.md):
a replay under the recorded count is bitwise equal to the run (1 thread and 2 threads alike); under
another count it is not: the gauge tensors walk elsewhere (0.7 to 2.4 times their own movement), the
other parameters differ by 2e-7 to 3e-5 of the interval's movement, the outputs by 3e-8 to 5e-7.
Also not bitwise: runs recorded before the thread count was (replayed under the current count),
weights that are not reciprocal integers, several processes (summed here in one), GPU kernels that are
not deterministic, other library versions.

Memory is bounded by one checkpoint interval: the interval being served is cached, so that a
reverse walk (``T-1`` down to ``0``) replays each interval forward once and serves it backwards;
where an interval does not fit ``memory_budget`` it is cut into sub-intervals whose starting states
are kept and which are recomputed when needed (two-level checkpointing, about ``sqrt(L)`` states).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from ..errors import AccInfError
from ..inputs.collate import model_collator
from ..optimizers import OPTIMIZERS
from ..losses import cross_entropy_rows, target_distribution
from . import schema
from .gauge import find_gauge, probe_inputs
from .reader import RunReader

logger = logging.getLogger(__name__)

REPLAY_TOLERANCE = 1e-4
"""Largest accepted relative error of a replayed interval at the next checkpoint: of the outputs (logits on
the interval's probe rows) and of the parameters, each relative to how far the interval moved them, and of
each optimizer-state key relative to its size; normwise, the gauge tensors left out (a tensor whose true
gradient is zero, such as BERT's attention key bias, moves by round-off alone: its error changes no output).

The replay computes the loss as ``sum_r w_r l_r`` from measured weights where the Trainer computed
the model's own mean (or ``num_items_in_batch``) loss, and sums the processes' gradients in another
order: each step's gradient differs from the recorded one by float32 round-off (~1e-7 relative),
and these differences are carried, and may be amplified, along the interval. Measured on the test
runs (tiny BERT with dropout, AdamW, clipping, accumulation; ViT with SGD momentum): <= 1e-6 over
4-step intervals. A different dataset, collator or dropout mask gives errors of order 1e-2 to 1.
``ScoreArguments.replay_tolerance`` (``--replay_tolerance``) overrides it.
"""
CHEAP_CHECK_TOLERANCE = 1e-3
"""Largest accepted relative difference of a replayed step's loss or pre-clip gradient norm."""
DROPOUT_WORDS = ("dropout", "drop_path", "layerdrop")  # config fields whose positive value means random masks
WHY = ("This happens when the training dataset or collator differs from the recorded one (other rows, order "
       "or preprocessing), when kernels are not deterministic (some GPU kernels; set "
       "torch.use_deterministic_algorithms(True) when recording), or when torch/transformers versions differ "
       "from those recorded in the manifest.")

State = tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]


@dataclass
class IntervalError:
    """Replay error of one checkpoint interval ``[start, stop)`` measured at checkpoint ``stop``."""

    start: int
    stop: int
    parameter_max_abs: float = field(metadata={"help": "max |replayed - recorded| over the parameters and buffers "
                                                       "other than the gauge tensors."})
    parameter_rel: float = field(metadata={"help": "||replayed - recorded|| / ||recorded - checkpoint at start|| "
                                                   "without the gauge tensors: the error relative to how far the "
                                                   "interval moved the model."})
    state_max_abs: float = field(metadata={"help": "max |replayed - recorded| over the optimizer's state tensors "
                                                   "of the parameters other than the gauge tensors."})
    state_rel: float = field(metadata={"help": "max over state keys (exp_avg, ...) of ||replayed - recorded|| / "
                                               "||recorded||, gauge tensors left out (inf when the per-parameter "
                                               "step counts differ)."})
    worst: str = field(metadata={"help": "What is furthest off: 'outputs', or the judged tensor with the largest "
                                         "error relative to its own size (diagnosis)."})
    output_max_abs: float = field(default=0.0, metadata={
        "help": "max |replayed - recorded| of the logits on the probe rows (float64, eval mode)."})
    output_rel: float = field(default=0.0, metadata={
        "help": "||logits(replayed) - logits(recorded)|| / ||logits(recorded) - logits(checkpoint at start)|| on the "
                "interval's first and last steps' rows: the error of what influence depends on."})
    gauge_max_abs: float = field(default=0.0, metadata={
        "help": "max |replayed - recorded| over the gauge tensors (reported, not judged)."})
    gauge_rel: float = field(default=0.0, metadata={
        "help": "||replayed - recorded|| / ||recorded - checkpoint at start|| over the gauge tensors (reported, "
                "not judged: their random walk does not change the outputs)."})

    @property
    def max_rel(self) -> float:
        return max(self.parameter_rel, self.state_rel, self.output_rel)


@dataclass
class ReplayReport:
    intervals: list[IntervalError]
    tolerance: float
    gauge: tuple[str, ...] = ()  # the gauge tensors left out of the judged norms
    randomness: str = ""  # which recorded random states the replay restored, or why it ignored them
    precision: str = "no"  # the run's mixed precision ("bf16": replayed under its autocast, tolerance to fit)

    @property
    def max_rel(self) -> float:
        return max((interval.max_rel for interval in self.intervals), default=0.0)

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"tolerance": self.tolerance, "max_rel": self.max_rel, "ok": self.ok, "precision": self.precision,
                "randomness": self.randomness,
                "gauge": list(self.gauge),
                "gauge_max_rel": max((i.gauge_rel for i in self.intervals), default=0.0),
                "output_max_rel": max((i.output_rel for i in self.intervals), default=0.0),
                "intervals": [asdict(interval) for interval in self.intervals]}


def _normwise(replayed: dict[str, torch.Tensor], recorded: dict[str, torch.Tensor],
              reference: dict[str, torch.Tensor] | None = None,
              names: set[str] | None = None) -> tuple[float, float, str]:
    """``(max |replayed - recorded|, ||replayed - recorded|| / ||recorded - reference||, worst tensor)`` over the
    floating tensors of ``recorded`` (only those in ``names`` when given; ``reference`` absent: ``||recorded||``);
    the worst tensor by its own relative error (``""`` when every tensor agrees)."""
    worst_abs, squared_error, squared_scale, worst, worst_rel = 0.0, 0.0, 0.0, "", 0.0
    for name, truth in recorded.items():
        if not truth.is_floating_point() or (names is not None and name not in names):
            continue
        value = replayed.get(name)
        if value is None:
            return math.inf, math.inf, name
        difference = value.detach().to(truth.device, torch.float64) - truth.double()
        base = truth.double() - (reference[name].double() if reference is not None else 0.0)
        error, scale = difference.square().sum().item(), base.square().sum().item()
        worst_abs = max(worst_abs, difference.abs().max().item() if difference.numel() else 0.0)
        squared_error, squared_scale = squared_error + error, squared_scale + scale
        own = math.sqrt(error / scale) if scale > 0 else (0.0 if error == 0 else math.inf)
        if own > worst_rel:
            worst_rel, worst = own, name
    return worst_abs, _ratio(squared_error, squared_scale), worst


def _ratio(squared_error: float, squared_scale: float) -> float:
    if squared_error == 0:
        return 0.0
    return math.sqrt(squared_error / squared_scale) if squared_scale > 0 else math.inf


def exact_weights(measured: torch.Tensor, tolerance: float = 1e-6) -> torch.Tensor:
    """The recorded loss weights, each snapped to ``1 / k`` for the integer ``k`` it is within ``tolerance`` of
    (relative; a mixed-precision run's weights are measured from rounded logit gradients: its unit roundoff).

    The recorder measures every row's weight from the gradient that reached the logits (float32, ~1e-8
    relative); the Trainer's weights are reciprocals of integers (a mean over ``k`` rows, ``num_items_in_batch``,
    accumulation and processes). With the measured value a step whose weight rounds to another float32 than
    ``1 / k`` is not bitwise (measured: one step in 40 on a tiny BERT); snapped, it is."""
    count = torch.round(1.0 / measured)
    close = (measured * count - 1.0).abs() < tolerance
    return torch.where(close, 1.0 / count, measured)


def has_dropout(model_config: dict[str, Any], model: torch.nn.Module | None = None) -> bool:
    """Whether the model draws random masks in training: a positive dropout-like field of its config, or an
    ``nn.Dropout`` with ``p > 0`` among its modules."""
    for key, value in model_config.items():
        if any(word in key for word in DROPOUT_WORDS) and isinstance(value, (int, float)) and value > 0:
            return True
    if model is not None:
        return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())
    return False


def replay_unavailable(run: RunReader, device: str | torch.device = "cpu",
                       model: torch.nn.Module | None = None) -> str | None:
    """Why the recorded run cannot be replayed on ``device`` (``None``: it can), before any work.

    A run trained on a GPU draws its dropout masks from the CUDA generator: on a CPU it is replayable only
    when the model has no dropout (its random state then decides nothing; ``model``, if given, is checked
    too)."""
    manifest = run.manifest
    if manifest.schema_version < schema.REPLAY_SCHEMA_VERSION:
        return (f"{run.run_dir} was recorded with run-directory schema {manifest.schema_version}, which does not hold "
                "the optimizer state and random states a replay needs. Record the run again with this hf_accinf.")
    if manifest.training.fp16:
        return ("Replay of fp16 runs is not supported (their loss scaling and skipped steps are not modelled); "
                "record in float32 or with bf16=True.")
    if manifest.optimizer_class not in OPTIMIZERS:
        return f"Replay supports torch SGD, Adam and AdamW, not {manifest.optimizer_class}."
    if torch.device(device).type != "cuda" and run.trajectory().rng_cuda is not None \
            and has_dropout(manifest.model_config, model):
        return GPU_RANDOMNESS
    return None


GPU_RANDOMNESS = ("This run was trained on a GPU with dropout (or another layer that draws random numbers in "
                  "training): its masks came from the CUDA generator, whose recorded states only a GPU restores. "
                  "Score it on a GPU: `hf-accinf score --device cuda` (device='cuda'); or record with dropout off.")


def draws_random_numbers(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> bool:
    """Whether a training-mode forward of ``model`` on ``inputs`` draws from the random generator of the
    inputs' device: the rule, beyond :func:`has_dropout`'s config fields and modules, that catches any random
    layer (a functional dropout, layer drop, stochastic depth, noise). Run once, without gradients; the
    model's mode and the generator's state are restored."""
    device = next(iter(v for v in inputs.values() if isinstance(v, torch.Tensor))).device
    get_state, set_state = (torch.get_rng_state, torch.set_rng_state) if device.type == "cpu" else \
        (lambda: torch.cuda.get_rng_state(device), lambda s: torch.cuda.set_rng_state(s, device))
    saved, was_training = get_state(), model.training
    model.train()
    try:
        with torch.no_grad():
            model(**{k: v for k, v in inputs.items() if k != "labels"})
        return not torch.equal(saved, get_state())
    finally:
        set_state(saved)
        model.train(was_training)


def available_threads() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def thread_count(count: int | None):
    """Run the block under ``count`` torch threads (``None``: unchanged), restoring the current count."""
    current = torch.get_num_threads()
    if count is None or count == current:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(current)


def _by_key(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    result: dict[str, dict[str, torch.Tensor]] = {}
    for name, keys in state.items():
        for key, value in keys.items():
            if key != "step":
                result.setdefault(key, {})[name] = value
    return result


class Replay:
    """Every parameter and the optimizer state at any step of a recorded run, rebuilt by replay.

    >>> replay = Replay(RunReader("run"), train_dataset)  # doctest: +SKIP
    >>> theta = replay.parameters_at(17)  # every state_dict entry before step 17, float32  # doctest: +SKIP
    >>> replay.check().max_rel  # doctest: +SKIP
    >>> replay.gauge_parameters()  # e.g. BERT's attention key biases  # doctest: +SKIP

    Returned tensors belong to the cache: read them, do not modify them in place. Steps run under the
    recorded thread count (see the module docstring for what is bitwise).
    """

    def __init__(self, run: RunReader, train_dataset, collate_fn: Callable | None = None, device: str | torch.device = "cpu",
                 memory_budget: int = 2**30, tolerance: float = REPLAY_TOLERANCE, check_steps: bool = True,
                 model: torch.nn.Module | Callable | None = None):
        manifest = run.manifest
        self.device = torch.device(device)
        reason = replay_unavailable(run, self.device)
        if reason is not None:
            raise AccInfError(reason)
        run.check_dataset(train_dataset)
        self.run, self.dataset = run, train_dataset
        # A mixed-precision run replays under its own autocast; the tolerances then fit its rounding (the
        # larger of the one given and schema.MIXED_PRECISION_TOLERANCE: no replay is closer than one rounding).
        self.precision = manifest.training.precision
        dtype = manifest.numerics.get("autocast_dtype", schema.MIXED_PRECISION_DTYPES.get(self.precision))
        self.autocast_dtype = getattr(torch, dtype) if dtype else None
        floor = schema.MIXED_PRECISION_TOLERANCE.get(self.precision, 0.0)
        self.tolerance, self.check_steps = max(tolerance, floor), check_steps
        self.cheap_tolerance = max(CHEAP_CHECK_TOLERANCE, floor)
        self.weight_snap = schema.MIXED_PRECISION_ROUNDOFF.get(self.precision, 1e-6)
        trained_on = manifest.numerics.get("device", self.device.type)
        if self.autocast_dtype is not None and trained_on != self.device.type:
            logger.info("the run autocast its forward to %s on %s; the replay autocasts on %s (other kernels: the "
                        "replay check judges the difference)", dtype, trained_on, self.device.type)
        self.trajectory = run.trajectory()
        # ``model``: the run's model or a factory, when its class cannot be imported (RunReader.build_model).
        self.model = run.build_model(step=0, model=copy.deepcopy(model) if isinstance(model, torch.nn.Module) else model).to(self.device)
        self.num_threads = self._threads(manifest.numerics.get("torch_threads"))
        self.collate = model_collator(self.model, collate_fn)
        self.restore_cuda_rng = self.trajectory.rng_cuda is not None and self.device.type == "cuda"
        self.randomness = self._randomness(run)
        self.num_labels = manifest.loss.num_labels
        self.smoothing = manifest.loss.label_smoothing
        self.max_grad_norm = manifest.training.max_grad_norm
        self.checkpoints = sorted(manifest.checkpoints)
        self.params = dict(self.model.named_parameters())
        self.optimizer = self._build_optimizer(run.load_optimizer_state(0)[1])
        state_bytes = sum(p.numel() * p.element_size() for p in self.params.values())
        buffer_bytes = sum(b.numel() * b.element_size() for b in self.model.buffers())
        self.state_bytes = state_bytes * (1 + len(OPTIMIZERS[manifest.optimizer_class].state_keys)) + buffer_bytes
        self.memory_budget = memory_budget
        self.errors: dict[tuple[int, int], IntervalError] = {}
        self._interval: tuple[int, int] | None = None
        self._stride = 0
        self._snapshots: dict[int, State] = {}
        self._dense: dict[int, State] = {}
        self._gauge: tuple[str, ...] | None = None
        self._probe_model: torch.nn.Module | None = None

    def _randomness(self, run: RunReader) -> str:
        """Which recorded random states the replay restores; a GPU run replayed elsewhere is accepted only when
        its random states decide nothing (no dropout in the config or the modules, and a training-mode forward
        of the first step's rows draws no random number), and refused otherwise (:data:`GPU_RANDOMNESS`)."""
        if self.trajectory.rng_cuda is None:
            return f"restored: CPU random states on {self.device}"
        if self.restore_cuda_rng:
            return f"restored: CPU and CUDA random states on {self.device}"
        if replay_unavailable(run, self.device, self.model) is not None or \
                (self.num_steps > 0 and draws_random_numbers(self.model, self.batch_inputs(0)[0][0])):
            raise AccInfError(GPU_RANDOMNESS)
        message = (f"unused (dropout off, no random layer): the run's CUDA random states are ignored on "
                   f"{self.device}")
        logger.info("replaying a GPU run: %s", message)
        return message

    @staticmethod
    def _threads(recorded: int | None) -> int | None:
        if recorded is None:
            return None
        available = available_threads()
        if recorded > available:
            logger.info("the run was trained with %d threads, %d CPUs here: replaying with %d threads (CPU "
                        "reductions may then round differently; the replay check judges the difference)",
                        recorded, available, available)
            return available
        return int(recorded)

    # -- public ------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.run.num_steps

    def parameters_at(self, step: int) -> dict[str, torch.Tensor]:
        """Every ``state_dict`` entry before step ``step`` (``0 <= step <= T``), float32 as trained."""
        return dict(self._state_at(step)[0])

    def optimizer_state_at(self, step: int) -> dict[str, dict[str, torch.Tensor]]:
        """Per parameter name, the optimizer's state before step ``step`` (empty before its first step)."""
        return {name: dict(keys) for name, keys in self._state_at(step)[1].items()}

    def batch_inputs(self, step: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Per recorded micro-batch: the collated model inputs (``labels`` included) on the replay device, and
        the positions of its rows among the step's recorded rows."""
        self._check_step(step, self.num_steps - 1)
        trajectory = self.trajectory
        rows = trajectory.batch(step)
        sizes = trajectory.micro_size[trajectory.micro_batches_of(step)].tolist()
        if sum(sizes) != len(rows):
            raise AccInfError(f"Step {step} records {len(rows)} rows but micro-batches of {sizes} rows; record the run again.")
        result, start = [], 0
        for size in sizes:
            positions = torch.arange(start, start + size)
            start += size
            indices = rows[positions].tolist()
            fetched = self.dataset.__getitems__(indices) if hasattr(self.dataset, "__getitems__") else [self.dataset[i] for i in indices]
            batch = self.collate(fetched)
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            result.append((batch, positions))
        return result

    def check(self) -> ReplayReport:
        """Replay every checkpoint interval and compare its end with the next checkpoint.

        Interval errors above tolerance are reported, not raised; a step whose loss, gradient norm or labels
        already disagree with the record is refused at once (nothing after it can be compared)."""
        for start, stop in zip(self.checkpoints, self.checkpoints[1:]):
            if (start, stop) not in self.errors:
                self._load(self._checkpoint_state(start))
                for step in range(start, stop):
                    self.step(step)
                self._compare(start, stop, self._snapshot(), refuse=False)
        return self.report()

    def report(self) -> ReplayReport:
        """The errors of the intervals replayed so far."""
        return ReplayReport([self.errors[key] for key in sorted(self.errors)], self.tolerance,
                            self._gauge if self._gauge is not None else (), self.randomness, self.precision)

    def gauge_parameters(self) -> tuple[str, ...]:
        """The parameters that do not change the model's outputs (:mod:`.gauge`), found once at the first and
        the last checkpoint on the rows of the first and the last step (``named_parameters`` names)."""
        if self._gauge is None:
            first, last = self.checkpoints[0], self.checkpoints[-1]
            probes = [(self._checkpoint_state(point)[0], self._probe_inputs(min(point, self.num_steps - 1)))
                      for point in dict.fromkeys((first, last))]
            with torch.enable_grad():
                self._gauge = find_gauge(self._float64_model(), probes)
            if self._gauge:
                logger.info("gauge tensors (no effect on the outputs; left out of the replay check): %s",
                            ", ".join(self._gauge))
        return self._gauge

    def train(self, weight_scale: dict[int, float] | torch.Tensor | None = None, start: int = 0,
              stop: int | None = None) -> dict[str, torch.Tensor]:
        """Rerun steps ``[start, stop)`` from the checkpoint at ``start`` with every occurrence of row ``j``'s
        loss weight multiplied by ``weight_scale[j]`` (divisors unchanged); return the final ``state_dict``.

        With no scale this is the recorded run (checked step by step and at every checkpoint); with scales
        it is the exact counterfactual retraining of DESIGN.md section 2, the same dropout masks included.
        """
        stop = self.num_steps if stop is None else stop
        if start not in self.checkpoints or not start <= stop <= self.num_steps:
            raise AccInfError(f"train() starts at a checkpoint ({self.checkpoints}) and stops by step {self.num_steps}.")
        scale = self._dense_scale(weight_scale)
        self._load(self._checkpoint_state(start))
        previous = start
        for step in range(start, stop):
            self.step(step, scale)
            if scale is None and step + 1 in self.checkpoints:
                if (previous, step + 1) not in self.errors:
                    self._compare(previous, step + 1, self._snapshot(), refuse=True)
                previous = step + 1
        return {name: tensor.detach().clone() for name, tensor in self.model.state_dict().items()}

    def step(self, step: int, scale: torch.Tensor | None = None) -> None:
        """One recorded optimizer step on the replay model and optimizer (their current state is the input),
        under the recorded thread count."""
        with thread_count(self.num_threads):
            self._step(step, scale)

    def _step(self, step: int, scale: torch.Tensor | None) -> None:
        trajectory = self.trajectory
        rows = trajectory.rows_of(step)
        weights = exact_weights(trajectory.row_weight[rows], self.weight_snap)
        if scale is not None:
            weights = weights * scale[trajectory.row_index[rows]]
        micro = trajectory.micro_batches_of(step)
        saved_rng = torch.get_rng_state()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        try:
            for index, (inputs, positions) in zip(range(micro.start, micro.stop), self.batch_inputs(step)):
                labels = inputs.pop("labels")
                if not torch.equal(labels.cpu(), trajectory.labels[rows][positions]):
                    self._refuse(step, f"the collated labels of step {step} differ from the recorded ones")
                torch.set_rng_state(trajectory.rng_cpu[index].clone())  # a view at an offset crashes torch
                if self.restore_cuda_rng:
                    torch.cuda.set_rng_state(trajectory.rng_cuda[index].clone(), self.device)
                with self.autocast():
                    logits = self.model(**inputs).logits
                logits = logits.float()  # as accelerate's convert_outputs_to_fp32 (no-op in float32)
                target = target_distribution(labels, self.num_labels, self.smoothing, dtype=logits.dtype)
                losses = cross_entropy_rows(logits, target)
                row_weights = weights[positions].to(self.device)
                (row_weights.to(logits.dtype) * losses).sum().backward()
                total += (row_weights * losses.detach().double()).sum().cpu()
        finally:
            torch.set_rng_state(saved_rng)
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        if self.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(parameters, self.max_grad_norm))
        else:
            norm = math.nan
        if scale is None and self.check_steps:
            self._cheap_check(step, total.item(), norm)
        for group, lr in zip(self.optimizer.param_groups, trajectory.lr[step].tolist()):
            group["lr"] = lr
        self.optimizer.step()

    def autocast(self):
        """The Trainer's autocast of the model's forward (accelerate's ``native_amp``), or nothing in float32."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # -- the cache -----------------------------------------------------------------------------------
    def _state_at(self, step: int) -> State:
        self._check_step(step, self.num_steps)
        if step in self.checkpoints:
            return self._checkpoint_state(step)
        start = max(c for c in self.checkpoints if c < step)
        stop = min(c for c in self.checkpoints if c > step)
        if self._interval != (start, stop):
            self._open_interval(start, stop)
        if step not in self._dense:
            base = start + (step - start) // self._stride * self._stride
            self._dense = {base: self._snapshots[base]}
            self._load(self._snapshots[base])
            for t in range(base, min(base + self._stride, stop)):
                if t > base:
                    self._dense[t] = self._snapshot()
                self.step(t)
            if base + self._stride >= stop and (start, stop) not in self.errors:
                self._compare(start, stop, self._snapshot(), refuse=True)
        return self._dense[step]

    def _open_interval(self, start: int, stop: int) -> None:
        length = stop - start
        fits = int(self.memory_budget // max(self.state_bytes, 1))
        if length <= fits:
            stride = length
        else:  # keep ceil(length / s) sub-interval starts and one dense sub-interval of s states
            stride = next((s for s in range(1, length + 1) if math.ceil(length / s) + s <= fits), 0)
        if stride == 0:
            raise AccInfError(
                f"memory_budget={self.memory_budget} bytes cannot hold 2*sqrt({length}) model and optimizer states "
                f"of {self.state_bytes} bytes each (the replay of the checkpoint interval [{start}, {stop})); raise "
                f"it: --memory_budget_gb (ScoreArguments.memory_budget_gb) reaches the replay, or record with a "
                f"smaller checkpoint_every."
            )
        self._interval, self._stride, self._dense = (start, stop), stride, {}
        self._snapshots = {start: self._checkpoint_state(start)}
        if stride < length:
            self._load(self._snapshots[start])
            for t in range(start, stop):
                if t > start and (t - start) % stride == 0:
                    self._snapshots[t] = self._snapshot()
                self.step(t)
            if (start, stop) not in self.errors:
                self._compare(start, stop, self._snapshot(), refuse=True)

    # -- model and optimizer state ---------------------------------------------------------------------
    def _build_optimizer(self, metadata: dict[str, str]) -> torch.optim.Optimizer:
        optimizer_class = getattr(torch.optim, metadata["optimizer_class"])
        groups = []
        for hyper, names in zip(json.loads(metadata["param_groups"]), json.loads(metadata["group_params"])):
            hyper = {key: tuple(value) if isinstance(value, list) else value for key, value in hyper.items()}
            groups.append({"params": [self.params[name] for name in names], **hyper})
        return optimizer_class(groups)

    def _checkpoint_state(self, step: int) -> State:
        weights = self.run.load_checkpoint(step)
        tensors, _ = self.run.load_optimizer_state(step)
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            name, _, state_key = key.partition(schema.OPTIMIZER_KEY_SEPARATOR)
            state.setdefault(name, {})[state_key] = value
        return weights, state

    def _snapshot(self) -> State:
        weights = {name: tensor.detach().clone() for name, tensor in self.model.state_dict().items()}
        names = {id(param): name for name, param in self.params.items()}
        state = {names[id(param)]: {key: value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(value)
                                    for key, value in keys.items()}
                 for param, keys in self.optimizer.state.items()}
        return weights, state

    def _load(self, state: State) -> None:
        weights, optimizer_state = state
        self.model.load_state_dict(weights, strict=True)
        self.optimizer.state.clear()
        for name, keys in optimizer_state.items():
            self.optimizer.state[self.params[name]] = {
                key: value.clone() if key == "step" else value.to(self.device, copy=True) for key, value in keys.items()
            }

    def _dense_scale(self, weight_scale) -> torch.Tensor | None:
        if weight_scale is None:
            return None
        if isinstance(weight_scale, torch.Tensor):
            return weight_scale.double()
        scale = torch.ones(self.run.manifest.dataset.length, dtype=torch.float64)
        for row, factor in weight_scale.items():
            scale[int(row)] = float(factor)
        return scale

    # -- checks ---------------------------------------------------------------------------------------
    def _check_step(self, step: int, last: int) -> None:
        if not 0 <= step <= last:
            raise AccInfError(f"step must lie in [0, {last}], got {step}.")

    def _interval_of(self, step: int) -> tuple[int, int]:
        start = max(c for c in self.checkpoints if c <= step)
        return start, min(c for c in self.checkpoints if c > step)

    def _refuse(self, step: int, what: str) -> None:
        start, stop = self._interval_of(step)
        raise AccInfError(f"Replay of the checkpoint interval [{start}, {stop}) does not reproduce the recorded run: "
                          f"{what}. {WHY}")

    def _cheap_check(self, step: int, loss: float, norm: float) -> None:
        recorded_loss = float(self.trajectory.loss[step])
        if abs(loss - recorded_loss) > self.cheap_tolerance * max(abs(recorded_loss), 1e-12):
            self._refuse(step, f"the loss of step {step} is {loss:.8g}, recorded {recorded_loss:.8g}")
        recorded_norm = float(self.trajectory.grad_norm[step])
        if math.isfinite(recorded_norm) and math.isfinite(norm):
            if abs(norm - recorded_norm) > self.cheap_tolerance * max(recorded_norm, 1e-12):
                self._refuse(step, f"the gradient norm of step {step} is {norm:.8g}, recorded {recorded_norm:.8g}")

    def _compare(self, start: int, stop: int, replayed: State, refuse: bool) -> IntervalError:
        weights, state = self._checkpoint_state(stop)
        start_weights = self._checkpoint_state(start)[0]
        gauge = set(self.gauge_parameters())
        judged = {name for name in weights if name not in gauge}
        p_abs, p_rel, p_worst = _normwise(replayed[0], weights, start_weights, judged)
        g_abs, g_rel, _ = _normwise(replayed[0], weights, start_weights, gauge) if gauge else (0.0, 0.0, "")
        s_abs, s_rel, s_worst = 0.0, 0.0, ""
        steps = {name: keys["step"] for name, keys in state.items() if "step" in keys}
        replayed_steps = {name: keys["step"] for name, keys in replayed[1].items() if "step" in keys}
        if steps != {} and any(not torch.equal(replayed_steps.get(n, torch.tensor(-1.0)), v) for n, v in steps.items()):
            s_rel, s_worst = math.inf, "step"
        recorded_by_key, replayed_by_key = _by_key(state), _by_key(replayed[1])
        for key, recorded in recorded_by_key.items():
            k_abs, k_rel, k_worst = _normwise(replayed_by_key.get(key, {}), recorded, names=judged)
            s_abs = max(s_abs, k_abs)
            if k_rel > s_rel:
                s_rel, s_worst = k_rel, f"{k_worst}{schema.OPTIMIZER_KEY_SEPARATOR}{key}"
        o_abs, o_rel = self._output_error(start, stop, replayed[0], weights, start_weights)
        worst = "outputs" if o_rel > max(p_rel, s_rel) else (p_worst if p_rel >= s_rel else s_worst)
        error = IntervalError(start, stop, p_abs, p_rel, s_abs, s_rel, worst, o_abs, o_rel, g_abs, g_rel)
        self.errors[(start, stop)] = error
        if refuse and error.max_rel > self.tolerance:
            left_out = f"; the gauge tensors {sorted(gauge)} left out" if gauge else ""
            raise AccInfError(
                f"Replay of the checkpoint interval [{start}, {stop}) does not reproduce the checkpoint at step {stop}: "
                f"relative error {error.max_rel:.3g} in '{error.worst}' (outputs {o_rel:.3g}, parameters {p_rel:.3g}, "
                f"optimizer state {s_rel:.3g}{left_out}; tolerance {self.tolerance:g}, --replay_tolerance / "
                f"ScoreArguments.replay_tolerance). {WHY}"
            )
        return error

    # -- outputs ----------------------------------------------------------------------------------------
    def _float64_model(self) -> torch.nn.Module:
        """A float64 copy of the model in eval mode, for the output comparisons (loaded per use)."""
        if self._probe_model is None:
            self._probe_model = copy.deepcopy(self.model).double().eval()
        return self._probe_model

    def _probe_inputs(self, *steps: int) -> list[dict[str, torch.Tensor]]:
        """The collated model inputs of the steps' rows (labels dropped; floating inputs in float64)."""
        return [probe_inputs(inputs) for step in dict.fromkeys(steps) for inputs, _ in self.batch_inputs(step)]

    @torch.no_grad()
    def _output_error(self, start: int, stop: int, replayed: dict[str, torch.Tensor], recorded: dict[str, torch.Tensor],
                      start_weights: dict[str, torch.Tensor]) -> tuple[float, float]:
        """``(max |difference|, ||difference|| / ||movement||)`` of the logits of the replayed and the recorded
        parameters at ``stop`` on the rows of steps ``start`` and ``stop - 1`` (float64, eval mode), the movement
        being that of the recorded logits over the interval."""
        model, batches = self._float64_model(), self._probe_inputs(start, stop - 1)
        logits = []
        for weights in (replayed, recorded, start_weights):
            model.load_state_dict(weights, strict=True)
            logits.append(torch.cat([model(**inputs).logits.flatten() for inputs in batches]))
        difference = logits[0] - logits[1]
        squared_error = difference.square().sum().item()
        return difference.abs().max().item(), _ratio(squared_error, (logits[1] - logits[2]).square().sum().item())
