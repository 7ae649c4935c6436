"""Sharding by sample (DESIGN.md section 6): each process owns a contiguous slice of the sample rows,
reads the same trajectory, and only the final per-sample rows are gathered (accelerate's ``gather``).

A partition (``--num_partitions P --partition i``, an independent job, e.g. one per machine) owns the
contiguous slice ``i`` of ``P`` (:func:`partition_range`); the processes of that job split it by rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def partition_range(count: int, index: int, parts: int) -> tuple[int, int]:
    """``[lo, hi)``: slice ``index`` of ``parts`` nearly equal contiguous slices of ``range(count)`` (rows or steps)."""
    per = -(-count // parts)
    return min(count, index * per), min(count, (index + 1) * per)


@dataclass
class ShardContext:
    rank: int
    world_size: int
    state: object | None = None  # accelerate.PartialState when distributed
    partition: tuple[int, int] = (0, 1)  # (index, count): this job's slice of the rows (or TracIn's steps)

    @classmethod
    def single(cls) -> "ShardContext":
        return cls(0, 1)

    @classmethod
    def from_accelerate(cls, cpu: bool = False) -> "ShardContext":
        import os

        from accelerate import PartialState

        from ..errors import AccInfError

        state = PartialState(cpu=cpu)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != state.num_processes:
            raise AccInfError(
                f"Launched as {launched} processes, but they formed a group of {state.num_processes}. "
                "On CPU pass --cpu (PartialState(cpu=True)) so the processes join one gloo group."
            )
        return cls(state.process_index, state.num_processes, state)

    def close(self) -> None:
        """Wait for every process, then leave the process group (exiting gloo ranks at different times can abort)."""
        if self.world_size > 1:
            import torch.distributed as dist

            self.state.wait_for_everyone()
            if dist.is_initialized():
                dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def partition_range(self, count: int) -> tuple[int, int]:
        """This job's partition of ``range(count)``."""
        return partition_range(count, *self.partition)

    def sample_range(self, num_samples: int) -> tuple[int, int]:
        """This process's rows: rank ``r`` of ``W`` within this job's partition."""
        lo, hi = self.partition_range(num_samples)
        start, stop = partition_range(hi - lo, self.rank, self.world_size)
        return lo + start, lo + stop

    def gather_rows(self, rows: torch.Tensor, num_samples: int) -> torch.Tensor | None:
        """Concatenate every process's rows in rank order; the result lives on every process."""
        if self.world_size == 1:
            return rows
        from accelerate.utils import gather

        per = -(-num_samples // self.world_size)
        padded = torch.zeros(per, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
        padded[: len(rows)] = rows
        return gather(padded)[:num_samples]
