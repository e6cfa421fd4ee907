"""`lda`: streaming LDA with a shared, shrunk covariance (docs/methods/heads.md, lda; Hayes & Kanan 2020).

S = sum_c M2_c / (N - C), shrunk to (1 - e) S + e I; w_c = S^-1 mu_c,
b_c = -1/2 mu_c^T S^-1 mu_c; predict argmax_c (w_c . x + b_c). It needs only the
count, mean and M2 of each class, so it is exact over any split into tasks.

Default e = 1e-4, the deep streaming LDA authors' default: with C classes of
n_c >= d rows S is well conditioned and e barely moves it, and where classes are
small (CUB: ~30 images, d = 768) pooling over all seen classes already makes S
full rank once N - C >= d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clpt.heads.base import HeadSpec, HeadState, register_head, stats_upto


@dataclass
class LDAConfig:
    shrinkage: float = 1e-4  # e in (1 - e) S + e I

    def problems(self) -> list[str]:
        e = self.shrinkage  # None: its type was wrong, reported by the parser
        return [] if e is None or 0 <= e <= 1 else [f"shrinkage: {e} must be in [0, 1]"]


def lda_weights(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, shrinkage: float):
    """(W (C, d), b (C,)) float64 from per-class count, mean and M2."""
    n, c = float(count.sum()), len(count)
    cov = m2.sum(0) / max(n - c, 1.0)  # pooled, unbiased
    d = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * torch.eye(d, dtype=cov.dtype, device=cov.device)
    w = torch.linalg.solve(cov, mean.T).T  # (C, d): S^-1 mu_c
    b = -0.5 * (mean * w).sum(1)
    return w, b


class LinearScores(HeadState):
    """w_c . x + b_c: weights (C, d) and biases (C,), float32."""

    score = "the linear discriminant w_c . x + b_c"

    def __init__(self, w: torch.Tensor, b: torch.Tensor, info: dict | None = None):
        super().__init__(info)
        self.w: torch.Tensor
        self.b: torch.Tensor
        self.register_buffer("w", w.contiguous())
        self.register_buffer("b", b.contiguous())

    @classmethod
    def from_state(cls, tensors, meta) -> LinearScores:
        return cls(tensors["w"], tensors["b"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b, x.float(), self.w.T)


def fit(ctx, settings: LDAConfig) -> LinearScores:
    s = ctx.class_stats()
    w, b = lda_weights(s.count, s.mean, s.m2, settings.shrinkage)
    return LinearScores(w.to(ctx.device, torch.float32), b.to(ctx.device, torch.float32))


register_head(
    HeadSpec(
        "lda",
        "streaming LDA, shared shrunk covariance",
        LDAConfig,
        fit,
        inputs=lambda cfg, t: stats_upto(t),
        state_cls=LinearScores,
    )
)
