"""Data value embeddings (DESIGN.md section 5; Wang et al., ICLR 2025): DVEmb and ACC-DVEmb.

Per-row gradients ``g_r`` of the scope at ``theta_t`` are projected, ``g~_r = R g_r`` (:mod:`.projection`),
and the batch curvature is replaced by its empirical-Fisher form built from them, so every state lives in
``k`` dimensions whatever the scope: the projected forward form for deep scopes (DESIGN.md section 6b).
A state ``x`` (``R Delta``) moves by

    x' = (1 - d_t) x - sum_r w_r u~_r (g~_r . x)                         (shared transition M_t)
         + sum_{r of j} w_r u~_r (1 + c g~_r . x)                       (occurrence of j: injection, ACC)

with ``u~_r = R u_r`` the projected *update direction* of row ``r``: ``u_r = D_t clip_t(g_r)``, ``D_t`` the
total displacement of the parameters, over the rest of the run, per unit of gradient at step ``t``
through the optimizer's own state along the recorded trajectory (curvature aside: that is the GN term).
For plain SGD ``D_t = eta_t`` and this is dattri's DVEmb; the other factors make it follow what the HF
Trainer ran: the clip map of the step (DESIGN.md section 4: ``a_t (e - ghat (ghat . e))`` on clipped steps,
applied to each row's gradient, so ``u_r = D_t clip(g_r)``); SGD momentum spreads a gradient over later steps at
their rates (:func:`effective_rates`); for Adam the gradient enters both moments, and
:class:`AdamDisplacement` sums, backwards over the run, its effect through ``m`` (the preconditioned,
bias-corrected steps) and through ``v`` (the preconditioner's response, which makes Adam's first steps
nearly scale-invariant: a frozen preconditioner there would weigh early rows by ``1/|g|``). ``d_t`` is the
decay of the state: ``eta lam`` (AdamW, decoupled), ``D_t lam`` (SGD or Adam L2; refused unless in [0, 1)); the projection only
carries a scalar decay, so where the chosen parameters decay at different rates (HF exempts biases and
norms) their mean is used and this is logged.
``c = 1`` at re-occurrences is ACC-DVEmb: the removed row's own rank-one curvature ``w_j u~_j g~_j^T``
(the paper's section 7); ``c = 0`` is DVEmb.

``curvature="ggn"`` replaces the empirical Fisher by the Gauss-Newton form with each row's true output Hessian
(:mod:`.output_hessian`): ``C`` projected factor pairs ``(R D clip f_rc, R f_rc)`` per row, ``f_rc`` the columns of
``J_r^T L_r`` with ``L_r L_r^T = diag p_r - p_r p_r^T``; the injection is unchanged and the state stays ``k``.
Measured whole-model under AdamW (docs/FIDELITY.md, "DVEmb at deep scopes", issue 22) neither form comes near the
exact Adam-IE adjoint (Kendall tau 0.05-0.10 between their scores): the curvature approximation itself is what
fails there, so :func:`deep_scope_warning` says so, and :mod:`hf_accinf.engine.sketch` gives the exact method's
embeddings in a random sketch instead (methods ``adam-ie-sketch`` / ``sgd-ie-sketch``).

Against dattri's implementation (``dattri/algorithm/dvemb.py``, read for the comparison): the same
recursion, run there as one backward pass with a ``k x k`` matrix (our propagator schedule does that for
any method). Differences, all deliberate: dattri draws ``R`` with entries ``N(0, 1/k)`` and scales the
projected gradient by ``1/sqrt(k)`` again (``E[R^T R] = I/k``, which shrinks the curvature term k-fold
against the injection); it divides the per-sample gradients by ``b`` on both factors of the curvature
(``eta/b^2 sum g g^T`` instead of the batch mean ``eta/b sum g g^T``); its backward product ``G M`` (not
``G M^T``) applies the step transitions in reverse time order, which only matters because they do not
commute. Here ``R`` is scaled once, the weights are the recorded per-row loss weights ``w_r``
(``1/b`` for a mean loss, repeats counted), the transitions run in time order, and the factors above
follow the recorded optimizer. Embeddings are ``N x k`` (dattri keeps one per epoch; ours are the whole
run's, as every other method's), and an objective's gradient enters their space by :meth:`embed_gradient`.
"""

from __future__ import annotations

import logging

import torch

from ..errors import AccInfError
from ..losses import clip_coefficient
from ..problem import InfluenceProblem
from ..curvature.model import ModelCurvature
from .adam import adam_gains
from .base import StepOps, UpdateRule
from .output_hessian import row_output_factors
from .projection import GradientProjection
from .removal import ClipMap

logger = logging.getLogger(__name__)

DVEMB_CURVATURES = ("fisher", "ggn")


DVEMB_METHODS = {"dvemb": "DVEmb", "acc-dvemb": "ACC-DVEmb"}
DEEP_SCOPE_FIDELITY = (
    "measured whole-model on a tiny ViT and a tiny BERT that learnt under AdamW (docs/FIDELITY.md, 'DVEmb at deep "
    "scopes'), its scores agree with the exact Adam-IE adjoint's at Kendall tau 0.01-0.10 for k = 512-4096 and "
    "with leave-one-out retraining at -0.01 to 0.32, where the exact adjoint reaches 0.43 (linearity ceiling 0.66); "
    "the Gauss-Newton curvature with the true output Hessian does no better")


def deep_scope_warning(method: str, deep: bool) -> str | None:
    """The sentence to log as a WARNING when ``method`` is DVEmb / ACC-DVEmb on a scope beyond the recorded head
    (``deep``), where its measured agreement with retraining is low; ``None`` otherwise. On the head (a linear
    layer under cross-entropy) the projected recursion tracks the exact method (docs/FIDELITY.md)."""
    if method not in DVEMB_METHODS or not deep:
        return None
    return (f"{DVEMB_METHODS[method]} on a scope beyond the head is a coarse approximation: {DEEP_SCOPE_FIDELITY}. "
            "For scores to prune or clean by, use the exact adjoint (method adam-ie / sgd-ie, form adjoint); for "
            "test-agnostic embeddings of k numbers per row, adam-ie-sketch / sgd-ie-sketch --sketch_basis gradients "
            "(the exact method in the training gradients' leading subspace); keep DVEmb for the head. scores.json's trust.reference gives these scores' agreement "
            "with the exact adjoint's; --verify K checks them against retraining.")


def effective_rates(lr: torch.Tensor, momentum: list[float], nesterov: bool = False) -> torch.Tensor:
    """``(T, groups)``: SGD's total displacement per unit gradient of step ``t`` over the rest of the run,
    ``sum_{s >= t} eta_s mu^(s-t)`` (dampening 0; Nesterov ``eta_t + sum_{s >= t} eta_s mu^(s-t+1)``), in one
    backward pass: a gradient late in a run, or under a decaying rate, moves less."""
    lr = lr.double()
    result, tail = torch.zeros_like(lr), torch.zeros(lr.shape[1], dtype=torch.float64)
    mu = torch.tensor(momentum, dtype=torch.float64)
    for t in reversed(range(lr.shape[0])):
        tail = lr[t] + mu * tail
        result[t] = lr[t] + mu * tail if nesterov else tail
    return result


class AdamDisplacement:
    """``D_t = -d theta_T / d g_t`` per coordinate for Adam/AdamW along the recorded run (the gradients of
    later steps held at their recorded values), accumulated backwards one step at a time:

        D_t = (1 - b1) L_t - 2 (1 - b2) g_t K_t
        L_t = eta_t / (c1_t (r_t + eps)) + b1 L_{t+1},   K_t = eta_t mhat_t / (2 c2_t r_t (r_t + eps)^2) + b2 K_{t+1}

    with ``g_t`` the step's clipped gradient (plus Adam's L2 term), ``c1, c2`` the bias corrections,
    ``mhat_t``, ``r_t = sqrt(vhat_t)`` after the step (``K``'s term is 0 where ``r_t = 0``). Only two
    P-vectors are kept; call :meth:`at` for ``t = T-1, ..., 0`` in that order."""

    def __init__(self, problem: InfluenceProblem, beta1: torch.Tensor, beta2: torch.Tensor, eps: torch.Tensor,
                 l2: torch.Tensor):
        self.problem, self.beta1, self.beta2, self.eps, self.l2 = problem, beta1, beta2, eps, l2
        self.first = torch.zeros_like(beta1)
        self.second = torch.zeros_like(beta1)
        self.has_l2 = bool((l2 != 0).any())  # once, not at every step

    def at(self, step: int, batch_grad: torch.Tensor, clip: float) -> torch.Tensor:
        problem, curvature = self.problem, self.problem.curvature
        beta1, beta2, eps = self.beta1, self.beta2, self.eps
        count = int(problem.trajectory.optimizer_step_count[step]) + 1
        gradient = clip * batch_grad
        if self.has_l2:
            gradient = gradient + self.l2 * curvature.optimizer_state(step, "param")
        m = beta1 * curvature.optimizer_state(step, "exp_avg") + (1 - beta1) * gradient
        v = beta2 * curvature.optimizer_state(step, "exp_avg_sq") + (1 - beta2) * gradient * gradient
        gain_m, gain_v = adam_gains(problem.learning_rates(step), m, v, 1 - beta1**count, 1 - beta2**count, eps)
        self.first = gain_m + beta1 * self.first
        self.second = gain_v + beta2 * self.second
        return (1 - beta1) * self.first - 2 * (1 - beta2) * gradient * self.second


def _factors_to(factors: tuple, device) -> tuple:
    return tuple(value.to(device) if isinstance(value, torch.Tensor) else value for value in factors)


class DVEmbStep(StepOps):
    """One projected step. Curvature factors ``(U, F, w_c)``: the rows' ``(u~_r, g~_r, w_r)`` (empirical Fisher), or
    ``C`` per row, ``(R D clip(f_rc), R f_rc, w_r)`` with ``f_rc`` the columns of ``J_r^T L_r`` (GGN); injections
    ``w_r u~_r`` with ``u~_r = R D clip(g_r)``."""

    def __init__(self, rule: "DVEmbRule", step: int):
        self.update, self.weight, self.decay, self.curve_update, self.curve, self.curve_weight = rule.factors(step)
        self.per_row = len(self.curve) // len(self.weight)  # curvature columns per row (1, or C for the GGN)

    def apply(self, states: torch.Tensor) -> torch.Tensor:
        return (1 - self.decay) * states - ((states @ self.curve.T) * self.curve_weight) @ self.curve_update

    def apply_adjoint(self, states: torch.Tensor) -> torch.Tensor:
        return (1 - self.decay) * states - ((states @ self.curve_update.T) * self.curve_weight) @ self.curve

    def occurrence(self, states, row_owner, rows, coefficient) -> torch.Tensor:
        result = self.apply(states)
        result.index_add_(0, row_owner, self.weight[rows, None] * self.update[rows])
        columns = (rows[:, None] * self.per_row + torch.arange(self.per_row, device=rows.device)).flatten()
        owners = row_owner.repeat_interleave(self.per_row)
        own = (states[owners] * self.curve[columns]).sum(-1) * self.curve_weight[columns]
        scale = own * coefficient[owners]  # the row's own curvature, for ACC (c = 1) only
        return result.index_add_(0, owners, scale[:, None] * self.curve_update[columns])


class DVEmbRule(UpdateRule):
    """DVEmb / ACC-DVEmb for runs trained with SGD, Adam or AdamW, on any scope.

    The step factors ``(u~, g~, w, d)`` of every step are built once, in one backward pass over the run
    (Adam's displacement needs the steps after ``t``), and kept: ``2 T b k`` numbers, refused above half
    of ``memory_budget_gb`` before any work."""

    parameter_space = False
    shard = None  # engine.sharding.ShardContext set by the scoring forms: the step factors are split by steps

    def __init__(self, problem: InfluenceProblem, projection_dim: int = 512, projection_seed: int = 0,
                 memory_budget_gb: float = 4.0, curvature: str = "fisher"):
        if curvature not in DVEMB_CURVATURES:
            raise AccInfError(f"DVEmb curvature must be one of {', '.join(DVEMB_CURVATURES)}, got '{curvature}'.")
        self.problem, self.curvature_form = problem, curvature
        curvature, spec, trajectory = problem.curvature, problem.optimizer, problem.trajectory
        if self.curvature_form == "ggn" and not isinstance(curvature, ModelCurvature):
            raise AccInfError("DVEmb with curvature='ggn' runs the whole model (the model backend): choose a scope "
                              "beyond the recorded head, or curvature='fisher'.")
        self.adam = spec.kind.adaptive
        width = curvature.dim if projection_dim == 0 or projection_dim >= curvature.dim else projection_dim
        rows = int(trajectory.row_offsets[-1])
        vectors = 2 if self.curvature_form == "fisher" else 1 + 2 * max(getattr(curvature, "num_classes", 0), 2)
        factors_gb = vectors * rows * width * torch.finfo(curvature.dtype).bits / 8 / 2**30
        if factors_gb > memory_budget_gb / 2:
            raise AccInfError(
                f"DVEmb ({self.curvature_form}) keeps {vectors} {width}-dimensional projections per recorded row "
                f"({rows} rows, {factors_gb:.1f} GiB), more than half of --memory_budget_gb {memory_budget_gb}: lower "
                "--projection_dim, raise the budget or use --dtype float32.")
        if width == curvature.dim and projection_dim:
            logger.info("dvemb: projection_dim %d >= the scope's %d parameters: no projection (exact dot products)",
                        projection_dim, curvature.dim)
        self.projection = GradientProjection(curvature.dim, projection_dim, projection_seed, curvature.dtype,
                                             curvature.device, memory_gb=memory_budget_gb / 4)
        self.param_dim = self.state_dim = self.projection.dim

        self.decay_rate = spec.expand(curvature, lambda group: group.weight_decay or 0.0)
        self.decoupled = spec.kind.decoupled_decay
        if self.adam:
            self.beta1, self.beta2, self.eps = spec.adam_hyperparameters(curvature)
        else:
            momentum = [group.momentum or 0.0 for group in spec.groups]
            self.rates = effective_rates(trajectory.lr, momentum, bool(spec.uniform("nesterov")) if any(
                momentum[i] for i in spec.group_of.values()) else False)
        if bool((self.decay_rate != self.decay_rate[0]).any()):
            logger.info("dvemb: the chosen parameters decay at different rates; the projected state decays at "
                        "their mean (DESIGN.md section 5)")
        self._factors: list[tuple] | None = None

    def embed_gradient(self, gradient: torch.Tensor) -> torch.Tensor:
        return self.projection(gradient)

    def _build_factors(self) -> list[tuple]:
        """One backward pass: per step, the rows' gradients projected twice (``u~ = R(D_t clip_t(g_r))``, ``g~ = R g_r``,
        in one product), the row weights and the state's decay ``d_t``. Several processes (:attr:`shard`) take the
        steps round-robin for the rows' gradients and projections and exchange the factors (``2 T b k`` numbers);
        Adam's displacement, a recursion over every step's batch gradient, runs on each of them."""
        problem, curvature = self.problem, self.problem.curvature
        trajectory, spec = problem.trajectory, problem.optimizer
        steps = trajectory.num_steps
        shard = self.shard
        mine = set(shard.steps_of(steps)) if shard is not None and shard.world_size > 1 else set(range(steps))
        displacement = AdamDisplacement(problem, self.beta1, self.beta2, self.eps, torch.zeros_like(self.decay_rate)
                                        if self.decoupled else self.decay_rate) if self.adam else None
        factors: list[tuple] = [None] * steps
        decays: list[torch.Tensor] = [None] * steps
        for step in reversed(range(steps)):
            batch = curvature.at_step(step) if displacement is not None or step in mine else None
            clip = clip_coefficient(float(trajectory.grad_norm[step]), spec.max_grad_norm)
            if displacement is not None:
                direction = displacement.at(step, batch.batch_grad, clip)
                decay = problem.learning_rates(step) * self.decay_rate if self.decoupled else direction * self.decay_rate
            else:
                direction = curvature.expand({name: float(self.rates[step, index]) for name, index in spec.group_of.items()})
                decay = direction * self.decay_rate
            decay = decay.mean()  # a device scalar: checked for every step at once after the pass (no sync per step)
            decays[step] = decay
            if step not in mine:
                continue
            gradients = batch.row_grads(torch.arange(len(batch.row_weight), device=batch.row_weight.device))
            clip_map = ClipMap.of_gradient(batch.batch_grad, spec.max_grad_norm, float(trajectory.grad_norm[step]))
            if self.curvature_form == "fisher":
                both = self.projection(torch.cat([clip_map.jacobian(gradients) * direction, gradients]))
                update, projected = both.split(len(gradients))
                factors[step] = (update, batch.row_weight, decay, update, projected, batch.row_weight)
                continue
            columns = row_output_factors(batch).flatten(0, 1)  # (b C, P): rows' output-Hessian factors
            moved = clip_map.jacobian(torch.cat([gradients, columns])) * direction
            update, curve_update = self.projection(moved).split([len(gradients), len(columns)])
            weight = batch.row_weight.repeat_interleave(len(columns) // len(gradients))
            factors[step] = (update, batch.row_weight, decay, curve_update, self.projection(columns), weight)
        stacked = torch.stack(decays).cpu() if steps else torch.zeros(0)
        outside = ((stacked < 0) | (stacked >= 1)).nonzero().flatten()
        if len(outside):
            step = int(outside[-1])
            raise AccInfError(f"DVEmb: the projected state's decay at step {step} is {float(stacked[step]):.3g} (Adam's "
                              "L2 weight decay through a preconditioner near 1/eps): it must lie in [0, 1). Train with "
                              "AdamW (decoupled decay) or score with adam-ie.")
        if len(mine) < steps:
            device = curvature.device
            moved = {step: _factors_to(factors[step], "cpu") for step in mine}
            for part in shard.all_gather_object(moved):
                for step, value in part.items():
                    factors[step] = _factors_to(value, device)
        return factors

    def prepare(self) -> None:
        """Build every step's factors now (collective under several processes: every process must call it)."""
        if self._factors is None and self.problem.trajectory.num_steps:
            self._factors = self._build_factors()

    def factors(self, step: int) -> tuple:
        """``(u~ (b, k), w (b,), d, U (m, k), F (m, k), w_c (m,))``: the injections' projected update directions, the
        row weights, the decay, and the curvature's factors (``m = b`` for the Fisher, ``b C`` for the GGN)."""
        if self._factors is None:
            self._factors = self._build_factors()
        return self._factors[step]

    def at_step(self, step: int) -> DVEmbStep:
        return DVEmbStep(self, step)
