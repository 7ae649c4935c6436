"""The seeded random projection of DVEmb (DESIGN.md section 5): ``g~ = R g`` with ``R`` (k x P) Gaussian.

Entries of ``R`` are ``N(0, 1/k)``, so ``E[R^T R] = I`` and ``(R a) . (R b)`` is an unbiased estimate of
``a . b`` (Johnson-Lindenstrauss): dot products, the only thing DVEmb takes from gradients, survive the
projection. ``R`` is a pure function of ``(P, k, seed)``: it is drawn in float64 on the CPU, in column
blocks of :data:`BLOCK` whose generator is seeded by ``(seed, block)``, so that any process, device, dtype or
later session (``attribution_matrix``) rebuilds the same matrix. It is kept whole when it fits the memory
it is given; otherwise each call regenerates it block by block (slower, logged once), never holding more
than one ``k x BLOCK`` block. ``k = 0``, or ``k >= P``, is the identity (no projection): exact dot products.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

BLOCK = 1 << 16  # columns of R drawn by one generator


class GradientProjection:
    def __init__(self, input_dim: int, output_dim: int, seed: int = 0, dtype: torch.dtype = torch.float64,
                 device="cpu", memory_gb: float = 1.0):
        if output_dim < 0:
            raise ValueError(f"projection_dim must be >= 0 (0: no projection), got {output_dim}.")
        self.input_dim, self.seed, self.dtype, self.device = input_dim, seed, dtype, device
        self.identity = output_dim == 0 or output_dim >= input_dim  # no random map can keep more than P dimensions
        self.dim = input_dim if self.identity else output_dim
        self._matrix: torch.Tensor | None = None
        if not self.identity:
            size_gb = output_dim * input_dim * torch.finfo(dtype).bits / 8 / 2**30
            if size_gb <= memory_gb:
                self._matrix = torch.cat([block for _, block in self._blocks()], dim=1)
            else:
                logger.info("projection matrix (%d x %d, %.1f GiB) exceeds %.1f GiB: regenerated in blocks at "
                            "each use", output_dim, input_dim, size_gb, memory_gb)

    def _blocks(self):
        """``(start, R[:, start:start + BLOCK])`` for every column block, drawn deterministically."""
        for start in range(0, self.input_dim, BLOCK):
            width = min(BLOCK, self.input_dim - start)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + start // BLOCK)
            block = torch.randn(self.dim, width, generator=generator, dtype=torch.float64) / self.dim**0.5
            yield start, block.to(self.device, self.dtype)

    def matrix(self) -> torch.Tensor:
        """``R`` itself, (k, P), in the projection's dtype and device (the identity when there is no projection)."""
        if self.identity:
            return torch.eye(self.input_dim, dtype=self.dtype, device=self.device)
        if self._matrix is not None:
            return self._matrix
        return torch.cat([block for _, block in self._blocks()], dim=1)

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """``R v`` for each row of ``vectors`` (..., P) -> (..., k)."""
        if self.identity:
            return vectors
        if self._matrix is not None:
            return vectors @ self._matrix.to(vectors.dtype).T
        result = torch.zeros(*vectors.shape[:-1], self.dim, dtype=vectors.dtype, device=vectors.device)
        for start, block in self._blocks():
            result += vectors[..., start : start + block.shape[1]] @ block.to(vectors.dtype).T
        return result


def projection_fingerprint(projection: GradientProjection) -> dict:
    """What identifies a projection (saved in scores.json): its width and its image of a fixed probe."""
    probe = torch.linspace(-1, 1, projection.input_dim, dtype=torch.float64)
    image = projection(probe.to(projection.device, projection.dtype)).double().cpu()
    return {"dim": projection.dim, "identity": projection.identity, "probe": [float(x) for x in image[:4]]}


def same_projection(rebuilt: dict, saved: dict) -> bool:
    """Whether two fingerprints name the same projection (up to float rounding)."""
    return rebuilt["dim"] == saved["dim"] and rebuilt["identity"] == saved["identity"] and \
        torch.allclose(torch.tensor(rebuilt["probe"]), torch.tensor(saved["probe"]), rtol=1e-4, atol=1e-6)


class BasisProjection:
    """``g~ = Q g`` for a given (k, P) matrix ``Q`` with orthonormal rows (e.g. the leading right singular
    vectors of the training rows' gradients at the final parameters): the same interface as
    :class:`GradientProjection`, for a subspace chosen from the data instead of at random. Dot products are
    exact for vectors in the span of ``Q`` and lose only their components outside it."""

    identity = False

    def __init__(self, basis: torch.Tensor):
        self.basis = basis
        self.dim, self.input_dim = basis.shape
        self.dtype, self.device = basis.dtype, basis.device

    def matrix(self) -> torch.Tensor:
        return self.basis

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors @ self.basis.to(vectors.dtype).T
