"""Per-class sufficient statistics (count, mean, scatter M2), streamed from feature chunks.

What a run stores is the sufficient statistics, without any ridge: the ridge of
docs/methods/slca.md (`stats.ridge`) is added where a covariance is used (alignment), and
heads with their own shrinkage (LDA, FeCAM) read the raw statistics. So editing
`stats.ridge` never makes `fit-stats` run again.

The reduction is written against a small interface:

- `ClassMoments`: a mergeable partial result for C classes: count (C,),
  mean (C, d) and M2 (C, d, d), the scatter about the mean, all float64.
  `merge` is the pairwise update of Chan, Golub and LeVeque, exact for any
  split of the rows into chunks or processes, and M2 is exactly symmetric
  (see `moments_from_scatter`); `covariance` gives the unbiased
  (n - 1) covariance plus `ridge * I`, as the reference code's fp64 `torch.cov`.
- `MomentAccumulator`: `update(x, labels)` per chunk, `result()` at the end.
  `ScatterAccumulator` implements it on `clpt_kernels.class_moments.class_scatter`:
  the fused Triton kernel for CUDA tensors, BLAS for CPU tensors.

Each chunk is reduced about a per-class shift (the class's first row in the
chunk), not as raw sums of squares, so large feature means do not cancel.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from clpt_kernels.class_moments import class_scatter

log = logging.getLogger("clpt")


@dataclass
class ClassMoments:
    count: torch.Tensor  # (C,) float64
    mean: torch.Tensor  # (C, d) float64
    m2: torch.Tensor  # (C, d, d) float64, sum of (x - mean)(x - mean)^T

    @classmethod
    def zeros(cls, n_classes: int, dim: int, device: torch.device | str = "cpu") -> ClassMoments:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        return cls(zeros(n_classes), zeros(n_classes, dim), zeros(n_classes, dim, dim))

    def merge(self, other: ClassMoments) -> ClassMoments:
        """Chan et al.: combine two partial results over disjoint rows."""
        na, nb = self.count, other.count
        n = na + nb
        safe = torch.where(n > 0, n, torch.ones_like(n))
        delta = other.mean - self.mean  # (C, d)
        mean = self.mean + delta * (nb / safe)[:, None]
        coef = (na * nb / safe)[:, None, None]
        # coef * (d_i d_j), not (coef d_i) d_j: each term stays exactly symmetric, so M2 does
        m2 = self.m2 + other.m2 + coef * (delta[:, :, None] * delta[:, None, :])
        return ClassMoments(n, mean, m2)

    def covariance(self, ridge: float = 0.0) -> torch.Tensor:
        """(C, d, d) unbiased covariance + ridge * I. Classes with < 2 rows get ridge * I alone."""
        return covariance(self.count, self.m2, ridge)

    def merge_rows(self, rows: torch.Tensor, other: ClassMoments) -> None:
        """In place: merge `other` (moments of classes `rows`, in that order) into those rows only."""
        mine = ClassMoments(self.count[rows], self.mean[rows], self.m2[rows])
        merged = mine.merge(other)
        self.count[rows], self.mean[rows], self.m2[rows] = merged.count, merged.mean, merged.m2


def covariance(count: torch.Tensor, m2: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """(C, d, d) unbiased covariance M2 / (n - 1) + ridge * I; classes with < 2 rows get ridge * I alone."""
    count = count.to(m2.dtype)
    denom = (count - 1).clamp(min=1)[:, None, None]
    cov = torch.where((count >= 2)[:, None, None], m2 / denom, torch.zeros_like(m2))
    if ridge:
        cov = cov + ridge * torch.eye(m2.shape[-1], dtype=m2.dtype, device=m2.device)
    return cov


class MomentAccumulator(Protocol):
    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Add rows x (n, d) with class indices `labels` (n,) in [0, C)."""

    def result(self) -> ClassMoments: ...


def moments_from_scatter(count, shift, total, scatter) -> ClassMoments:
    """ClassMoments (float64) from shifted sums: mean = k + s/n, M2 = S - s s^T / n.

    The kernels' scatter matrices are symmetric only to rounding (a GEMM or
    `tl.dot` sums (p, q) and (q, p) in orders of its own, and on a GPU the
    pieces of a long class are reduced with atomic adds in no fixed order).
    This is the one place where every kernel result enters the statistics, so
    it is symmetrized here, once, exactly: (S + S^T) / 2 in float64. Every later
    operation (`merge`, `covariance`) keeps exact symmetry, so every stored M2
    and covariance is exactly symmetric on every machine.
    """
    n = count.to(torch.float64)
    safe = n.clamp(min=1)
    s = total.to(torch.float64)
    mean = torch.where((n > 0)[:, None], shift.to(torch.float64) + s / safe[:, None], torch.zeros_like(s))
    sc = scatter.to(torch.float64)
    sc = (sc + sc.transpose(1, 2)) * 0.5  # a + b == b + a exactly: symmetric whatever the kernel's order
    m2 = sc - s[:, :, None] * s[:, None, :] / safe[:, None, None]
    return ClassMoments(n, mean, m2)


def chunk_moments(
    x: torch.Tensor, labels: torch.Tensor, n_classes: int, backend: str | None = None, precision: str = "ieee"
) -> ClassMoments:
    """Moments of one chunk through the class-segmented kernel (`clpt_kernels.class_moments`)."""
    return moments_from_scatter(*class_scatter(x, labels, n_classes, backend=backend, precision=precision))


class ScatterAccumulator:
    """Streaming accumulation behind `class_scatter` (Triton on CUDA, BLAS on CPU).

    Each chunk is reduced for the classes present in it only (labels compacted
    first), then merged into just those classes' rows with Chan's update: no
    read-modify-write of every class's d x d accumulator per chunk.
    """

    def __init__(
        self,
        n_classes: int,
        dim: int,
        device: torch.device | str = "cpu",
        backend: str | None = None,
        precision: str = "ieee",
    ):
        self.n_classes, self.dim, self.backend, self.precision = n_classes, dim, backend, precision
        self._acc = ClassMoments.zeros(n_classes, dim, device)

    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.dim or labels.shape != (x.shape[0],):
            raise ValueError(
                f"expected x (n, {self.dim}) and labels (n,), got {tuple(x.shape)} and {tuple(labels.shape)}"
            )
        if len(labels) == 0:
            return
        if int(labels.min()) < 0 or int(labels.max()) >= self.n_classes:
            raise ValueError(f"labels must lie in [0, {self.n_classes})")
        device = self._acc.mean.device
        present, compact = torch.unique(labels.to(device), return_inverse=True)
        part = chunk_moments(x.to(device), compact, len(present), self.backend, self.precision)
        self._acc.merge_rows(present, part)

    def result(self) -> ClassMoments:
        return self._acc


def make_accumulator(
    n_classes: int,
    dim: int,
    device: torch.device | str = "cpu",
    backend: str | None = None,
    precision: str = "ieee",
) -> MomentAccumulator:
    """The accumulator for a device (`backend` or CLPT_KERNEL_BACKEND forces torch or triton)."""
    return ScatterAccumulator(n_classes, dim, device, backend, precision)


def fit_class_stats(
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor]],
    classes: range,
    dim: int,
    device: torch.device | str = "cpu",
    precision: str = "ieee",
) -> ClassMoments:
    """Stream (features (n, d), labels (n,)) chunks; the moments (count, mean, M2) of `classes`.

    `precision`: the Triton kernel's products on a GPU (stats.kernel_precision); exact by default.
    """
    acc = make_accumulator(len(classes), dim, device, precision=precision)
    for x, y in chunks:
        acc.update(x, y - classes.start)
    return acc.result()
