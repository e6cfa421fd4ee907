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
  `ScatterAccumulator` implements it on `clpt_kernels.class_moments`: the fused
  Triton kernel for CUDA tensors; for CPU tensors one BLAS GEMM per class, each
  reduced into its class's float64 row at once (`class_pieces_torch`).

Each chunk is reduced about a per-class shift (the class's first row in the
chunk), not as raw sums of squares, so large feature means do not cancel.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from clpt import distributed as dist
from clpt_kernels.class_moments import choose_backend, class_pieces_torch, class_scatter

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
        out = ClassMoments(self.count.clone(), self.mean.clone(), self.m2.clone())
        merge_into(out.count, out.mean, out.m2, other.count, other.mean, other.m2, torch.empty_like(out.m2))
        return out

    def covariance(self, ridge: float = 0.0) -> torch.Tensor:
        """(C, d, d) unbiased covariance + ridge * I. Classes with < 2 rows get ridge * I alone."""
        return covariance(self.count, self.m2, ridge)

    def merge_rows(self, rows: torch.Tensor, other: ClassMoments) -> None:
        """In place: merge `other` (moments of classes `rows`, in that order) into those rows only."""
        seen = self.count[rows] > 0
        if not bool(seen.all()):  # a class with nothing there yet: Chan's update would return `other`'s exactly
            fresh = ~seen
            self.count[rows[fresh]], self.mean[rows[fresh]] = other.count[fresh], other.mean[fresh]
            self.m2[rows[fresh]] = other.m2[fresh]
            if not bool(seen.any()):
                return
            rows, other = rows[seen], ClassMoments(other.count[seen], other.mean[seen], other.m2[seen])
        mine = ClassMoments(self.count[rows], self.mean[rows], self.m2[rows])
        merged = mine.merge(other)
        self.count[rows], self.mean[rows], self.m2[rows] = merged.count, merged.mean, merged.m2


def merge_into(count, mean, m2, nb, mean_b, m2_b, buf) -> None:
    """In place, Chan et al.: the moments (count (b,), mean (b, d), m2 (b, d, d)) of a block of classes
    merged with a partial result over disjoint rows (nb, mean_b, m2_b); `buf` (b, d, d) is scratch. The one
    place the update is written: `ClassMoments.merge` and the CPU accumulator's in-place step use it."""
    n = count + nb
    safe = torch.where(n > 0, n, torch.ones_like(n))
    delta = mean_b - mean  # (b, d)
    coef = (count * nb / safe)[:, None, None]
    mean.add_(delta * (nb / safe)[:, None])
    # coef * (d_i d_j), not (coef d_i) d_j: each term stays exactly symmetric, so M2 does
    m2.add_(m2_b).add_(torch.mul(delta[:, :, None], delta[:, None, :], out=buf).mul_(coef))
    count.copy_(n)


def covariance(
    count: torch.Tensor, m2: torch.Tensor, ridge: float = 0.0, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(C, d, d) unbiased covariance M2 / (n - 1) + ridge * I; classes with < 2 rows get ridge * I alone.
    Written into `out` (as m2) when given."""
    count = count.to(m2.dtype)
    denom = (count - 1).clamp(min=1)[:, None, None]
    cov = torch.div(m2, denom, out=out) if out is not None else m2 / denom
    cov[count < 2] = 0  # in place: one pass over (C, d, d), not three
    if ridge:
        torch.diagonal(cov, dim1=1, dim2=2).add_(ridge)  # + ridge * I, on the diagonal alone
    return cov


class MomentAccumulator(Protocol):
    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Add rows x (n, d) with class indices `labels` (n,) in [0, C)."""

    def result(self) -> ClassMoments: ...


def class_blocks(n_classes: int, device: torch.device) -> list[slice]:
    """The classes in the steps of a per-class computation on (C, d, d) arrays: one class a step on a
    CPU, so each step works on a cache-sized (d, d) block (no array-sized temporaries to allocate and
    fault in), all at once on a GPU (one launch per step). Every entry gets the same operations either
    way, and a class's result depends on its own inputs only."""
    step = 1 if device.type == "cpu" else max(n_classes, 1)
    return [slice(i, i + step) for i in range(0, n_classes, step)]


def _m2_into(out: torch.Tensor, scatter: torch.Tensor, s: torch.Tensor, n: torch.Tensor, buf: torch.Tensor) -> None:
    """out (b, d, d) float64 <- ((S + S^T) / 2) - s s^T / n for a block of b classes (scatter S (b, d, d),
    shifted sums s (b, d) float64, counts n (b,) >= 1), with `buf` (b, d, d) float64 as scratch: the same
    float64 operations on every entry, in any block."""
    out.copy_(scatter)
    buf.copy_(scatter.transpose(1, 2))
    out.add_(buf).mul_(0.5)  # a + b == b + a
    torch.mul(s[:, :, None], s[:, None, :], out=buf)
    out.sub_(buf.div_(n[:, None, None]))


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
    m2 = torch.empty(scatter.shape, dtype=torch.float64, device=scatter.device)
    # class by class on a CPU (twice as fast at d = 768), reusing one buffer
    blocks = class_blocks(len(m2), m2.device)
    buf = torch.empty((len(m2[blocks[0]]) if blocks else 0, *m2.shape[1:]), dtype=torch.float64, device=m2.device)
    for k in blocks:
        _m2_into(m2[k], scatter[k], s[k], safe[k], buf[: len(m2[k])])
    return ClassMoments(n, mean, m2)


def chunk_moments(
    x: torch.Tensor, labels: torch.Tensor, n_classes: int, backend: str | None = None, precision: str = "ieee"
) -> ClassMoments:
    """Moments of one chunk through the class-segmented kernel (`clpt_kernels.class_moments`)."""
    return moments_from_scatter(*class_scatter(x, labels, n_classes, backend=backend, precision=precision))


class ScatterAccumulator:
    """Streaming accumulation behind `class_scatter` (Triton on CUDA, BLAS on CPU).

    On a GPU each chunk is reduced for the classes present in it only (labels
    compacted first), then merged into just those classes' rows with Chan's
    update: no read-modify-write of every class's d x d accumulator per chunk.
    On a CPU each class's piece of a chunk (`class_pieces_torch`: one GEMM into
    a reused workspace) goes straight into its row: the first piece of a class is
    written there, a later one merged in place. No (classes, d, d) temporary is
    made, so a chunk costs its GEMMs and one pass over its classes' rows; the
    float64 arithmetic is that of `moments_from_scatter` and `ClassMoments.merge`.
    """

    def __init__(
        self,
        n_classes: int,
        dim: int,
        device: torch.device | str = "cpu",
        backend: str | None = None,
        precision: str = "ieee",
        m2_out: torch.Tensor | None = None,
    ):
        self.n_classes, self.dim, self.backend, self.precision = n_classes, dim, backend, precision
        self.device = torch.device(device)
        self.m2_out = m2_out  # the CPU path's M2 rows, when given (a caller's reused float64 array)
        self._acc: ClassMoments | None = None  # allocated by the first chunk (taken whole when it has every class)

    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.dim or labels.shape != (x.shape[0],):
            raise ValueError(
                f"expected x (n, {self.dim}) and labels (n,), got {tuple(x.shape)} and {tuple(labels.shape)}"
            )
        if len(labels) == 0:
            return
        if int(labels.min()) < 0 or int(labels.max()) >= self.n_classes:
            raise ValueError(f"labels must lie in [0, {self.n_classes})")
        x, labels = x.to(self.device), labels.to(self.device)
        if choose_backend(self.device, self.backend) == "torch":
            self._update_by_class(x, labels)
            return
        present, compact = torch.unique(labels, return_inverse=True)
        part = chunk_moments(x, compact, len(present), self.backend, self.precision)
        if self._acc is None and len(present) == self.n_classes:  # present is 0..C-1: merging into zeros copies
            self._acc = part
            return
        self.result().merge_rows(present, part)

    def _update_by_class(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        if self._acc is None:  # rows of classes not seen yet are left unwritten; result() zeroes them
            c, d, f64 = self.n_classes, self.dim, torch.float64
            self._acc = ClassMoments(torch.zeros(c, dtype=f64, device=self.device),
                                     torch.zeros(c, d, dtype=f64, device=self.device),
                                     torch.empty(c, d, d, dtype=f64, device=self.device)
                                     if self.m2_out is None else self.m2_out)  # fmt: skip
        acc, d = self._acc, self.dim
        piece = torch.empty(1, d, d, dtype=torch.float64, device=self.device)
        buf = torch.empty_like(piece)
        for c, k, shift, total, scatter in class_pieces_torch(x, labels, self.n_classes):
            nb = torch.full((1,), float(k), dtype=torch.float64, device=self.device)
            s = total.to(torch.float64)[None]
            mean = (shift.to(torch.float64) + s[0] / nb)[None]
            row = slice(c, c + 1)
            if not bool(acc.count[c]):  # the class's first rows: its moments are written in place
                _m2_into(acc.m2[row], scatter[None], s, nb, buf)
                acc.count[row], acc.mean[row] = nb, mean
                continue
            _m2_into(piece, scatter[None], s, nb, buf)
            merge_into(acc.count[row], acc.mean[row], acc.m2[row], nb, mean, piece, buf)

    def result(self) -> ClassMoments:
        if self._acc is None:
            self._acc = ClassMoments.zeros(self.n_classes, self.dim, self.device)
            return self._acc
        unseen = self._acc.count == 0  # rows the CPU path has not written
        if bool(unseen.any()):
            self._acc.m2[unseen] = 0
        return self._acc


def make_accumulator(
    n_classes: int,
    dim: int,
    device: torch.device | str = "cpu",
    backend: str | None = None,
    precision: str = "ieee",
    m2_out: torch.Tensor | None = None,
) -> MomentAccumulator:
    """The accumulator for a device (`backend` or CLPT_KERNEL_BACKEND forces torch or triton); `m2_out`
    (n_classes, dim, dim) float64 on the device: where the CPU path writes M2 (the result's `m2` is it)."""
    return ScatterAccumulator(n_classes, dim, device, backend, precision, m2_out)


def merge_ranks(m: ClassMoments) -> ClassMoments:
    """Every rank's moments of its own rows, merged in rank order with Chan's update (exact: sums and
    the pairwise correction, never an average of means); the same result on every rank. One process:
    `m` itself."""
    if dist.world_size() == 1:
        return m
    parts = zip(*(dist.all_gather(v) for v in (m.count, m.mean, m.m2)), strict=True)
    merged = None
    for count, mean, m2 in parts:
        part = ClassMoments(count, mean, m2)
        merged = part if merged is None else merged.merge(part)
    assert merged is not None
    return merged


def fit_class_stats(
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor]],
    classes: range,
    dim: int,
    device: torch.device | str = "cpu",
    precision: str = "ieee",
    m2_out: torch.Tensor | None = None,
) -> ClassMoments:
    """Stream (features (n, d), labels (n,)) chunks; the moments (count, mean, M2) of `classes`.

    `precision`: the Triton kernel's products on a GPU (stats.kernel_precision); exact by default.
    `m2_out`: a (len(classes), d, d) float64 array the CPU path writes M2 into, so that a caller fitting
    one set of classes after another reuses one array instead of faulting in a fresh one each time.
    """
    acc = make_accumulator(len(classes), dim, device, precision=precision, m2_out=m2_out)
    for x, y in chunks:
        acc.update(x, y - classes.start)
    return acc.result()


# --- compact forms of the per-class scatter (stats.covariance) ----------------------------------

COVARIANCE_FORMS = ("full", "diagonal", "lowrank")


@dataclass
class Scatter:
    """The scatter M2 of C classes (d features) in one of three forms, float64 (`stats.covariance`):

    - `full`: m2 (C, d, d), exactly as accumulated;
    - `diagonal`: diag (C, d), its diagonal;
    - `lowrank`: basis U (C, d, r) with orthonormal columns, eigval (C, r) and resid (C,):
      M2 ~ U diag(eigval) U^T + resid (I - U U^T), the r largest eigenpairs and, on the rest of the
      space, the mean of the other d - r eigenvalues (so the trace is kept); at d = 768 and r = 16,
      0.1 MB per class instead of 4.7 MB.

    What every form keeps exactly besides the means: each task's pooled scatter sum_c M2_c (`pooled`
    in `ClassStats`), so LDA and any shared-covariance use are exact in every form.
    """

    form: str
    m2: torch.Tensor | None = None
    diag: torch.Tensor | None = None
    basis: torch.Tensor | None = None
    eigval: torch.Tensor | None = None
    resid: torch.Tensor | None = None

    KEYS = {"full": ("m2",), "diagonal": ("diag",), "lowrank": ("basis", "eigval", "resid")}

    def arrays(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.KEYS[self.form]}

    @classmethod
    def of(cls, form: str, arrays: dict) -> Scatter:
        return cls(form, **{k: torch.as_tensor(arrays[k]).to(torch.float64) for k in cls.KEYS[form]})

    def __len__(self) -> int:
        return len(next(iter(self.arrays().values())))

    def select(self, rows) -> Scatter:
        return Scatter(self.form, **{k: v[rows] for k, v in self.arrays().items()})

    @staticmethod
    def cat(parts: list[Scatter]) -> Scatter:
        forms = {p.form for p in parts}
        if len(forms) != 1:
            raise ValueError(f"statistics in several covariance forms: {sorted(forms)}")
        form = forms.pop()
        return Scatter(form, **{k: torch.cat([getattr(p, k) for p in parts]) for k in Scatter.KEYS[form]})

    def diagonal(self) -> torch.Tensor:
        """(C, d): the diagonal of M2 (of its approximation, for lowrank)."""
        if self.form == "full":
            assert self.m2 is not None
            return torch.diagonal(self.m2, dim1=1, dim2=2)
        if self.form == "diagonal":
            assert self.diag is not None
            return self.diag
        assert self.basis is not None and self.eigval is not None and self.resid is not None
        u2 = self.basis**2  # (C, d, r)
        return self.resid[:, None] + (u2 * (self.eigval - self.resid[:, None])[:, None, :]).sum(2)

    def full(self) -> torch.Tensor:
        """(C, d, d): M2 in full (its approximation for the compact forms; for tests and small C)."""
        if self.form == "full":
            assert self.m2 is not None
            return self.m2
        if self.form == "diagonal":
            return torch.diag_embed(self.diagonal())
        assert self.basis is not None and self.eigval is not None and self.resid is not None
        d = self.basis.shape[1]
        eye = torch.eye(d, dtype=self.basis.dtype, device=self.basis.device)
        low = self.basis @ torch.diag_embed(self.eigval - self.resid[:, None]) @ self.basis.transpose(1, 2)
        return low + self.resid[:, None, None] * eye

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.arrays().values())


def top_eigen(m2: torch.Tensor, rank: int, iters: int = 4, oversample: int = 10, seed: int = 0):
    """The `rank` largest eigenpairs (descending) of each symmetric PSD (C, d, d) matrix, float64:
    randomized subspace iteration (Halko et al. 2011) with a seeded start, then the exact eigenpairs of
    the projected (k, k) matrix. O(C d^2 k) instead of an O(C d^3) eigendecomposition; exact where
    rank + oversample >= d."""
    c, d, _ = m2.shape
    k = min(d, rank + oversample)
    if k == d:
        e, v = torch.linalg.eigh(m2)
    else:
        g = torch.Generator().manual_seed(seed)
        q = torch.linalg.qr(m2 @ torch.randn(d, k, generator=g, dtype=m2.dtype).to(m2.device)).Q
        for _ in range(iters):
            q = torch.linalg.qr(m2 @ q).Q
        e, w = torch.linalg.eigh(q.transpose(1, 2) @ m2 @ q)  # (C, k), (C, k, k)
        v = q @ w
    return e.flip(-1)[:, :rank].clamp(min=0), v.flip(-1)[:, :, :rank]


def compress(m2: torch.Tensor, form: str, rank: int = 16, classes_per_step: int = 256) -> Scatter:
    """The scatter (C, d, d) in `form` (a few classes at a time, so the eigen work's temporaries stay small)."""
    if form == "full":
        return Scatter("full", m2=m2)
    if form == "diagonal":
        return Scatter("diagonal", diag=torch.diagonal(m2, dim1=1, dim2=2).clone())
    if form != "lowrank":
        raise ValueError(f"unknown covariance form {form!r}: one of {', '.join(COVARIANCE_FORMS)}")
    d = m2.shape[-1]
    r = min(rank, d)
    parts = []
    for s in range(0, len(m2), classes_per_step):
        block = m2[s : s + classes_per_step]
        e, v = top_eigen(block, r)
        trace = torch.diagonal(block, dim1=1, dim2=2).sum(1)
        resid = ((trace - e.sum(1)) / max(d - r, 1)).clamp(min=0) if d > r else torch.zeros_like(trace)
        parts.append(Scatter("lowrank", basis=v.contiguous(), eigval=e, resid=resid))
    return Scatter.cat(parts)
