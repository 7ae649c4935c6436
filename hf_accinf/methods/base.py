"""The interface between the propagation engine and a method: one linearized optimizer step.

A method is an :class:`UpdateRule` that, for step ``t``, yields :class:`StepOps` with two maps on
blocks of per-sample states (rows of a ``(K, S)`` tensor):

* ``apply``: the transition ``M_t`` shared by all samples (DESIGN.md section 6a);
* ``occurrence``: the whole step for samples whose rows are in the batch: ``M_t`` plus their own
  terms (injection, ACC correction, exact removal), given which batch rows belong to which sample and
  each sample's correction coefficient ``c`` (0 classical, 1 accumulative);
* ``injection`` / ``injection_scores``: the classical occurrence of zero states (what the adjoint form
  adds up), without products of the curvature with zero states where the rule knows how.

The adjoint ``M_t^T`` is derived from ``apply`` by a VJP: ``M_t`` is linear and rarely symmetric.
The engine never knows the method; the method never knows the schedule.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch.func import vjp

from ..curvature.base import BatchCurvature


class StepOps(ABC):
    @abstractmethod
    def apply(self, states: torch.Tensor) -> torch.Tensor:
        """``M_t`` applied to each row of ``states`` (K, S)."""

    @abstractmethod
    def occurrence(self, states: torch.Tensor, row_owner: torch.Tensor, rows: torch.Tensor,
                   coefficient: torch.Tensor) -> torch.Tensor:
        """The step for ``m`` occurring samples: ``states`` (m, S); batch row ``rows[k]`` belongs to sample
        ``row_owner[k]`` (an index into the m samples); ``coefficient`` (m,) is each sample's ``c_t``.

        With ``c_t = 0`` (the classical twin) it must be ``apply(states) + occurrence(0)``: the
        propagator then skips the forward pass of windows without corrections."""

    def injection(self, row_owner: torch.Tensor, rows: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """``inj`` (m, S): the classical occurrence step of zero states (``occurrence(0, ..., c = 0)``) for the
        ``count`` samples owning ``rows`` (default ``row_owner.max() + 1``). Rules with a cheaper form override it."""
        raise NotImplementedError(f"{type(self).__name__} gives its injections through occurrence() only")

    def injection_scores(self, adjoint: torch.Tensor, row_owner: torch.Tensor, rows: torch.Tensor,
                         count: int | None = None) -> torch.Tensor:
        """``inj @ adjoint`` (m,): what each occurring sample adds to its adjoint-form score, ``adjoint`` ``(S,)``
        the adjoint after the step. This default runs :meth:`occurrence` on zero states."""
        count = int(row_owner.max()) + 1 if count is None else count
        zero = adjoint.new_zeros(count, adjoint.shape[-1])
        return self.occurrence(zero, row_owner, rows, adjoint.new_zeros(count)) @ adjoint

    def apply_adjoint(self, states: torch.Tensor) -> torch.Tensor:
        """``M_t^T`` applied to each row of ``states``."""
        _, pullback = vjp(self.apply, torch.zeros_like(states))
        return pullback(states)[0]

    def occurrence_linear_adjoint(self, states, row_owner, rows, coefficient) -> torch.Tensor:
        """Adjoint of the linear part of :meth:`occurrence` (for the per-sample adjoint form)."""
        zero = torch.zeros_like(states)
        offset = self.occurrence(zero, row_owner, rows, coefficient)
        _, pullback = vjp(lambda x: self.occurrence(x, row_owner, rows, coefficient) - offset, zero)
        return pullback(states)[0]


class UpdateRule(ABC):
    """A propagated method. ``output`` says what the engine returns for it: ``"embeddings"`` in the space
    where :meth:`embed_gradient` puts an objective's gradient (the scorer dots the two)."""

    state_dim: int
    param_dim: int
    output: str = "embeddings"
    accumulative: bool | None = None  # set by the registry: whether correction policies apply (None: not built there)
    parameter_space: bool = True  # whether embeddings are parameter changes (False: a projected space)
    # Set by the adjoint form under several processes (engine.sharding.RowShare): each step's batch split by rows.
    row_share: Callable[[int, BatchCurvature], BatchCurvature] | None = None

    def batch_at(self, step: int) -> BatchCurvature:
        """Step ``step``'s batch curvature (split by rows over the processes while :attr:`row_share` is set)."""
        batch = self.problem.curvature.at_step(step)
        return batch if self.row_share is None else self.row_share(step, batch)

    def embed_gradient(self, gradient: torch.Tensor) -> torch.Tensor:
        """An objective gradient (..., P) in the embeddings' space: the identity for parameter-space rules."""
        return gradient

    @abstractmethod
    def at_step(self, step: int) -> StepOps:
        """The linearized optimizer step ``t``."""

    def parameter_part(self, states: torch.Tensor) -> torch.Tensor:
        """The ``Delta theta`` block of states (the influence embedding at the end)."""
        return states[..., : self.param_dim]

    def final_objective_state(self, gradient: torch.Tensor) -> torch.Tensor:
        """``u_T`` of the adjoint form: the objective gradient on ``theta``, zeros on optimizer states."""
        state = torch.zeros(self.state_dim, dtype=gradient.dtype, device=gradient.device)
        state[: self.param_dim] = gradient
        return state
