"""Reading a run directory: the manifest, the steps as one in-memory :class:`Trajectory`, checkpoints.

Parameters at step ``t`` (:meth:`RunReader.parameters_at`): the head's parameters are logged densely,
so they are returned exactly as the optimizer saw them before step ``t``. All other parameters are
linearly interpolated between the two surrounding checkpoints; their error is measured against a
densely checkpointed run in ``tests/trajectory/test_reader.py`` and documented in docs/RECORDING.md. The
estimators never use interpolated values: the head inputs of every step are recorded as computed. Exact
values of every parameter at every step come from :class:`~.replay.Replay` (schema >= 2).
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import AccInfError
from . import schema
from .schema import Manifest

logger = logging.getLogger(__name__)


@dataclass
class Trajectory:
    """All recorded steps of a run, as tensors indexed by step (``T`` steps, ``R`` batch rows in all).

    ``row_offsets[t]:row_offsets[t+1]`` are the rows of step ``t`` in ``row_index``, ``row_weight``,
    ``labels`` and ``head_input``. ``params``, ``grads`` and ``states`` map a head parameter (or
    ``"<param>.<state key>"``) to a ``(T, *shape)`` tensor holding its value before each step.
    Schema >= 2: ``micro_offsets[t]:micro_offsets[t+1]`` index the micro-batches of step ``t`` in
    ``micro_size`` (rows of each, in row order) and ``rng_cpu``/``rng_cuda`` (generator states).
    """

    row_offsets: torch.Tensor
    row_index: torch.Tensor
    row_weight: torch.Tensor
    labels: torch.Tensor
    head_input: torch.Tensor
    lr: torch.Tensor
    clip_coef: torch.Tensor
    grad_norm: torch.Tensor
    epoch: torch.Tensor
    optimizer_step_count: torch.Tensor
    params: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    states: dict[str, torch.Tensor]
    loss: torch.Tensor | None = None
    micro_offsets: torch.Tensor | None = None
    micro_size: torch.Tensor | None = None
    rng_cpu: torch.Tensor | None = None
    rng_cuda: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return len(self.row_offsets) - 1

    def rows_of(self, step: int) -> slice:
        return slice(int(self.row_offsets[step]), int(self.row_offsets[step + 1]))

    def batch(self, step: int) -> torch.Tensor:
        return self.row_index[self.rows_of(step)]

    def micro_batches_of(self, step: int) -> slice:
        if self.micro_offsets is None:
            raise AccInfError("This run records no micro-batches (schema 1); record it again with this hf_accinf.")
        return slice(int(self.micro_offsets[step]), int(self.micro_offsets[step + 1]))

    def check_finite(self, clipped: bool = True) -> None:
        """Refuse a trajectory with a non-finite loss, learning rate, gradient or head parameter, naming the step.
        Without clipping the Trainer computes no gradient norm (recorded as NaN): it is not checked then."""
        per_step = {"loss": self.loss, "learning rate": self.lr}
        if clipped:
            per_step["gradient norm"] = self.grad_norm
        per_step.update({f"gradient of '{name}'": value for name, value in self.grads.items()})
        per_step.update({f"parameter '{name}'": value for name, value in self.params.items()})
        for what, values in per_step.items():
            if values is None or not values.is_floating_point():
                continue
            bad = ~torch.isfinite(values.reshape(len(values), -1)).all(1)
            if bad.any():
                step = int(bad.nonzero()[0])
                raise AccInfError(
                    f"The recorded run has a non-finite {what} at step {step} (the training diverged or a learning rate "
                    "was NaN/inf): influence through it is undefined. Fix the training (lower learning rate, clipping) "
                    "and record it again."
                )
        head_rows = self.head_input.reshape(len(self.head_input), -1)
        bad_rows = ~torch.isfinite(head_rows).all(1)
        if bad_rows.any():
            row = int(bad_rows.nonzero()[0])
            step = int(torch.searchsorted(self.row_offsets, torch.tensor(row), right=True)) - 1
            raise AccInfError(f"The recorded run has non-finite head inputs at step {step}: record it again after fixing the training.")

    @classmethod
    def from_segments(cls, segments: list[dict[str, torch.Tensor]]) -> "Trajectory":
        def cat(key):
            if not all(key in segment for segment in segments):
                return None
            return torch.cat([segment[key] for segment in segments])

        def offsets(key):
            if not all(key in segment for segment in segments):
                return None
            parts, base = [torch.zeros(1, dtype=torch.long)], 0
            for segment in segments:
                parts.append(segment[key][1:] + base)
                base += int(segment[key][-1])
            return torch.cat(parts)
        prefixed = {
            prefix: {key[len(prefix) :]: cat(key) for key in segments[0] if key.startswith(prefix)}
            for prefix in (schema.PARAM_PREFIX, schema.GRAD_PREFIX, schema.STATE_PREFIX)
        }
        return cls(
            row_offsets=offsets(schema.ROW_OFFSETS),
            row_index=cat(schema.ROW_INDEX),
            row_weight=cat(schema.ROW_WEIGHT),
            labels=cat(schema.LABELS),
            head_input=cat(schema.HEAD_INPUT),
            lr=cat(schema.LEARNING_RATE),
            clip_coef=cat(schema.CLIP_COEF),
            grad_norm=cat(schema.GRAD_NORM),
            epoch=cat(schema.EPOCH),
            optimizer_step_count=cat(schema.OPTIMIZER_STEP_COUNT),
            params=prefixed[schema.PARAM_PREFIX],
            grads=prefixed[schema.GRAD_PREFIX],
            states=prefixed[schema.STATE_PREFIX],
            loss=cat(schema.LOSS),
            micro_offsets=offsets(schema.MICRO_OFFSETS),
            micro_size=cat(schema.MICRO_SIZE),
            rng_cpu=cat(schema.RNG_CPU),
            rng_cuda=cat(schema.RNG_CUDA),
        )


class RunReader:
    """Opens a complete run directory; refuses unknown schemas, unfinished runs and missing files.

    >>> run = RunReader("runs/quickstart/accinf")  # doctest: +SKIP
    >>> trajectory = run.trajectory()  # doctest: +SKIP
    >>> trajectory.batch(0)  # dataset rows of the first optimizer step  # doctest: +SKIP
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.manifest: Manifest = schema.load_manifest(self.run_dir)
        missing = [str(p) for p in self._segment_paths() + [self._checkpoint_path(c) for c in self.manifest.checkpoints] if not p.is_file()]
        if missing:
            raise AccInfError(f"The run directory {run_dir} is incomplete; missing files: {missing[:5]}. Record it again.")
        covered = sum(stop - start for start, stop in self.manifest.segments)
        if covered != self.manifest.num_steps or self.manifest.num_steps not in self.manifest.checkpoints:
            raise AccInfError(f"The run directory {run_dir} is inconsistent (steps or final checkpoint missing). Record it again.")
        self._trajectory: Trajectory | None = None

    @property
    def num_steps(self) -> int:
        return self.manifest.num_steps

    def _segment_paths(self) -> list[Path]:
        return [self.run_dir / schema.STEPS_DIR / schema.segment_name(a, b) for a, b in self.manifest.segments]

    def _checkpoint_path(self, step: int) -> Path:
        return self.run_dir / schema.CHECKPOINTS_DIR / schema.checkpoint_dir_name(step) / schema.MODEL_WEIGHTS_NAME

    def trajectory(self) -> Trajectory:
        if self._trajectory is None:
            self._trajectory = Trajectory.from_segments([schema.load_tensors(path) for path in self._segment_paths()])
        return self._trajectory

    def load_checkpoint(self, step: int) -> dict[str, torch.Tensor]:
        if step not in self.manifest.checkpoints:
            raise AccInfError(f"No checkpoint at step {step}; checkpoints: {self.manifest.checkpoints}.")
        return schema.load_tensors(self._checkpoint_path(step))

    def load_optimizer_state(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The optimizer's tensors (``"<param>::<key>"``) and metadata before step ``step`` (schema >= 2)."""
        path = self._checkpoint_path(step).with_name(schema.OPTIMIZER_STATE_NAME)
        if step not in self.manifest.checkpoints or not path.is_file():
            raise AccInfError(
                f"The checkpoint at step {step} of {self.run_dir} holds no optimizer state (run-directory schema "
                f"{self.manifest.schema_version}; replay needs schema >= {schema.REPLAY_SCHEMA_VERSION}). "
                "Record the run again with this version of hf_accinf."
            )
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        return tensors, metadata

    def head_parameters_at(self, step: int) -> dict[str, torch.Tensor]:
        """Head parameters before step ``step`` (``step = T``: the trained head), exact."""
        if step == self.num_steps:
            final = self.load_checkpoint(step)
            prefix = self.manifest.head.module + "."
            return {name: final[prefix + name] for name in self.manifest.head.parameters}
        trajectory = self.trajectory()
        return {name: values[step] for name, values in trajectory.params.items()}

    def parameters_at(self, step: int) -> dict[str, torch.Tensor]:
        """All model parameters before step ``step``: head exact, the rest interpolated between checkpoints."""
        if not 0 <= step <= self.num_steps:
            raise AccInfError(f"step must lie in [0, {self.num_steps}], got {step}.")
        checkpoints = self.manifest.checkpoints
        below = max(c for c in checkpoints if c <= step)
        above = min(c for c in checkpoints if c >= step)
        lower = self.load_checkpoint(below)
        if above == below:
            result = dict(lower)
        else:
            upper = self.load_checkpoint(above)
            alpha = (step - below) / (above - below)
            result = {
                name: torch.lerp(lower[name], upper[name], alpha) if lower[name].is_floating_point() else lower[name]
                for name in lower
            }
        prefix = self.manifest.head.module + "."
        for name, value in self.head_parameters_at(step).items():
            result[prefix + name] = value
        return result

    def check_dataset(self, dataset) -> None:
        """Refuse a training dataset other than the recorded one: length, then the rows' content hash in order
        (:func:`~.schema.content_hash`). Warns when the content cannot be compared (only the length was)."""
        recorded = self.manifest.dataset
        if len(dataset) != recorded.length:
            raise AccInfError(
                f"The training dataset has {len(dataset)} rows but the run recorded {recorded.length}. "
                "Pass the exact dataset the run was trained on (same rows, same order)."
            )
        expected = recorded.content_hash
        fingerprint = getattr(dataset, "_fingerprint", None)
        if expected and fingerprint is not None and fingerprint == recorded.fingerprint:
            return
        actual = schema.content_hash(dataset) if expected else None
        if expected is None or actual is None:
            which = ("the run recorded no content hash: its rows could not be read as tensors, or read differently "
                     "each time" if expected is None else "this dataset's rows cannot be read as tensors")
            logger.warning(
                "Only the length of the training dataset was checked (%s): make sure it holds the rows the run "
                "was trained on, in the same order, or scores land on the wrong rows.", which,
            )
            return
        if actual != expected:
            raise AccInfError(
                f"The training dataset's rows differ from those the run was trained on (content hash mismatch; "
                f"recorded for a {recorded.type or 'dataset'}, given a {type(dataset).__name__}). Pass the same "
                "dataset, same rows in the same order and preprocessing, and of the same kind (datasets.Dataset or torch)."
            )

    def build_model(self, step: int | None = None, model=None) -> torch.nn.Module:
        """The recorded model with the weights of checkpoint ``step`` (default: final).

        ``model`` replaces the import of the recorded class: an ``nn.Module`` to load the weights into,
        or a factory (a model class built from the recorded config, or a function of no arguments).
        Needed when the class was defined in the training script (``__main__.MyModel``).
        """
        model = self._instantiate(model)
        state = self.load_checkpoint(self.num_steps if step is None else step)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise AccInfError(
                f"The model given does not hold the recorded weights ({str(error).splitlines()[0]}): pass the "
                f"architecture the run trained ({self.manifest.model_class})."
            ) from None
        return model.eval()

    def _instantiate(self, model) -> torch.nn.Module:
        if isinstance(model, torch.nn.Module):
            return model
        config = self.manifest.model_config
        if model is None:
            module_name, _, class_name = self.manifest.model_class.rpartition(".")
            try:
                model = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError):
                raise AccInfError(
                    f"The run's model class {self.manifest.model_class} cannot be imported here (a class defined in "
                    "the training script is not importable from another process). Pass the model: "
                    "score_run(..., model=MyModel or a factory), or on the command line "
                    "--model package.module:factory (a model class or a function returning the model)."
                ) from None
        if isinstance(model, type) and hasattr(model, "config_class"):
            return model(model.config_class.from_dict(config))
        built = model()
        if not isinstance(built, torch.nn.Module):
            raise AccInfError(f"The model factory {model!r} returned {type(built).__name__}, not a torch.nn.Module.")
        return built
