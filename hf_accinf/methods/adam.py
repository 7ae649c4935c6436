"""The Adam family (DESIGN.md section 4): Adam-IE and ACC-Adam-IE for runs trained with torch Adam/AdamW.

The torch step with the Trainer's global clipping, bias-correction count ``k`` (recorded: the optimizer's
step count before the step, plus one), per-group ``eps``, ``betas``, decoupled decay ``lam_W`` (AdamW) or
L2 ``lam_2`` (Adam, it enters the gradient):

    g = a(G) G + lam_2 theta;  m' = b1 m + (1-b1) g;  v' = b2 v + (1-b2) g*g
    theta' = (1 - eta lam_W) theta - eta mhat' / (sqrt(vhat') + eps),  mhat' = m'/(1-b1^k), vhat' = v'/(1-b2^k)

Per-sample state ``(Delta_theta, Delta_m, Delta_v)`` (3P). Linearized, with ``Dg = clip(G, H_B D) + lam_2 D``:

    Dm' = b1 Dm + (1-b1) Dg;   Dv' = b2 Dv + 2 (1-b2) g * Dg
    Dtheta' = (1 - eta lam_W) Dtheta - A Dm' + B Dv'
    A = eta / ((1-b1^k)(sqrt(vhat') + eps)),   B = eta mhat' / (2 (1-b2^k) sqrt(vhat') (sqrt(vhat') + eps)^2)

``B = 0`` where ``vhat' = 0`` (the guard); ``A`` stays there, a gain up to ``eta / ((1-b1^k) eps)`` on
``Dm'``. With the frozen preconditioner (ablation) ``Dv' = 0`` and the removed step keeps the recorded
``v'``. Occurrences use :func:`.removal.removal_step` with ``f(G, E)`` = (the tangent above at the point
``(g, m', v')`` of batch gradient ``G``, the step's output at ``G``): exact removal evaluates the
counterfactual clip coefficient, ``m'``, ``v'`` and preconditioner; first-order differentiates them.

The adjoint is written out: for ``y = (y_theta, y_m, y_v)``, ``z_m = y_m - A y_theta``,
``z_v = y_v + B y_theta``, ``z = (1-b1) z_m + 2 (1-b2) g z_v``:
``M^T y = ((1 - eta lam_W) y_theta + H_B clip(G, z) + lam_2 z, b1 z_m, b2 z_v)``.
"""

from __future__ import annotations

import torch

from ..problem import InfluenceProblem
from .base import UpdateRule
from .removal import ClipMap, RemovalStepOps, check_removal, removal_step, removed_terms


def guarded_root(v_next: torch.Tensor, bias2) -> tuple[torch.Tensor, torch.Tensor]:
    """``sqrt(vhat')`` and where it is positive; the root is guarded so that no derivative is infinite."""
    vhat = v_next / bias2
    positive = vhat > 0
    return torch.where(positive, torch.where(positive, vhat, torch.ones_like(vhat)).sqrt(), 0.0), positive


def adam_gains(lr, m_next: torch.Tensor, v_next: torch.Tensor, bias1, bias2, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's bias-corrected gains on ``Dm'`` and ``Dv'`` (the module docstring's ``A`` and ``B``; ``B = 0`` where
    ``vhat' = 0``), shared by the Adam rules and DVEmb's displacement."""
    root, positive = guarded_root(v_next, bias2)
    denominator = root + eps
    gain_m = lr / (bias1 * denominator)
    safe = torch.where(positive, root, torch.ones_like(root))
    gain_v = torch.where(positive, lr * (m_next / bias1) / (2 * bias2 * safe * denominator**2), 0.0)
    return gain_m, gain_v


class AdamStep(RemovalStepOps):
    def __init__(self, rule: "AdamRule", step: int):
        problem, curvature = rule.problem, rule.problem.curvature
        self.rule, self.batch, self.removal = rule, rule.batch_at(step), rule.removal
        if self.removal == "exact":  # the counterfactual step needs every row's gradient
            self.batch.keep_row_grads()
        self.clip = ClipMap(self.batch, problem.optimizer.max_grad_norm, float(problem.trajectory.grad_norm[step]))
        self.lr = problem.learning_rates(step)
        count = int(problem.trajectory.optimizer_step_count[step]) + 1
        self.bias1, self.bias2 = 1 - rule.beta1**count, 1 - rule.beta2**count
        self.alpha = 1 - self.lr * rule.decoupled
        self.m = curvature.optimizer_state(step, "exp_avg")
        self.v = curvature.optimizer_state(step, "exp_avg_sq")
        self.l2_theta = rule.l2 * curvature.optimizer_state(step, "param") if rule.has_l2 else None
        self.g, self.m_next, self.v_next = self._point(self.clip.clipped_gradient)
        self.gain_m, self.gain_v = self._gains(self.m_next, self.v_next)

    def _point(self, clipped: torch.Tensor):
        """``(g, m', v')`` for clipped batch gradients (rows or one vector)."""
        rule = self.rule
        g = clipped + self.l2_theta if self.l2_theta is not None else clipped
        return g, rule.beta1 * self.m + (1 - rule.beta1) * g, rule.beta2 * self.v + (1 - rule.beta2) * g * g

    def _root(self, v_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return guarded_root(v_next, self.bias2)

    def _gains(self, m_next: torch.Tensor, v_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return adam_gains(self.lr, m_next, v_next, self.bias1, self.bias2, self.rule.eps)

    def _tangent(self, states, clip_tangent, g, m_next, v_next) -> torch.Tensor:
        rule, size = self.rule, self.rule.param_dim
        theta, m, v = states[:, :size], states[:, size : 2 * size], states[:, 2 * size :]
        dg = clip_tangent + rule.l2 * theta if rule.has_l2 else clip_tangent
        new_m = rule.beta1 * m + (1 - rule.beta1) * dg
        gain_m, gain_v = self._gains(m_next, v_next)
        if rule.frozen:
            new_v = torch.zeros_like(v)
            new_theta = self.alpha * theta - gain_m * new_m
        else:
            new_v = rule.beta2 * v + 2 * (1 - rule.beta2) * g * dg
            new_theta = self.alpha * theta - gain_m * new_m + gain_v * new_v
        return torch.cat([new_theta, new_m, new_v], dim=1)

    def apply(self, states: torch.Tensor) -> torch.Tensor:
        rule, size = self.rule, self.rule.param_dim
        theta, m, v = states[:, :size], states[:, size : 2 * size], states[:, 2 * size :]
        dg = self.clip.curvature_term(theta, rule.l2 * theta if rule.has_l2 else None, 1.0)
        new_m = rule.beta1 * m + (1 - rule.beta1) * dg
        if rule.frozen:
            return torch.cat([self.alpha * theta - self.gain_m * new_m, new_m, torch.zeros_like(v)], dim=1)
        new_v = rule.beta2 * v + 2 * (1 - rule.beta2) * self.g * dg
        return torch.cat([self.alpha * theta - self.gain_m * new_m + self.gain_v * new_v, new_m, new_v], dim=1)

    def apply_adjoint(self, states: torch.Tensor) -> torch.Tensor:
        rule, size = self.rule, self.rule.param_dim
        y_theta, y_m, y_v = states[:, :size], states[:, size : 2 * size], states[:, 2 * size :]
        z_m = y_m - self.gain_m * y_theta
        if rule.frozen:
            z_v = torch.zeros_like(y_v)
            z = (1 - rule.beta1) * z_m
        else:
            z_v = y_v + self.gain_v * y_theta
            z = (1 - rule.beta1) * z_m + 2 * (1 - rule.beta2) * self.g * z_v
        base = self.alpha * y_theta + rule.l2 * z if rule.has_l2 else self.alpha * y_theta
        new_theta = self.clip.curvature_term(z, base, 1.0, transpose=True)
        return torch.cat([new_theta, rule.beta1 * z_m, rule.beta2 * z_v], dim=1)

    def _output(self, g: torch.Tensor, m_next: torch.Tensor, v_next: torch.Tensor) -> torch.Tensor:
        """The step's own output ``(theta' - alpha theta, m' - b1 m, v' - b2 v)`` at the point ``(g, m', v')``."""
        rule = self.rule
        root, _ = self._root(v_next)
        moved = -self.lr * (m_next / self.bias1) / (root + rule.eps)
        second = torch.zeros_like(g) if rule.frozen else (1 - rule.beta2) * g * g
        return torch.cat([moved, (1 - rule.beta1) * g, second], dim=1)

    def _point_of(self, clipped: torch.Tensor):
        g, m_next, v_next = self._point(clipped)
        return g, m_next, self.v_next.expand_as(g) if self.rule.frozen else v_next

    def step_output(self, gradient: torch.Tensor) -> torch.Tensor:
        return self._output(*self._point_of(self.clip.clipped(gradient)))

    def _removal_map(self, states: torch.Tensor):
        """``f(G, E) -> (tangent step, step output)`` for rows of batch gradients ``G`` and tangents ``E``."""

        def step(gradient, curved):
            clip_tangent, clipped = self.clip.rows(gradient, curved)
            g, m_next, v_next = self._point_of(clipped)
            return self._tangent(states, clip_tangent, g, m_next, v_next), self._output(g, m_next, v_next)

        return step

    def occurrence(self, states, row_owner, rows, coefficient) -> torch.Tensor:
        theta = states[:, : self.rule.param_dim]
        removed_grad, removed_hvp = removed_terms(self.batch, theta, row_owner, rows, coefficient,
                                                  self.rule.accumulative)
        gradient = self.batch.batch_grad.expand_as(theta)
        return removal_step(self._removal_map(states), gradient, self.batch.hvp(theta), removed_grad, removed_hvp,
                            coefficient, self.rule.removal)


class AdamRule(UpdateRule):
    """Adam-IE / ACC-Adam-IE for runs trained with ``torch.optim.Adam`` or ``AdamW`` (no amsgrad)."""

    def __init__(self, problem: InfluenceProblem, removal: str = "exact", frozen_preconditioner: bool = False):
        check_removal(removal)
        spec = problem.optimizer
        self.problem, self.removal, self.frozen = problem, removal, frozen_preconditioner
        curvature = problem.curvature
        self.param_dim = curvature.dim
        self.state_dim = 3 * self.param_dim
        self.beta1, self.beta2, self.eps = spec.adam_hyperparameters(curvature)
        decay = spec.expand(curvature, lambda group: group.weight_decay or 0.0)
        decoupled = spec.kind.decoupled_decay
        self.decoupled = decay if decoupled else torch.zeros_like(decay)
        self.l2 = torch.zeros_like(decay) if decoupled else decay
        self.has_l2 = not decoupled and any(spec.groups[index].weight_decay for index in spec.group_of.values())

    def at_step(self, step: int) -> AdamStep:
        return AdamStep(self, step)
