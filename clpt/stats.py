"""Stage 2: per-class Gaussians (count, mean, covariance + ridge), streamed from the feature store.

The reduction is written against a small interface:

- `ClassMoments`: a mergeable partial result for C classes: count (C,),
  mean (C, d) and M2 (C, d, d), the scatter about the mean, all float64.
  `merge` is the pairwise update of Chan, Golub and LeVeque, exact for any
  split of the rows into chunks or processes; `covariance` gives the unbiased
  (n - 1) covariance plus `ridge * I`, as the reference code's fp64 `torch.cov`.
- `MomentAccumulator`: `update(x, labels)` per chunk, `result()` at the end.
  `TorchAccumulator` is the BLAS implementation; the fused Triton kernel plugs
  in behind the same interface (`make_accumulator`).

Accumulating M2 about per-chunk class means (rather than raw sums of squares)
keeps the result accurate when features have large means.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import zarr

log = logging.getLogger("clpt")


@dataclass
class ClassMoments:
    count: torch.Tensor  # (C,) float64
    mean: torch.Tensor  # (C, d) float64
    m2: torch.Tensor  # (C, d, d) float64, sum of (x - mean)(x - mean)^T

    @classmethod
    def zeros(cls, n_classes: int, dim: int, device: torch.device | str = "cpu") -> ClassMoments:
        f64 = dict(dtype=torch.float64, device=device)
        return cls(
            torch.zeros(n_classes, **f64),
            torch.zeros(n_classes, dim, **f64),
            torch.zeros(n_classes, dim, dim, **f64),
        )

    def merge(self, other: ClassMoments) -> ClassMoments:
        """Chan et al.: combine two partial results over disjoint rows."""
        na, nb = self.count, other.count
        n = na + nb
        safe = torch.where(n > 0, n, torch.ones_like(n))
        delta = other.mean - self.mean  # (C, d)
        mean = self.mean + delta * (nb / safe)[:, None]
        coef = (na * nb / safe)[:, None, None]
        m2 = self.m2 + other.m2 + coef * delta[:, :, None] * delta[:, None, :]
        return ClassMoments(n, mean, m2)

    def covariance(self, ridge: float = 0.0) -> torch.Tensor:
        """(C, d, d) unbiased covariance + ridge * I. Classes with < 2 rows get ridge * I alone."""
        denom = (self.count - 1).clamp(min=1)[:, None, None]
        cov = torch.where((self.count >= 2)[:, None, None], self.m2 / denom, torch.zeros_like(self.m2))
        eye = torch.eye(self.m2.shape[-1], dtype=cov.dtype, device=cov.device)
        return cov + ridge * eye


class MomentAccumulator(Protocol):
    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Add rows x (n, d) with class indices `labels` (n,) in [0, C)."""

    def result(self) -> ClassMoments: ...


def chunk_moments(x: torch.Tensor, labels: torch.Tensor, n_classes: int) -> ClassMoments:
    """Exact moments of one chunk: group rows by class, centre each group on its mean, one GEMM per class."""
    x = x.to(torch.float64)
    d = x.shape[1]
    out = ClassMoments.zeros(n_classes, d, x.device)
    order = torch.argsort(labels, stable=True)
    xs, ls = x[order], labels[order]
    present, counts = torch.unique_consecutive(ls, return_counts=True)
    start = 0
    for c, k in zip(present.tolist(), counts.tolist(), strict=True):
        rows = xs[start : start + k]  # (k, d)
        mu = rows.mean(0)
        centred = rows - mu
        out.count[c] = k
        out.mean[c] = mu
        out.m2[c] = centred.T @ centred
        start += k
    return out


class TorchAccumulator:
    """Streaming accumulation with torch (BLAS on the CPU): per-chunk exact moments, Chan merges."""

    def __init__(self, n_classes: int, dim: int, device: torch.device | str = "cpu"):
        self.n_classes, self.dim = n_classes, dim
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
        self._acc = self._acc.merge(
            chunk_moments(x.to(self._acc.mean.device), labels.to(self._acc.mean.device), self.n_classes)
        )

    def result(self) -> ClassMoments:
        return self._acc


def make_accumulator(n_classes: int, dim: int, device: torch.device | str = "cpu") -> MomentAccumulator:
    """The accumulator for a device: torch (BLAS) here."""
    return TorchAccumulator(n_classes, dim, device)


# --- the stage -----------------------------------------------------------------


def fit_class_stats(
    feats: zarr.Array,
    labels: zarr.Array,
    classes: range,
    ridge: float,
    chunk_rows: int,
    device: torch.device | str = "cpu",
) -> tuple[ClassMoments, torch.Tensor]:
    """Stream a feature store in chunks; moments and covariances (C, d, d) of `classes`."""
    n, d = feats.shape
    acc = make_accumulator(len(classes), d, device)
    for start in range(0, n, chunk_rows):
        x = torch.from_numpy(np.asarray(feats[start : start + chunk_rows]))
        y = torch.from_numpy(np.asarray(labels[start : start + chunk_rows])) - classes.start
        acc.update(x, y)
    moments = acc.result()
    return moments, moments.covariance(ridge)


def save_stats(
    store: Path, t: int, classes: range, moments: ClassMoments, cov: torch.Tensor, ridge: float, source: str
) -> Path:
    root = zarr.open_group(store, mode="a")
    name = f"task_{t:03d}"
    g = root.require_group(name)
    c, d = moments.mean.shape
    for key, value in (
        ("classes", np.arange(classes.start, classes.stop, dtype=np.int64)),
        ("count", moments.count.cpu().numpy().astype(np.int64)),
        ("mean", moments.mean.cpu().numpy()),
        ("cov", cov.cpu().numpy()),
    ):
        arr = g.create_array(
            key,
            shape=value.shape,
            dtype=value.dtype,
            overwrite=True,
            chunks=(1, d, d) if key == "cov" else value.shape,
        )
        arr[...] = value
    g.attrs.update({"ridge": ridge, "source": source, "covariance": "unbiased (n-1) + ridge * I, float64"})
    return store / name


def load_stats(store: Path, t: int) -> dict[str, np.ndarray]:
    g = zarr.open_group(store, mode="r")[f"task_{t:03d}"]
    return {k: np.asarray(g[k][...]) for k in ("classes", "count", "mean", "cov")}


def stats_stage(run, t: int, resume: bool = True) -> tuple[list[Path], dict]:
    from clpt import distributed as dist
    from clpt.features import open_features

    cfg = run.cfg
    start, stop = run.info.tasks[t]
    classes = range(start, stop)
    out = run.stats_path / f"task_{t:03d}"
    if not dist.is_main():  # one rank reduces; the feature store is on shared disk
        return [out], {}
    feats, labels = open_features(run, t, "train")
    moments, cov = fit_class_stats(feats, labels, classes, cfg.stats.ridge, cfg.stats.chunk_rows)
    counts = moments.count.to(torch.int64).tolist()
    few = [classes.start + i for i, k in enumerate(counts) if k < 2]
    if few:
        log.warning("task %d: classes %s have fewer than 2 training rows: covariance is ridge * I", t, few)
    save_stats(run.stats_path, t, classes, moments, cov, cfg.stats.ridge, run.marker("extract", t)["id"])
    return [out], {"classes": len(classes), "rows": int(sum(counts)), "min_count": int(min(counts))}
