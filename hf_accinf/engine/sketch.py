"""Exact projected embeddings ``R Delta^j_T`` of a classical parameter-space rule (issue 22), ``k`` numbers per row,
and the exact adjoint's reference check of projected methods' scores.

``(R Delta^j_T)_i = r_i . Delta^j_T`` is the adjoint-form score of row ``j`` for the objective ``r_i`` (row ``i``
of the projection ``R``, :mod:`~hf_accinf.methods.projection`): one backward pass of the rule's adjoint with the
``k`` rows of ``R`` as ``k`` adjoint vectors at once gives every row's projected embedding **without any
approximation of the recursion** (Adam-IE's moments carried per step, the exact batch Hessian, exact removal),
whatever ``N``. A test objective enters by ``R g`` and its score is ``(R Delta^j) . (R g)``, unbiased for
``Delta^j . g`` (Johnson-Lindenstrauss, the only approximation left). DESIGN.md sections 3 ("Forward form and
adjoint form": ``s_j = sum_t u_{t+1} . inj_{j,t}``) and 6b ("Forms").

:class:`SketchRule` (methods ``adam-ie-sketch`` / ``sgd-ie-sketch``) is the same thing as a forward-form rule in
``k`` dimensions: row ``j``'s state at step ``t`` is ``x^j_t = U_t Delta^j_t`` with ``U_t = R M_{T-1} ... M_t`` (the
sketch pulled back to step ``t``), what the row's perturbation at ``t`` becomes at the end, sketched. Then
``x^j_{t+1} = x^j_t + U_{t+1} inj_{j,t}``: the transition is the identity and each occurrence adds its injection
seen through ``U_{t+1}``, which the backward pass computes once (``k`` numbers per recorded occurrence). So the
engine's forward form (sweep or propagator, sharded) carries ``k`` numbers per row and ``x^j_T = R Delta^j_T``.

Cost: per step one batch product ``M_t^T`` with ``k`` vectors (``k`` whole-model HVPs) and the batch rows'
injections: ``k``-fold the single-objective adjoint, exact, where DVEmb (the empirical-Fisher, collapsed-moment
recursion) is cheap and, at deep scopes, measured far from the exact method (docs/FIDELITY.md, "DVEmb at deep
scopes"). Memory: the ``k x S`` adjoint block (``S = 3P`` for Adam; carried ``chunk`` vectors at a time when it
does not fit), ``k`` numbers per recorded occurrence and ``k`` per row. Classical methods only: ACC's per-row
transitions have no shared adjoint.

The subspace decides the projection's error. Measured whole-model on a BERT and a ViT that learnt
(docs/FIDELITY.md, "DVEmb at deep scopes"): a random Gaussian ``R`` (unbiased) agrees with the exact scores at
Kendall tau 0.09-0.39 at k = 256 (0.69 at k = 1024 on the BERT); the leading right singular subspace of the
training rows' gradients (:class:`GradientSubspace`, ``--sketch_basis gradients``) at 0.89-0.99 at k = 64 and
0.962-0.994 at k = 256.

:func:`reference_check`: the scores of a projected method (DVEmb, ACC-DVEmb, the sketches) against the exact
classical adjoint's for the same objective (one backward pass of adam-ie / sgd-ie), as Kendall tau and Pearson r
on every row, with a warning below :data:`REFERENCE_TAU`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import torch
from scipy import stats
from tqdm.auto import tqdm

from .adjoint import adjoint_scores
from .plan import StepOccurrences, build_plan
from ..errors import AccInfError
from ..methods.base import StepOps, UpdateRule
from ..methods.projection import GradientProjection
from ..methods.registry import build_method, reference_method

logger = logging.getLogger(__name__)

# Below this Kendall tau against the exact adjoint a projected method's scores are warned about: DVEmb on the head
# reaches 0.84 and more there, whole-model DVEmb 0.006-0.60 (docs/FIDELITY.md, "DVEmb at deep scopes").
REFERENCE_TAU = 0.8


def _check_classical(rule: UpdateRule, projection) -> None:
    if not getattr(rule, "parameter_space", True) or getattr(rule, "accumulative", False):
        raise AccInfError("Sketched embeddings need a classical parameter-space method (adam-ie, sgd-ie).")
    if projection.input_dim != rule.param_dim:
        raise AccInfError(f"The projection maps {projection.input_dim} parameters; the scope has {rule.param_dim}.")


def sketched_injections(rule: UpdateRule, problem, projection, chunk: int | None = None, progress: bool | None = True
                        ) -> Iterator[tuple[int, StepOccurrences, slice, torch.Tensor]]:
    """``(step, occurrences, columns, U_{t+1} inj)``: every occurring row's injection under the classical ``rule``
    seen through the sketch pulled back to after step ``t`` (``t = T-1, ..., 0``), ``(m, len(columns))``, for the
    sketch's rows ``columns``: one backward pass per ``chunk`` of them (default: all in one pass), so that only
    ``chunk x S`` adjoint numbers are held at once."""
    _check_classical(rule, projection)
    matrix = projection.matrix()
    chunk = chunk or len(matrix)
    trajectory = problem.trajectory
    plan = build_plan(trajectory, 0, problem.num_samples, matrix.device)
    passes = range(0, len(matrix), chunk)
    bar = tqdm(total=len(passes) * trajectory.num_steps, desc="sketched adjoint",
               disable=None if progress is None else not progress, leave=False)
    for start in passes:
        columns = slice(start, min(start + chunk, len(matrix)))
        adjoint = torch.stack([rule.final_objective_state(row) for row in matrix[columns]])
        for step in reversed(range(trajectory.num_steps)):
            ops = rule.at_step(step)
            occurrences = plan.steps[step]
            if len(occurrences.samples):
                count = len(occurrences.samples)
                zero = torch.zeros(count, rule.state_dim, dtype=matrix.dtype, device=matrix.device)
                injected = ops.occurrence(zero, occurrences.row_owner, occurrences.rows, zero[:, 0])
                yield step, occurrences, columns, injected @ adjoint.T
            adjoint = ops.apply_adjoint(adjoint)
            bar.update()
    bar.close()


def sketched_embeddings(rule: UpdateRule, problem, projection, chunk: int | None = None,
                        progress: bool = True) -> torch.Tensor:
    """``(N, k)``: ``R Delta^j_T`` for every training row ``j`` under the classical ``rule`` (a parameter-space
    rule: adam-ie, sgd-ie), the ``k`` adjoint vectors propagated ``chunk`` at a time (default: all)."""
    embeddings = torch.zeros(problem.num_samples, projection.dim, dtype=projection.dtype, device=projection.device)
    for _, occurrences, columns, seen in sketched_injections(rule, problem, projection, chunk, progress):
        embeddings[:, columns].index_add_(0, occurrences.samples, seen.to(embeddings.dtype))
    return embeddings


class GradientSubspace:
    """``Q`` (k, P): orthonormal rows spanning the leading right singular subspace of the training rows' gradients
    over the run's last epoch (each at its step's ``theta_t``), where in-distribution objectives' gradients lie
    (rung g of docs/FIDELITY.md, "DVEmb at deep scopes"), found by a randomized range finder in two passes over
    that epoch's batches (Halko, Martinsson and Tropp 2011, algorithm 4.1 with ``2k`` columns, then the ``k``
    leading directions of the rows in that range): ``2k P`` numbers, no ``N x P`` matrix. The interface of
    :class:`~hf_accinf.methods.projection.GradientProjection`; built on first use. Scores ``(Q Delta^j) . (Q g)``
    are exact for objectives in the span and lose the part of ``g`` outside it (not unbiased)."""

    identity = False

    def __init__(self, problem, dim: int, seed: int = 0):
        curvature, trajectory = problem.curvature, problem.trajectory
        self.problem, self.seed = problem, seed
        last = trajectory.epoch == trajectory.epoch[-1]
        self.steps = last.nonzero().flatten().tolist()
        rows = sum(len(trajectory.batch(step)) for step in self.steps)
        self.input_dim, self.dtype, self.device = curvature.dim, curvature.dtype, curvature.device
        self.dim = min(dim, curvature.dim, rows)
        self._basis: torch.Tensor | None = None

    def _gradients(self) -> Iterator[torch.Tensor]:
        curvature = self.problem.curvature
        for step in self.steps:
            batch = curvature.at_step(step)
            yield batch.row_grads(torch.arange(len(batch.row_weight), device=batch.row_weight.device))

    def matrix(self) -> torch.Tensor:
        if self._basis is None:
            width = min(2 * self.dim, self.input_dim)
            generator = torch.Generator().manual_seed(self.seed)
            sketch = torch.zeros(self.input_dim, width, dtype=self.dtype, device=self.device)
            for gradients in self._gradients():
                mixing = torch.randn(len(gradients), width, generator=generator, dtype=torch.float64)
                sketch += gradients.T @ mixing.to(gradients.device, gradients.dtype)
            range_basis = torch.linalg.qr(sketch).Q  # (P, width)
            rows = torch.cat([gradients @ range_basis for gradients in self._gradients()])  # (rows, width)
            leading = torch.linalg.svd(rows, full_matrices=False).Vh[: self.dim]  # (k, width)
            self._basis = leading @ range_basis.T
        return self._basis

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors @ self.matrix().to(vectors.dtype).T


class SketchStep(StepOps):
    """One step of :class:`SketchRule`: the identity, and at an occurrence the row's cached ``U_{t+1} inj``."""

    def __init__(self, seen: torch.Tensor | None):
        self.seen = seen  # (b, k): each occurrence's U_{t+1} inj on its first batch row, zeros on its other rows

    def apply(self, states: torch.Tensor) -> torch.Tensor:
        return states

    def apply_adjoint(self, states: torch.Tensor) -> torch.Tensor:
        return states

    def occurrence(self, states, row_owner, rows, coefficient) -> torch.Tensor:
        if self.seen is None:
            return states.clone()
        return states.index_add(0, row_owner, self.seen[rows].to(states.dtype))


class SketchRule(UpdateRule):
    """``adam-ie-sketch`` / ``sgd-ie-sketch``: the classical rule ``exact`` tracked in a ``k``-dimensional sketch
    (the module docstring), random by default. ``projection_dim`` 0 (or ``>= P``) is the identity: the exact embeddings.

    The backward pass runs on the first :meth:`at_step` and keeps ``k`` numbers per recorded batch row; the
    ``k x S`` adjoint block is carried in chunks of at most a quarter of ``memory_budget_gb``, one backward pass each. Refused before any
    work when the cached injections exceed half of it. ``progress``: the backward pass's bar (``None``: on a
    terminal only). ``projection``: another ``(k, P)`` map than the seeded Gaussian one (:class:`GradientSubspace`,
    ``--sketch_basis gradients``; or any :class:`~hf_accinf.methods.projection.BasisProjection`): biased for
    objectives outside its span, and not rebuilt from a seed by ``attribution_matrix``."""

    parameter_space = False

    def __init__(self, exact: UpdateRule, problem, projection_dim: int = 512, projection_seed: int = 0,
                 memory_budget_gb: float = 4.0, progress: bool | None = None, projection=None):
        if not getattr(exact, "parameter_space", True):
            raise AccInfError("A sketch tracks a classical parameter-space method (adam-ie, sgd-ie).")
        curvature = problem.curvature
        self.exact, self.problem, self.progress = exact, problem, progress
        self.projection = projection or GradientProjection(exact.param_dim, projection_dim, projection_seed,
                                                           curvature.dtype, curvature.device, memory_gb=memory_budget_gb / 4)
        self.param_dim = self.state_dim = self.projection.dim
        itemsize = torch.finfo(curvature.dtype).bits / 8
        rows = int(problem.trajectory.row_offsets[-1])
        cached_gb = rows * self.state_dim * itemsize / 2**30
        if cached_gb > memory_budget_gb / 2:
            raise AccInfError(
                f"The sketch keeps {self.state_dim} numbers per recorded batch row ({rows} rows, {cached_gb:.1f} GiB), "
                f"more than half of --memory_budget_gb {memory_budget_gb:g}: lower --projection_dim or raise the budget.")
        self.chunk = max(1, int(memory_budget_gb / 4 * 2**30 / (exact.state_dim * itemsize)))
        if self.chunk < self.state_dim:
            logger.info("sketch: the %d x %d adjoint block exceeds a quarter of the memory budget: %d backward "
                        "passes of %d vectors", self.state_dim, exact.state_dim, -(-self.state_dim // self.chunk),
                        self.chunk)
        self._seen: list[torch.Tensor | None] | None = None

    def embed_gradient(self, gradient: torch.Tensor) -> torch.Tensor:
        return self.projection(gradient)

    def _backward(self) -> list[torch.Tensor | None]:
        trajectory = self.problem.trajectory
        seen: list[torch.Tensor | None] = [None] * trajectory.num_steps
        for step, occurrences, columns, values in sketched_injections(self.exact, self.problem, self.projection,
                                                                      self.chunk, self.progress):
            size = len(trajectory.batch(step))
            if seen[step] is None:
                seen[step] = values.new_zeros(size, self.state_dim)
            first = torch.full((len(occurrences.samples),), size, dtype=occurrences.rows.dtype,
                               device=occurrences.rows.device)
            first.scatter_reduce_(0, occurrences.row_owner, occurrences.rows, "amin")
            seen[step][first, columns] = values
        return seen

    def at_step(self, step: int) -> SketchStep:
        if self._seen is None:
            self._seen = self._backward()
        return SketchStep(self._seen[step])


def reference_check(method, problem, objective_gradient: torch.Tensor, scores: torch.Tensor, reference: UpdateRule,
                    progress: bool = False) -> dict:
    """The agreement of a projected method's ``scores`` ``(N,)`` with the exact classical adjoint's for the same
    objective (``objective_gradient`` ``(P,)`` in the scope's layout; ``reference``: the classical rule, e.g.
    adam-ie for DVEmb on an AdamW run): one backward pass, Kendall tau and Pearson r over every row. Logs a
    WARNING when tau is below :data:`REFERENCE_TAU`."""
    began = time.perf_counter()
    exact = adjoint_scores(reference, problem, objective_gradient.to(problem.curvature.dtype), progress=progress).scores
    estimate, truth = scores.double().cpu().numpy(), exact.double().cpu().numpy()
    tau = float(stats.kendalltau(estimate, truth).statistic)
    pearson = float(stats.pearsonr(estimate, truth).statistic) if len(truth) > 1 else float("nan")
    name = getattr(getattr(method, "spec", None), "name", type(method).__name__)
    check = {"reference": f"{reference.spec.name} adjoint", "rows": len(truth), "kendall_tau": tau,
             "pearson_r": pearson, "threshold": REFERENCE_TAU, "low": not tau >= REFERENCE_TAU,
             "seconds": time.perf_counter() - began}
    if check["low"]:
        logger.warning("%s's scores agree with the exact %s adjoint's at Kendall tau %.3f (Pearson r %.3f) over %d "
                       "rows, below %.2f: do not act on them; score with %s (its adjoint form) instead, or for "
                       "embeddings with %s-sketch --sketch_basis gradients (docs/FIDELITY.md, 'DVEmb at deep scopes').",
                       name, reference.spec.name, tau, pearson, len(truth), REFERENCE_TAU, reference.spec.name,
                       reference.spec.name)
    else:
        logger.info("reference check: Kendall tau %.3f, Pearson r %.3f against the exact %s adjoint over %d rows",
                    tau, pearson, reference.spec.name, len(truth))
    return check


def reference_check_for(method, problem, args, objective_gradient: Callable[[], torch.Tensor], scores: torch.Tensor,
                        progress: bool = False) -> dict | None:
    """:func:`reference_check` of a score run (``args``: the score arguments) when it applies: a projected method
    (registry ``projected``) scored linearly, ``args.reference_check`` not ``off``; ``None`` otherwise.
    ``objective_gradient()`` gives the objective's gradient in the scope's layout."""
    spec = getattr(method, "spec", None)
    exact = reference_method(spec.name, problem.optimizer.name) if spec is not None else None
    if exact is None or getattr(args, "reference_check", "auto") == "off" or args.score_kind != "linear":
        return None
    reference = getattr(method, "exact", None) or build_method(problem, exact, args)
    return reference_check(method, problem, objective_gradient(), scores, reference, progress)
