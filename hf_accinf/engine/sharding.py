"""Many processes (DESIGN.md section 6, docs/ENGINE.md "Many processes"): who owns which rows, and the
collectives between processes.

* Forward forms shard by **sample**: each process owns a contiguous slice of the sample rows
  (:meth:`ShardContext.sample_range`), reads the same trajectory and writes its own rows; only scores travel.
* The adjoint form shards each step by **batch row**, as DDP splits training: :meth:`ShardContext.rows_of_step`
  gives each process a contiguous block of the step's occurrences (all rows of a sample stay together, so a
  sample's exact removal is computed where its rows are); :class:`RowShardBatch` computes the row-dependent
  quantities of those rows and sums them over the processes (the batch gradient, the rows' share of ``H_B v``).
* Every collective first sums a failure flag (:meth:`ShardContext.fail`), so that an exception on one process
  makes every other raise :class:`PeerFailure` naming it at its next collective instead of waiting for it.
  The group's timeout is ``HF_ACCINF_PROCESS_TIMEOUT_S`` seconds (default :data:`DEFAULT_TIMEOUT_S`).

* A partition (``--num_partitions P --partition i``, an independent job, e.g. one per machine) owns the
  contiguous slice ``i`` of ``P`` of the rows (:func:`partition_range`); the processes of that job split it.

Every collective is a no-op at world size 1.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property

import torch

from ..curvature.base import BatchCurvature
from ..errors import AccInfError
from .plan import StepOccurrences

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "HF_ACCINF_PROCESS_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 3600.0


class PeerFailure(AccInfError):
    """Another process of the group failed: this one stops too (the failing one shows the cause)."""


def process_timeout(seconds: float | None = None) -> timedelta:
    """The process group's timeout: ``seconds``, else ``HF_ACCINF_PROCESS_TIMEOUT_S``, else
    :data:`DEFAULT_TIMEOUT_S`; refused unless positive."""
    text = str(seconds) if seconds is not None else os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise AccInfError(f"The process group's timeout {text!r} ({TIMEOUT_ENV} or timeout_s): give a positive number "
                          "of seconds.")
    return timedelta(seconds=seconds)


def partition_range(count: int, index: int, parts: int) -> tuple[int, int]:
    """``[lo, hi)``: slice ``index`` of ``parts`` nearly equal contiguous slices of ``range(count)`` (rows or steps)."""
    per = -(-count // parts)
    return min(count, index * per), min(count, (index + 1) * per)


@dataclass
class ShardContext:
    rank: int
    world_size: int
    state: object | None = None  # accelerate.PartialState when distributed
    _collecting: bool = field(default=False, repr=False)  # inside a collective (a failure there is the group's)
    _failed: bool = field(default=False, repr=False)  # a process failed (this one, or one it heard of): no barrier
    partition: tuple[int, int] = (0, 1)  # (index, count): this job's slice of the rows (or TracIn's steps)

    @classmethod
    def single(cls) -> "ShardContext":
        return cls(0, 1)

    @classmethod
    def from_accelerate(cls, cpu: bool = False, timeout_s: float | None = None) -> "ShardContext":
        """The group ``accelerate launch`` started (world size 1 without it); ``timeout_s``: see :func:`process_timeout`."""
        from accelerate import PartialState

        launched = int(os.environ.get("WORLD_SIZE", "1"))
        timeout = process_timeout(timeout_s)
        state = PartialState(cpu=cpu, timeout=timeout) if launched > 1 else PartialState(cpu=cpu)
        if launched != state.num_processes:
            raise AccInfError(
                f"Launched as {launched} processes, but they formed a group of {state.num_processes}. "
                "On CPU pass --cpu (PartialState(cpu=True)) so the processes join one gloo group."
            )
        return cls(state.process_index, state.num_processes, state)

    def close(self) -> None:
        """Wait for every process, then leave the process group (exiting gloo ranks at different times can abort).
        A process that failed has told the others already (:meth:`fail`); they raise at this barrier."""
        if self.world_size > 1:
            import torch.distributed as dist

            try:
                if not self._failed:
                    self.barrier()
            finally:
                if dist.is_initialized():
                    dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def partition_range(self, count: int) -> tuple[int, int]:
        """This job's partition of ``range(count)``."""
        return partition_range(count, *self.partition)

    @property
    def device(self) -> torch.device:
        """Where this process's collectives run (gloo: the CPU; NCCL: its GPU)."""
        state_device = getattr(self.state, "device", None)
        if state_device is None or self.backend != "nccl":
            return torch.device("cpu")
        return torch.device(state_device)

    @property
    def backend(self) -> str | None:
        if self.world_size == 1:
            return None
        import torch.distributed as dist

        return dist.get_backend()

    # -- who owns what ---------------------------------------------------------------------------------------

    def sample_range(self, num_samples: int) -> tuple[int, int]:
        """This process's rows: rank ``r`` of ``W`` within this job's partition."""
        lo, hi = self.partition_range(num_samples)
        start, stop = partition_range(hi - lo, self.rank, self.world_size)
        return lo + start, lo + stop

    def rows_of_step(self, samples: torch.Tensor) -> torch.Tensor:
        """Which of a step's rows this process owns in the adjoint's row split: ``samples`` (b,) is the sample
        of each row; the step's distinct samples, in increasing order, are cut into ``world_size`` contiguous
        blocks (sizes differ by at most one), and a row belongs to its sample's block. Returns a (b,) mask."""
        if self.world_size == 1:
            return torch.ones(len(samples), dtype=torch.bool, device=samples.device)
        distinct, owner = torch.unique(samples, return_inverse=True)
        block = torch.arange(len(distinct), device=samples.device) * self.world_size // max(len(distinct), 1)
        return block[owner] == self.rank

    def own_occurrences(self, occurrences: StepOccurrences) -> StepOccurrences:
        """The step's occurrences whose rows this process owns in the row split (:meth:`rows_of_step`); the plan must
        hold every row of the step (a plan of all samples)."""
        if self.world_size == 1:
            return occurrences
        mine = self.rows_of_step(occurrences.global_samples[occurrences.row_owner])
        owned = torch.zeros(len(occurrences.samples), dtype=torch.bool, device=mine.device)
        owned[occurrences.row_owner[mine]] = True
        renumber = owned.cumsum(0) - 1
        return StepOccurrences(occurrences.samples[owned], renumber[occurrences.row_owner[mine]],
                               occurrences.rows[mine], occurrences.global_samples[owned])

    def steps_of(self, num_steps: int) -> range:
        """The steps this process takes when work is split by steps (round-robin)."""
        return range(self.rank, num_steps, self.world_size)

    def items_of(self, count: int) -> tuple[int, int]:
        """This process's contiguous block ``[lo, hi)`` of ``count`` items (e.g. ``--verify``'s rows; partitions
        play no part)."""
        return partition_range(count, self.rank, self.world_size)

    # -- collectives -----------------------------------------------------------------------------------------

    @contextmanager
    def _collective(self):
        """Sum the failure flags first: a process that failed meets the others here (:meth:`fail`)."""
        import torch.distributed as dist

        self._collecting = True
        try:
            flags = torch.zeros(self.world_size, dtype=torch.int32, device=self.device)
            dist.all_reduce(flags)
            failed = flags.nonzero().flatten().tolist()
            if failed:
                self._failed = True
                raise PeerFailure(
                    f"Process {failed[0]} of {self.world_size} failed (its error is printed above); process "
                    f"{self.rank} stops too. Fix that error and launch again.")
            yield dist
        finally:
            self._collecting = False

    def fail(self, error: BaseException) -> None:
        """Tell the group this process failed (at the others' next collective), unless the failure is the group's
        own (raised inside a collective, or by another process's failure)."""
        if isinstance(error, PeerFailure):  # heard at a collective, perhaps by a copy of this context: no barrier
            self._failed = True
        if self.world_size == 1 or self._failed or self._collecting:
            return
        import torch.distributed as dist

        self._failed = True
        logger.error("process %d of %d failed: %s: %s", self.rank, self.world_size, type(error).__name__, error)
        flags = torch.zeros(self.world_size, dtype=torch.int32, device=self.device)
        flags[self.rank] = 1
        try:
            dist.all_reduce(flags)
        except Exception:  # noqa: BLE001 - the group is gone already: the original error is what matters
            pass

    @contextmanager
    def guard(self):
        """Run a block of this process's work; an exception in it is announced to the group, then re-raised."""
        try:
            yield self
        except BaseException as error:
            self.fail(error)
            raise

    def barrier(self) -> None:
        if self.world_size > 1:
            with self._collective() as dist:
                dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the processes (a new tensor, the same on every process and device)."""
        if self.world_size == 1:
            return tensor
        with self._collective() as dist:
            moved = tensor.detach().to(self.device, copy=True).contiguous()
            dist.all_reduce(moved)
        return moved.to(tensor.device)

    def all_gather_object(self, value) -> list:
        """Every process's ``value`` (picklable), in rank order, on every process."""
        if self.world_size == 1:
            return [value]
        with self._collective() as dist:
            values = [None] * self.world_size
            dist.all_gather_object(values, value)
        return values

    def gather_rows(self, rows: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Concatenate every process's :meth:`sample_range` rows in rank order; the result lives on every process
        (used for ``(N,)`` scores, never for embeddings in the scoring forms)."""
        if self.world_size == 1:
            return rows
        per = -(-num_samples // self.world_size)
        padded = torch.zeros(per, *rows.shape[1:], dtype=rows.dtype, device=self.device)
        padded[: len(rows)] = rows
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        with self._collective() as dist:
            dist.all_gather(parts, padded)
        return torch.cat(parts)[:num_samples].to(rows.device)


class RowShardBatch(BatchCurvature):
    """A step's batch curvature split by rows over the processes: ``local`` is the step's batch restricted to this
    process's rows (positions in the step unchanged, :meth:`BatchCurvature.restrict`); the batch gradient and
    ``H_B X`` are its sums over the processes, per-row quantities are this process's rows' only. The terms a step
    adds to ``H_B X`` that belong to no row (decay, optimizer state, the clip map's rank-one term) are applied by
    the step operators to the summed product, i.e. once."""

    def __init__(self, local: BatchCurvature, row_weight: torch.Tensor, shard: ShardContext):
        self.local, self.row_weight, self.shard = local, row_weight, shard

    @cached_property
    def batch_grad(self) -> torch.Tensor:
        return self.shard.all_reduce_sum(self.local.batch_grad)

    def hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.shard.all_reduce_sum(self.local.hvp(vectors))

    def row_grads(self, rows: torch.Tensor) -> torch.Tensor:
        return self.local.row_grads(rows)

    def row_hvp(self, vectors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.local.row_hvp(vectors, rows)

    def keep_row_grads(self) -> None:
        self.local.keep_row_grads()

    def row_loss_tangents(self, vector: torch.Tensor) -> torch.Tensor:
        """The tangents of this process's rows (the other entries are not theirs: 0, or unweighted tangents)."""
        return self.local.row_loss_tangents(vector)


class RowShare:
    """The adjoint's row split of every step (:meth:`ShardContext.rows_of_step`) as the update rules take it
    (:attr:`hf_accinf.methods.base.UpdateRule.row_share`): ``share(step, batch)`` is ``batch`` split by rows."""

    def __init__(self, shard: ShardContext, trajectory):
        self.shard, self.trajectory = shard, trajectory

    def rows(self, step: int) -> torch.Tensor:
        """Positions of this process's rows in step ``step``'s batch."""
        return self.shard.rows_of_step(self.trajectory.batch(step)).nonzero().flatten()

    def __call__(self, step: int, batch: BatchCurvature) -> BatchCurvature:
        if self.shard.world_size == 1:
            return batch
        return RowShardBatch(batch.restrict(self.rows(step)), batch.row_weight, self.shard)


@contextmanager
def split_rows(rule, shard: ShardContext, trajectory):
    """While inside, ``rule``'s steps split their batches by rows over the processes (:class:`RowShare`)."""
    rule.row_share = RowShare(shard, trajectory) if shard.world_size > 1 else None
    try:
        yield rule
    finally:
        rule.row_share = None
