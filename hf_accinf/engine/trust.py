"""How far the linearization can be trusted (DESIGN.md section 6b, "Trust"; issue 11, deliverable 4).

Every estimate is a first-order prediction carried by the product of the step transitions
``A = M_{T-1} ... M_0`` (DESIGN.md section 6a). Where ``A`` amplifies perturbations, a row's removal is
amplified too, and so is the part of it that the linearization drops: the run is chaotic and no
first-order estimate predicts leave-one-out retraining. Two figures measure it:

* **tangent growth**: ``||P A P^T||_2``, the largest amplification of a parameter perturbation from the
  start to the end of the run (``P`` keeps the parameter block of the state; optimizer states such as the
  momentum buffer are carried through ``A`` but are not measured, since their units differ: a buffer's
  norm scales with the curvature, so the whole state's norm would report the curvature's size, not
  growth). Estimated by subspace (block power) iteration on ``(P A P^T)^T (P A P^T)`` with a few random
  probes, ``ops.apply`` forward and ``ops.apply_adjoint`` backward, the block re-orthonormalized (QR) at
  every step so that neither overflow nor the loss of the probes' independence can occur. The estimate
  is the largest singular value on the probes' final subspace: a lower bound of the norm, exact when
  the probes span the parameters. The same factors give the growth up to the end of each epoch.
* **embedding ratio** (forward form): ``||Delta^j_T|| / sum_t ||inj_{j,t}||`` per row (parameter blocks),
  how much the run amplified what row ``j`` injected. With momentum ``mu`` a lone injection already
  reaches ``1/(1 - mu)`` times its size, curvature aside.

The run is called **expansive** when the growth exceeds :data:`EXPANSIVE_GROWTH` (10). A stable run
contracts or keeps perturbations bounded (``|1 - eta lambda| <= 1`` for every curvature ``lambda`` of
plain SGD, and a bounded transient for momentum), so its product stays near or below 1; past the edge of
stability (``eta lambda_max > 2``) or in a chaotic region the product grows geometrically with the number
of steps, so it crosses any fixed bound after a few epochs. A tenfold amplification means that the
second-order remainder of a removal, which the linearization drops, is carried by a map an order of
magnitude larger than the identity: the estimate then says more about the linearization than about the
run, and retraining a few rows (``--verify``) should decide.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from ..methods.base import UpdateRule
from ..methods.removal import RemovalStepOps
from ..problem import InfluenceProblem
from .plan import build_plan
from .sharding import ShardContext

logger = logging.getLogger(__name__)

EXPANSIVE_GROWTH = 10.0


@dataclass
class TrustReport:
    """The trust figures of a score run (written into ``scores.json`` under ``"trust"``)."""

    growth: float  # estimate of ||M_{T-1} ... M_0||_2 (inf when it overflows a float; see log10_growth)
    log10_growth: float
    epoch_growth: list[float]  # the growth from the start to the end of each epoch (the last is ``growth``)
    probes: int
    iterations: int
    threshold: float = EXPANSIVE_GROWTH
    embedding_ratio: dict | None = field(default=None)  # median, p90, max, argmax of ||Delta^j_T|| / injected
    # "power-iteration" (tangent_growth: epoch_growth from the start to each epoch's end) or "adjoint-probes"
    # (ProbeGrowth: epoch_growth from each epoch's start to the end of the run, in epoch order).
    kind: str = "power-iteration"
    objective_growth: float | None = None  # adjoint-probes: ||P u_0|| / ||P u_T||, the objective's own growth

    @property
    def expansive(self) -> bool:
        """Whether the run amplifies what the estimate carries beyond :attr:`threshold`. The adjoint form judges
        by its objective gradient's own growth: the random probes also grow along directions that Adam's
        ``1/(sqrt(v) + eps)`` gain amplifies where the objective does not look (measured on the quickstart run:
        probes 1.3e4, the objective 3.2, and verify's Kendall tau 0.83 against a ceiling of 0.95), while on a
        run past the edge of stability both grow by hundreds (tests/engine/test_trust.py)."""
        if self.kind == "adjoint-probes" and self.objective_growth is not None:
            return not self.objective_growth <= self.threshold  # NaN or inf: expansive
        return self.log10_growth > math.log10(self.threshold)

    def to_dict(self) -> dict:
        return {**asdict(self), "expansive": self.expansive}

    def message(self) -> str:
        if self.kind == "adjoint-probes":
            text = (f"tangent growth {self.growth:.3g} over the run by {self.probes} random probes carried with the adjoint "
                    f"(an estimate from below of the largest growth; threshold {self.threshold:g}); from each epoch's "
                    "start to the end " + ", ".join(f"{g:.3g}" for g in self.epoch_growth))
            if self.objective_growth is not None:
                text += (f"; the objective gradient's own growth {self.objective_growth:.3g} (what is judged against "
                         f"the threshold {self.threshold:g})")
            return text
        text = (f"tangent growth {self.growth:.3g} over the run (threshold {self.threshold:g}); up to each epoch's end "
                + ", ".join(f"{g:.3g}" for g in self.epoch_growth))
        if self.embedding_ratio:
            text += (f"; embedding/injected norm ratio median {self.embedding_ratio['median']:.3g}, "
                     f"max {self.embedding_ratio['max']:.3g}")
        return text


def _orthonormal_rows(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``block = R^T Q`` with orthonormal rows ``Q`` (k, S) and ``R`` (k, k) upper triangular."""
    q, r = torch.linalg.qr(block.T)
    return q.T, r


def _padded(block: torch.Tensor, size: int) -> torch.Tensor:
    """Parameter blocks ``(k, P)`` as states ``(k, S)`` with zero optimizer states."""
    states = torch.zeros(len(block), size, dtype=block.dtype, device=block.device)
    states[:, : block.shape[1]] = block
    return states


def _random_probes(count: int, params: int, seed: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``min(count, params)`` orthonormal random parameter vectors (rows), the same for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    probe, _ = _orthonormal_rows(torch.randn(min(count, params), params, generator=generator, dtype=dtype).to(device))
    return probe


class ProbeGrowth:
    """The default trust figure of the adjoint form: random probes carried backward by the adjoint's own
    ``apply_adjoint`` calls (as extra rows of the adjoint's block, so each step's operator is built once).

    ``k`` orthonormal random parameter vectors (zero optimizer states) go from ``T`` back to ``0``; the
    figure is the largest singular value of their propagated parameter blocks, ``||P A^T P^T Q^T||_2``: the
    largest growth of a parameter perturbation within the probes' span, a random-probe estimate from below
    of ``||P A P^T||_2`` (the two share their singular values), not the top singular value itself. The block
    is re-orthonormalized after every step (QR, the factors kept as in :func:`tangent_growth`): no overflow.
    Its cost is ``k`` more vectors in each step's curvature product and a ``(k, S)`` QR.
    """

    def __init__(self, rule: UpdateRule, probes: int, epochs: list[int], seed: int = 0,
                 dtype: torch.dtype = torch.float64, device="cpu"):
        self.params, self.epochs = rule.param_dim, epochs
        self.states = _padded(_random_probes(probes, rule.param_dim, seed, dtype, device), rule.state_dim)
        self.count = len(self.states)
        self.product = torch.eye(self.count, dtype=dtype, device=device)
        # Tensors, not floats: no host synchronization inside the step loop.
        self.log_scale = torch.zeros((), dtype=dtype, device=device)
        self.growth_from: list[torch.Tensor] = []  # log10 growth from each epoch's start to the end, last epoch first

    def carried(self, step: int, states: torch.Tensor) -> torch.Tensor:
        """The probes after ``apply_adjoint`` of ``step`` (``states`` (k, S)), re-orthonormalized and recorded."""
        self.states, r = _orthonormal_rows(states)
        product = r @ self.product
        scale = product.abs().amax().clamp_min(torch.finfo(product.dtype).tiny)
        self.product, self.log_scale = product / scale, self.log_scale + scale.log()
        if step == 0 or self.epochs[step - 1] != self.epochs[step]:
            self.growth_from.append(self._log10_growth())
        return self.states

    def _log10_growth(self) -> torch.Tensor:
        top = torch.linalg.matrix_norm(self.product.T @ self.states[:, : self.params], ord=2)
        return top.log10() + self.log_scale / math.log(10)

    def report(self, objective_growth: float | None = None, threshold: float = EXPANSIVE_GROWTH) -> "TrustReport":
        log10_growth = float(self._log10_growth())  # over every step carried (a hybrid stops at its prefix)
        epoch_growth = [10.0**g if g < 300 else math.inf for g in (float(g) for g in reversed(self.growth_from))]
        report = TrustReport(10.0**log10_growth if log10_growth < 300 else math.inf, log10_growth, epoch_growth,
                             self.count, 0, threshold, kind="adjoint-probes", objective_growth=objective_growth)
        _log(report)
        return report


def tangent_growth(rule: UpdateRule, problem: InfluenceProblem, probes: int = 4, iterations: int = 1,
                   seed: int = 0, dtype: torch.dtype = torch.float64, device="cpu", injected: torch.Tensor | None = None,
                   progress: bool = False, shard: ShardContext | None = None) -> tuple[float, list[float]]:
    """``(log10 ||P A P^T||_2 estimate, the same growth up to the end of each epoch)``.

    ``A = M_{T-1} ... M_0`` on the whole state; ``P`` keeps its parameter block. ``iterations`` passes of
    ``(P A P^T)^T (P A P^T)`` (two sweeps over the trajectory each) precede a final forward pass, which
    measures. If ``injected`` ``(N,)`` is given, the final pass also adds each occurrence's injection norm
    (parameter block) to its row: the step operators are built there anyway. ``shard``: under several processes
    (with the rule's steps split by rows, :func:`.sharding.split_rows`) each adds its own occurrences' injections and
    the sums are all-reduced.
    """
    shard = shard or ShardContext.single()
    trajectory = problem.trajectory
    steps, size, params = trajectory.num_steps, rule.state_dim, rule.param_dim
    probe = _random_probes(probes, params, seed, dtype, device)
    bar = tqdm(total=(2 * iterations + 1) * steps, desc="trust", disable=not progress, leave=False)
    for _ in range(iterations):
        for order, move in ((range(steps), "apply"), (reversed(range(steps)), "apply_adjoint")):
            block = _padded(probe, size)
            for step in order:
                block, _ = _orthonormal_rows(getattr(rule.at_step(step), move)(block))
                bar.update()
            probe, _ = _orthonormal_rows(block[:, :params])
    plan = build_plan(trajectory, 0, problem.num_samples, device) if injected is not None else None
    block = _padded(probe, size)
    product = torch.eye(len(block), dtype=dtype, device=device)  # block_t = (R_{t-1} ... R_0)^T Q_t
    log_scale = torch.zeros((), dtype=dtype, device=device)  # a tensor: no host synchronisation per step
    growth: list[float] = []
    epochs = trajectory.epoch.tolist()
    for step in range(steps):
        ops = rule.at_step(step)
        occurrences = shard.own_occurrences(plan.steps[step]) if plan is not None else None
        if occurrences is not None and len(occurrences.samples):
            count = len(occurrences.samples)
            if isinstance(ops, RemovalStepOps):
                injection = ops.injection(occurrences.row_owner, occurrences.rows, count)
            else:
                zero = torch.zeros(count, size, dtype=dtype, device=device)
                injection = ops.occurrence(zero, occurrences.row_owner, occurrences.rows,
                                           torch.zeros(count, dtype=dtype, device=device))
            injected.index_add_(0, occurrences.samples, rule.parameter_part(injection).norm(dim=1).to(injected.dtype))
        block, r = _orthonormal_rows(ops.apply(block))
        product, scale = _rescaled(r @ product)
        log_scale += scale
        if step + 1 == steps or epochs[step + 1] != epochs[step]:
            growth.append(_log10_norm(product.T @ block[:, :params], float(log_scale)))  # once per epoch
        bar.update()
    bar.close()
    if injected is not None:
        injected.copy_(shard.all_reduce_sum(injected))
    return growth[-1], [10.0**g if g < 300 else math.inf for g in growth]


def _rescaled(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``matrix / n`` and ``log n`` (natural), ``n`` its largest entry, against overflow of long products
    (``n`` 0 or not finite: unchanged, log 0); device tensors, read by no host branch."""
    norm = matrix.abs().amax()
    usable = (norm > 0) & torch.isfinite(norm)
    safe = torch.where(usable, norm, torch.ones_like(norm))
    return matrix / safe, safe.log()


def _log10_norm(matrix: torch.Tensor, log_scale: float) -> float:
    """``log10(||matrix||_2 e^log_scale)``."""
    top = float(torch.linalg.matrix_norm(matrix, ord=2))
    return (math.log10(top) if top > 0 else -math.inf) + log_scale / math.log(10)


def trust_check(rule: UpdateRule, problem: InfluenceProblem, embeddings: torch.Tensor | None = None,
                probes: int = 4, iterations: int = 1, seed: int = 0, threshold: float = EXPANSIVE_GROWTH,
                progress: bool = False, shard: ShardContext | None = None) -> TrustReport:
    """The trust figures of a run; ``embeddings`` ``(N, P)`` (forward form) add the embedding ratios (they read
    each row's norm only: ``(N, 1)`` norms will do). ``shard``: see :func:`tangent_growth`.

    Logs a warning when the run is expansive.
    """
    dtype, device = problem.curvature.dtype, problem.curvature.device
    injected = torch.zeros(problem.num_samples, dtype=dtype, device=device) if embeddings is not None else None
    log10_growth, epoch_growth = tangent_growth(rule, problem, probes, iterations, seed, dtype, device, injected,
                                                progress, shard)
    ratio = None
    if embeddings is not None:
        occurred = injected > 0
        values = embeddings[occurred].to(dtype).norm(dim=1) / injected[occurred]
        if len(values):
            rows = occurred.nonzero().flatten()
            ratio = {"median": float(values.median()), "p90": float(torch.quantile(values, 0.9)),
                     "max": float(values.max()), "argmax": int(rows[values.argmax()])}
    growth = 10.0**log10_growth if log10_growth < 300 else math.inf
    report = TrustReport(growth, log10_growth, epoch_growth, min(probes, rule.param_dim), iterations, threshold, ratio)
    if shard is None or shard.is_main:
        _log(report)
    return report


def _log(report: TrustReport) -> None:
    if report.expansive:
        logger.warning("The run is expansive: %s. First-order estimates (every method) are unreliable where "
                       "training amplifies perturbations; check a few rows by retraining.", report.message())
    else:
        logger.info("trust: %s", report.message())
