"""Writes a run directory: buffered step segments, sparse checkpoints and the manifest (main process only).

Every file is written to a temporary name and renamed into place, and the manifest lists only
finished files, so an interrupted run leaves a consistent directory that can be resumed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import AccInfError
from ..trajectory import schema
from ..trajectory.schema import Manifest


def _stack(records: list[dict], key: str) -> torch.Tensor:
    return torch.stack([record[key] for record in records])


class RunWriter:
    def __init__(self, run_dir: str | Path, manifest: Manifest):
        self.run_dir = Path(run_dir)
        self.manifest = manifest
        self.pending: list[dict] = []

    def save_manifest(self) -> None:
        schema.save_manifest(self.run_dir, self.manifest)

    def truncate(self, step: int) -> None:
        """Forget everything recorded at or after ``step`` (resume from a Trainer checkpoint at ``step``)."""
        if step > self.manifest.num_steps:
            raise AccInfError(
                f"Cannot resume at step {step}: the run directory holds only steps 0..{self.manifest.num_steps - 1} "
                "(the recorder stopped before the Trainer checkpoint was complete). Resume from an earlier checkpoint."
            )
        self.pending = [record for record in self.pending if int(record[schema.STEP]) < step]
        kept = []
        for start, stop in self.manifest.segments:
            path = self.run_dir / schema.STEPS_DIR / schema.segment_name(start, stop)
            if stop <= step:
                kept.append([start, stop])
                continue
            if start < step:
                tensors = load_file(path)
                keep_steps = step - start
                keep = {key: int(tensors[key][keep_steps]) for key in schema.OFFSET_KEYS if key in tensors}
                trimmed = {}
                for key, value in tensors.items():
                    if key in schema.ROW_KEYS:
                        trimmed[key] = value[: keep[schema.ROW_OFFSETS]].contiguous()
                    elif key in schema.MICRO_KEYS:
                        trimmed[key] = value[: keep[schema.MICRO_OFFSETS]].contiguous()
                    elif key in schema.OFFSET_KEYS:
                        trimmed[key] = value[: keep_steps + 1].contiguous()
                    else:
                        trimmed[key] = value[:keep_steps].contiguous()
                self._write_segment(trimmed, start, step)
                kept.append([start, step])
            path.unlink(missing_ok=True)
        self.manifest.segments = kept
        self.manifest.num_steps = step
        for checkpoint in [c for c in self.manifest.checkpoints if c > step]:
            shutil.rmtree(self.run_dir / schema.CHECKPOINTS_DIR / schema.checkpoint_dir_name(checkpoint))
        self.manifest.checkpoints = [c for c in self.manifest.checkpoints if c <= step]
        self.manifest.status = schema.STATUS_RECORDING
        self.save_manifest()

    def append(self, record: dict) -> None:
        self.pending.append(record)

    def flush(self) -> None:
        if not self.pending:
            return
        records, self.pending = self.pending, []
        start = int(records[0][schema.STEP])
        stop = int(records[-1][schema.STEP]) + 1
        if stop - start != len(records) or start != self.manifest.num_steps:
            raise RuntimeError(f"step records are not contiguous: {start}..{stop} after {self.manifest.num_steps}")
        tensors = {}
        for offsets, keys in ((schema.ROW_OFFSETS, schema.ROW_KEYS), (schema.MICRO_OFFSETS, schema.MICRO_KEYS)):
            present = [key for key in keys if key in records[0]]
            if not present:
                continue
            counts = torch.tensor([len(record[present[0]]) for record in records])
            tensors[offsets] = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
            tensors.update({key: torch.cat([record[key] for record in records]) for key in present})
        for key in records[0]:
            if key not in tensors:
                tensors[key] = _stack(records, key)
        self._write_segment(tensors, start, stop)
        self.manifest.segments.append([start, stop])
        self.manifest.num_steps = stop
        self.save_manifest()

    def _write_segment(self, tensors: dict[str, torch.Tensor], start: int, stop: int) -> None:
        path = self.run_dir / schema.STEPS_DIR / schema.segment_name(start, stop)
        tensors = {key: value.contiguous() for key, value in tensors.items()}
        schema.write_atomic(path, lambda tmp: save_file(tensors, tmp))

    def save_checkpoint(self, step: int, state_dict: dict[str, torch.Tensor],
                        optimizer_state: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None) -> None:
        """Model weights (and, for replay, the optimizer's tensors and metadata) before step ``step``."""
        if step in self.manifest.checkpoints:
            return
        directory = self.run_dir / schema.CHECKPOINTS_DIR / schema.checkpoint_dir_name(step)
        if optimizer_state is not None:
            state, metadata = optimizer_state
            state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state.items()}
            schema.write_atomic(directory / schema.OPTIMIZER_STATE_NAME, lambda tmp: save_file(state, tmp, metadata=metadata))
        tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state_dict.items()}
        schema.write_atomic(directory / schema.MODEL_WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp))
        self.manifest.checkpoints = sorted(self.manifest.checkpoints + [step])
        self.save_manifest()

    def finish(self) -> None:
        self.flush()
        self.manifest.status = schema.STATUS_COMPLETE
        self.save_manifest()
