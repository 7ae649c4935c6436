"""Resume points of a long score run (issue 19, "Beyond one machine"): what has been computed so far, saved
atomically so that an interrupted run starts from its last resume point instead of from the beginning.

* The adjoint form (:func:`.adjoint.adjoint_scores`) cannot be split into independent jobs (each ``u_t``
  depends on every later step, DESIGN.md section 6): it saves ``u_t`` with the trust probes and the scores
  accumulated over the steps ``t .. T-1`` (:func:`save_adjoint`) at the run's checkpoint steps or every K steps,
  and a rerun walks back from the last one (:func:`restore_adjoint`).
* The forward form (:func:`.estimator.estimate_influence`) saves each finished chunk of rows' embeddings; a rerun
  skips the chunks already saved.

A :class:`ResumeStore` is a directory of safetensors files, each stamped with the key of everything that changes
its numbers (the run, the arguments, the evaluation rows; the scorer computes it): a file of another key is
ignored and replaced. The engine calls ``load``/``save`` only; where the store lives is the scorer's.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Iterable

import torch

from .. import io

logger = logging.getLogger(__name__)

RESUME_DIR = ".resume"  # under a score run's output directory
ADJOINT = "adjoint"


class ResumeStore:
    """Resume points under ``directory`` stamped with ``key``. ``every``: the adjoint saves every this many steps
    (0: at ``boundaries``, the run's checkpoint steps; -1: never)."""

    def __init__(self, directory: str | Path, key: str, every: int = 0, boundaries: Iterable[int] = ()):
        self.directory, self.key, self.every, self.boundaries = Path(directory), key, every, frozenset(boundaries)

    def due(self, done: int, step: int) -> bool:
        """Whether a backward walk that has just finished ``step`` (``done`` steps so far) saves a resume point."""
        if self.every < 0:
            return False
        return done % self.every == 0 if self.every > 0 else step in self.boundaries

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.safetensors"

    def load(self, name: str, device="cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """``(tensors, metadata)`` of resume point ``name``, or ``None`` when there is none of this key."""
        from safetensors import safe_open

        path = self.path(name)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            metadata = handle.metadata() or {}
            if metadata.get("key") != self.key:
                logger.info("resume point %s was saved by another run or other arguments: starting over", path)
                return None
            return {name: handle.get_tensor(name) for name in handle.keys()}, metadata

    def save(self, name: str, tensors: dict[str, torch.Tensor], **metadata) -> None:
        from safetensors.torch import save_file

        stamped = {"key": self.key, **{k: str(v) for k, v in metadata.items()}}
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        io.write_atomic(self.path(name), lambda tmp: save_file(cpu, tmp, metadata=stamped))

    def clear(self) -> None:
        """Remove this store (after success), and the resume directory above it when nothing else is left there."""
        shutil.rmtree(self.directory, ignore_errors=True)
        parent = self.directory.parent
        if parent.name == RESUME_DIR and parent.is_dir() and not any(parent.iterdir()):
            try:
                parent.rmdir()
            except OSError:  # another partition's job has just started saving there
                pass


def adjoint_name(shard=None) -> str:
    """One resume point per process (each holds its own share of the scores when the adjoint is data-parallel)."""
    if shard is None or shard.world_size == 1:
        return ADJOINT
    return f"{ADJOINT}.rank-{shard.rank:05d}-of-{shard.world_size:05d}"


def save_adjoint(store: ResumeStore, step: int, block: torch.Tensor, scores: torch.Tensor, tracker=None,
                 shard=None) -> None:
    """``u_step`` and the probes (``block``), the scores of the steps ``step .. T-1`` and the probes' growth so far
    (this process's, under ``shard``)."""
    tensors = {"block": block, "scores": scores}
    if tracker is not None:
        tensors.update(probe_product=tracker.product, probe_log_scale=tracker.log_scale,
                       probe_growth_from=torch.stack(tracker.growth_from) if tracker.growth_from
                       else torch.zeros(0, dtype=block.dtype))
    store.save(adjoint_name(shard), tensors, step=step)


def restore_adjoint(store: ResumeStore | None, stop: int, block: torch.Tensor, scores: torch.Tensor,
                    tracker=None, shard=None) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(step to walk back from, block, scores)``: this process's last resume point, or ``(stop, block, scores)``."""
    name = adjoint_name(shard)
    saved = store.load(name, block.device) if store is not None else None
    if saved is None:
        return stop, block, scores
    tensors, metadata = saved
    if tensors["block"].shape != block.shape or tensors["scores"].shape != scores.shape:
        logger.info("resume point %s does not fit this run's shapes: starting over", store.path(name))
        return stop, block, scores
    step = int(metadata["step"])
    if tracker is not None:
        tracker.states = tensors["block"][len(tensors["block"]) - tracker.count:]  # after the objectives' rows
        tracker.product, tracker.log_scale = tensors["probe_product"], tensors["probe_log_scale"]
        tracker.growth_from = list(tensors["probe_growth_from"].unbind(0))
    logger.info("adjoint: resuming at step %d of %d from %s", step, stop, store.path(name))
    return step, tensors["block"].to(block.dtype), tensors["scores"].to(scores.dtype)


def chunk_name(lo: int, hi: int) -> str:
    """The resume point of the forward form's chunk of rows ``[lo, hi)``."""
    return f"rows-{lo:010d}-{hi:010d}"
