"""Sharding by sample (DESIGN.md section 6): each process owns a contiguous slice of the sample rows,
reads the same trajectory, and only the final per-sample rows are gathered (accelerate's ``gather``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ShardContext:
    rank: int
    world_size: int
    state: object | None = None  # accelerate.PartialState when distributed

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

    def sample_range(self, num_samples: int) -> tuple[int, int]:
        per = -(-num_samples // self.world_size)
        return min(num_samples, self.rank * per), min(num_samples, (self.rank + 1) * per)

    def gather_rows(self, rows: torch.Tensor, num_samples: int) -> torch.Tensor | None:
        """Concatenate every process's rows in rank order; the result lives on every process."""
        if self.world_size == 1:
            return rows
        from accelerate.utils import gather

        per = -(-num_samples // self.world_size)
        padded = torch.zeros(per, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
        padded[: len(rows)] = rows
        return gather(padded)[:num_samples]
