"""The SGD family (DESIGN.md sections 3 and 4): SGD-IE and ACC-SGD-IE under what the HF Trainer did.

torch ``SGD`` step with the Trainer's clipping and per-group L2 decay ``lam``:

    d = a(G) G + lam theta;   buf' = mu buf + d;   theta' = theta - eta (buf' | d + mu buf' if nesterov)

with ``a(G) = min(1, c / (n + CLIP_EPS))`` and ``n^2 = n_rest^2 + |G|^2``: ``G`` is the batch gradient of
the chosen parameters, ``n_rest`` the recorded norm of all other clipped gradients, kept fixed (the
approximation DESIGN.md section 4 names). No momentum: ``theta' = theta - eta d``.

Linearized, a state ``(Delta_theta[, Delta_buf])`` moves by a gradient-space change ``k``. With
the clip map ``clip(G, e)`` of :mod:`.removal` (the Jacobian of ``a(G) G``):

* shared transition ``M_t``: ``k = clip(G, H_B D) + lam D``;
* at an occurrence of sample ``j`` (rows ``r`` of ``j``, weights ``w_r``, repeated rows counted),
  removal moves ``G -> G_j = G - sum_r w_r g_r`` and ``H_B -> H_B - sum_r w_r H_r``:
  - exact removal: ``k = c clip(G_j, (H_B - sum w_r H_r) D) + (1 - c) clip(G, H_B D) + a(G_j) G_j - a(G) G``;
  - first-order removal: the derivative of the same expressions along the removal direction,
    ``k = clip(G, H_B D) + c d/de[clip(G_e, H_e D)] + d/de[a(G_e) G_e]`` at ``e = 0``
    (both from :func:`.removal.removal_step`);
  ``c = 1`` is ACC-SGD-IE (the paper's eq. 6-9), ``c = 0`` SGD-IE. Without clipping both removals are
  section 3's ``k = H_B D - c sum w_r H_r D - sum w_r g_r + lam D``.

The adjoint (the propagator's backward pass) is written out: with ``K = clip(G, H_B .) + lam`` and the
symmetric clip map, ``K^T z = H_B clip(G, z) + lam z``; plain SGD ``M^T y = y - K^T (eta y)``; with
momentum, for ``y = (y_theta, y_buf)`` and ``z = y_buf - eta y_theta`` (Nesterov: ``y_buf - (1 + mu) eta y_theta``),
``M^T y = (y_theta + K^T z, mu z)`` (Nesterov: ``mu y_buf - mu^2 eta y_theta`` for the buffer).
"""

from __future__ import annotations

import torch

from ..problem import InfluenceProblem
from .base import UpdateRule
from .removal import ClipMap, RemovalStepOps, check_removal, removal_step, removed_terms


class SGDStep(RemovalStepOps):
    def __init__(self, rule: "SGDRule", step: int):
        problem = rule.problem
        self.rule, self.batch, self.removal = rule, rule.batch_at(step), rule.removal
        self.state_dim = rule.state_dim
        self.lr = problem.learning_rates(step)
        rates = {float(problem.trajectory.lr[step, group]) for group in problem.optimizer.group_of.values()}
        self.uniform_lr = rates.pop() if len(rates) == 1 else None  # from the host's trajectory: no sync
        if self.removal == "exact":  # the counterfactual step needs every row's gradient
            self.batch.keep_row_grads()
        self.clip = ClipMap(self.batch, problem.optimizer.max_grad_norm, float(problem.trajectory.grad_norm[step]))

    def _curvature_term(self, theta: torch.Tensor, base: torch.Tensor | None, scale: float, transpose: bool) -> torch.Tensor:
        return self.clip.curvature_term(theta, base, scale, transpose)

    def _linear_step(self, states: torch.Tensor, transpose: bool) -> torch.Tensor:
        """``M_t`` (or ``M_t^T``, see the module docstring) applied to rows."""
        rule, size = self.rule, self.rule.param_dim
        decay = rule.decay if rule.has_decay else None
        if not rule.has_momentum:
            theta = states
            if self.uniform_lr is not None:
                base = theta - self.uniform_lr * (decay * theta) if decay is not None else theta
                return self._curvature_term(theta, base, -self.uniform_lr, transpose)
            if transpose:  # M^T y = y - K^T (E y)
                scaled = self.lr * theta
                return theta - self._curvature_term(scaled, decay * scaled if decay is not None else None, 1.0, True)
        theta, buffer = states[:, :size], states[:, size:]
        if not transpose:
            return self._move(states, self._curvature_term(theta, decay * theta if decay is not None else None, 1.0, False))
        mu = rule.momentum
        # Adjoint: x = (theta, buf) -> M^T y with y = (y_theta, y_buf).
        scaled = self.lr * theta
        z = buffer - (1 + mu) * scaled if rule.nesterov else buffer - scaled
        new_theta = self._curvature_term(z, theta + decay * z if decay is not None else theta, 1.0, True)
        new_buffer = mu * buffer - mu * mu * scaled if rule.nesterov else mu * z
        return torch.cat([new_theta, new_buffer], dim=1)

    def apply(self, states: torch.Tensor) -> torch.Tensor:
        return self._linear_step(states, transpose=False)

    def apply_adjoint(self, states: torch.Tensor) -> torch.Tensor:
        return self._linear_step(states, transpose=True)

    def _move(self, states: torch.Tensor | None, change: torch.Tensor) -> torch.Tensor:
        """The states moved by a gradient-space change ``change``; ``states=None``: zero states."""
        rule, size = self.rule, self.rule.param_dim
        if not rule.has_momentum:
            return -self.lr * change if states is None else states - self.lr * change
        buffer = change if states is None else rule.momentum * states[:, size:] + change
        update = change + rule.momentum * buffer if rule.nesterov else buffer
        step = -self.lr * update
        return torch.cat([step if states is None else states[:, :size] + step, buffer], dim=1)

    def step_output(self, gradient: torch.Tensor) -> torch.Tensor:
        return self._move(None, self.clip.clipped(gradient))

    def occurrence(self, states, row_owner, rows, coefficient) -> torch.Tensor:
        theta = states[:, : self.rule.param_dim]
        batch = self.batch
        removed_grad, removed_hvp = removed_terms(batch, theta, row_owner, rows, coefficient, self.rule.accumulative)
        gradient = batch.batch_grad.expand_as(theta)
        change = removal_step(self.clip.rows, gradient, batch.hvp(theta), removed_grad, removed_hvp, coefficient,
                              self.rule.removal)
        if self.rule.has_decay:
            change = change + self.rule.decay * theta
        return self._move(states, change)


class SGDRule(UpdateRule):
    """SGD-IE / ACC-SGD-IE for runs trained with ``torch.optim.SGD`` (any momentum, decay, Nesterov)."""

    def __init__(self, problem: InfluenceProblem, removal: str = "exact"):
        check_removal(removal)
        self.problem, self.removal = problem, removal
        curvature = problem.curvature
        self.param_dim = curvature.dim
        # Host-side decisions come from the optimizer's host values, never from device tensors (no sync).
        decay, momentum = (problem.optimizer.per_parameter(name) for name in ("weight_decay", "momentum"))
        self.decay, self.momentum = curvature.expand(decay), curvature.expand(momentum)
        self.has_decay = any(value != 0 for value in decay.values())
        self.has_momentum = any(value != 0 for value in momentum.values())
        self.nesterov = bool(problem.optimizer.uniform("nesterov")) if self.has_momentum else False
        self.state_dim = self.param_dim * (2 if self.has_momentum else 1)

    def at_step(self, step: int) -> SGDStep:
        return SGDStep(self, step)
