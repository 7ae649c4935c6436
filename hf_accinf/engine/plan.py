"""Who occurs where: per-step occurrences of a shard's samples, propagator windows and the cost model.

An occurrence is a (sample, step) pair; a sample's repeated rows in one step (distributed padding)
stay separate rows owned by the same occurrence (DESIGN.md section 3, "occurrences with
multiplicity"). Windows (DESIGN.md section 6a) are maximal runs of steps in which every sample
occurs at most once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..trajectory import Trajectory


@dataclass
class StepOccurrences:
    samples: torch.Tensor  # (m,) local sample indices (0 .. shard size), unique
    row_owner: torch.Tensor  # (k,) index into samples for each kept batch row
    rows: torch.Tensor  # (k,) positions of those rows in the step's batch
    global_samples: torch.Tensor  # (m,) dataset row indices
    host_samples: torch.Tensor | None = None  # ``samples`` on the host, for bookkeeping without reading the device


@dataclass
class OccurrencePlan:
    start: int  # first sample of the shard
    size: int  # samples in the shard
    steps: list[StepOccurrences]
    windows: list[tuple[int, int]]

    @property
    def num_steps(self) -> int:
        return len(self.steps)


def build_plan(trajectory: Trajectory, start: int, stop: int, device="cpu") -> OccurrencePlan:
    """Occurrences of samples ``[start, stop)`` at every step, and the windows of the whole run.

    Windows are cut where any sample (of any shard) would occur twice, so all shards share them.
    """
    steps, windows = [], []
    seen: set[int] = set()
    window_start = 0
    for step in range(trajectory.num_steps):
        ids = trajectory.batch(step)
        unique_ids = set(ids.tolist())
        if seen & unique_ids:
            windows.append((window_start, step))
            window_start, seen = step, set()
        seen |= unique_ids
        keep = (ids >= start) & (ids < stop)
        rows = keep.nonzero().flatten()
        samples, owner = torch.unique(ids[rows], return_inverse=True)
        steps.append(StepOccurrences((samples - start).to(device), owner.to(device), rows.to(device), samples.to(device),
                                     samples - start))
    windows.append((window_start, trajectory.num_steps))
    return OccurrencePlan(start, stop - start, steps, windows)


def choose_schedule(plan: OccurrencePlan, num_samples: int, state_dim: int, batch_size: float) -> tuple[str, dict]:
    """``sweep`` or ``propagator`` by the cost model of DESIGN.md section 6a, in units of ``cost_1``
    (``M_t`` on one vector, about ``4 b S`` flops for a head whose curvature is two GEMMs).

    Sweep: ``sum_w L_w N``. Propagator: ``sum_w (2 L_w S + 2 N S^2 / cost_1)``, the second term being
    the boundary products ``w_j <- F w_j`` and the occurrence products.
    """
    boundary = 2 * num_samples * state_dim / (4 * max(batch_size, 1.0))
    sweep = plan.num_steps * num_samples
    propagator = sum(2 * (z - a) * state_dim + boundary for a, z in plan.windows)
    choice = "propagator" if propagator < sweep else "sweep"
    return choice, {"sweep_cost": sweep, "propagator_cost": int(propagator), "windows": len(plan.windows)}
