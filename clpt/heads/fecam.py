"""`fecam`: FeCAM's per-class Mahalanobis distance (docs/methods/heads.md, fecam; Goswami et al. 2023).

Pre-trained ViT variant (their `FeCAM_vit_*` scripts), the default:
- features L2-normalised; mu_c and S_c = unbiased covariance of the normalised
  features of class c (streamed from the feature cache through the same
  class-moment accumulator as `fit-stats`; features of task i come from task
  i's backbone, so old classes keep the statistics they were fitted with);
- shrinkage once: S + a1 mean(diag S) I + a2 mean(non-zero off-diagonal S) (1 - I),
  (a1, a2) = (1, 0) by default, (10, 10) in the ImageNet-R preset;
- correlation normalisation S~_ij = S'_ij / sqrt(S'_ii S'_jj);
- d_c(x) = (x^ - mu_c)^T pinv(S~_c) (x^ - mu_c), x^ = L2-normalised f(x); predict argmin.

`tukey: true` applies the power transform x^0.5 (sign-preserving:
sign(x) |x|^0.5, since ViT features are not non-negative) before normalising.
It borrows the transform of their ResNet path and nothing else: that path
transforms unnormalised (non-negative) features, from task 1 on, and shrinks
twice; this option is not that path.

In a run the fit is incremental: task T keeps task T-1's saved state (an old
class's features never change) and fits only task T's classes, bit-identical to
a fit from scratch; a compensated `fecam+drift` refits every task.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clpt.config import checks
from clpt.heads.base import HeadCache, HeadSpec, HeadState, extracts_upto, register_head
from clpt.stats import covariance, fit_class_stats


@dataclass
class FeCAMConfig:
    shrink1: float = 1.0  # a1: times mean(diag S) on the diagonal
    shrink2: float = 0.0  # a2: times mean of the non-zero off-diagonal entries, off the diagonal
    normalize: bool = True  # L2-normalise features (the ViT path)
    tukey: bool = False  # sign(x) |x|^0.5 before normalising (the transform of their ResNet path only)

    def problems(self) -> list[str]:
        return checks(self, [(k, lambda v: v >= 0, "must be >= 0") for k in ("shrink1", "shrink2")])


def transform(x: torch.Tensor, settings: FeCAMConfig) -> torch.Tensor:
    x = x.float()
    if settings.tukey:
        x = torch.sign(x) * x.abs().sqrt()
    if settings.normalize:
        x = F.normalize(x, dim=1)
    return x


def shrink(cov: torch.Tensor, a1: float, a2: float) -> torch.Tensor:
    """(C, d, d): S + a1 mean(diag S) I + a2 mean(non-zero off-diag S) (1 - I), per class."""
    d = cov.shape[-1]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    diag_mean = torch.diagonal(cov, dim1=1, dim2=2).mean(1)  # (C,)
    off = cov * (1 - eye)
    nonzero = (off != 0).sum((1, 2)).clamp(min=1)
    off_mean = off.sum((1, 2)) / nonzero  # (C,)
    return cov + a1 * diag_mean[:, None, None] * eye + a2 * off_mean[:, None, None] * (1 - eye)


def correlation(cov: torch.Tensor) -> torch.Tensor:
    sd = torch.diagonal(cov, dim1=1, dim2=2).clamp(min=1e-300).sqrt()  # (C, d); a 1-row class has S = 0
    return cov / (sd[:, :, None] * sd[:, None, :])


def fecam_parameters(means: torch.Tensor, covs: torch.Tensor, settings: FeCAMConfig):
    """(mu (C, d), P (C, d, d)) float64: P = pinv of the shrunk, correlation-normalised covariances."""
    s = correlation(shrink(covs, settings.shrink1, settings.shrink2))
    return means, torch.linalg.pinv(s, hermitian=True)


def mahalanobis(x: torch.Tensor, mu: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    """(N, C) squared distances (x - mu_c)^T P_c (x - mu_c), one class at a time (no N-sized
    allocation, so `torch.export` keeps the batch dimension dynamic)."""
    cols = []
    for c in range(len(mu)):
        diff = x - mu[c]  # (N, d)
        cols.append(((diff @ prec[c]) * diff).sum(1))
    return torch.stack(cols, dim=1)


class FeCAMScores(HeadState):
    """-(x^ - mu_c)^T P_c (x^ - mu_c): means (C, d) and precisions (C, d, d), float32; the transform's switches."""

    score = "the negative squared Mahalanobis distance"

    def __init__(self, mu: torch.Tensor, prec: torch.Tensor, settings: FeCAMConfig, info: dict | None = None):
        super().__init__(info)
        self.settings = settings
        self.mu: torch.Tensor
        self.prec: torch.Tensor
        self.register_buffer("mu", mu.contiguous())
        self.register_buffer("prec", prec.contiguous())

    def meta(self) -> dict:
        return {"normalize": self.settings.normalize, "tukey": self.settings.tukey}

    @classmethod
    def from_state(cls, tensors, meta) -> FeCAMScores:
        settings = FeCAMConfig(normalize=bool(meta["normalize"]), tukey=bool(meta["tukey"]))
        return cls(tensors["mu"], tensors["prec"], settings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -mahalanobis(transform(x, self.settings), self.mu, self.prec)


def fit(ctx: HeadCache, settings: FeCAMConfig) -> FeCAMScores:
    """Incremental: an old class's features never change (each task's were extracted with its own
    backbone), so the previous task's state is kept and only task T's classes are fitted; from scratch
    at task 0, for a compensated head, or where the previous state was fitted with other settings."""
    prev = ctx.previous_state("fecam")
    first = 0
    old_mu, old_prec = None, None
    if prev is not None:
        tensors, md = prev
        if md["settings"] == dataclasses.asdict(settings) and md["n_classes"] == ctx.tasks[ctx.task][0]:
            old_mu, old_prec, first = tensors["mu"], tensors["prec"], ctx.task
    means, covs = [], []
    for i in range(first, ctx.task + 1):
        chunks = ((transform(x, settings), y) for x, y in ctx.train_chunks(i))
        m = fit_class_stats(chunks, range(*ctx.tasks[i]), ctx.feature_dim(), ctx.device)
        means.append(m.mean)
        covs.append(covariance(m.count, m.m2))
    mu, prec = fecam_parameters(torch.cat(means), torch.cat(covs), settings)
    mu, prec = mu.float(), prec.float()
    if old_mu is not None and old_prec is not None:
        mu = torch.cat([old_mu.to(mu.device), mu])
        prec = torch.cat([old_prec.to(prec.device), prec])
    return FeCAMScores(mu, prec, settings, info={"incremental": old_mu is not None})


register_head(
    HeadSpec(
        "fecam",
        "per-class Mahalanobis on normalised features (FeCAM)",
        FeCAMConfig,
        fit,
        # the previous task's fitted state: fecam updates it with task T's classes
        inputs=lambda cfg, t: [*extracts_upto(t), *([("head:fecam", t - 1)] if t > 0 else [])],
        drift_inputs=lambda cfg, t: extracts_upto(t),  # compensated: old features move, a full refit
        state_cls=FeCAMScores,
    )
)
