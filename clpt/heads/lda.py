"""`lda`: streaming LDA with a shared, shrunk covariance (docs/methods/heads.md, lda; Hayes & Kanan 2020).

S = sum_c M2_c / (N - C), shrunk to (1 - e) S + e I; w_c = S^-1 mu_c,
b_c = -1/2 mu_c^T S^-1 mu_c; predict argmax_c (w_c . x + b_c). It needs only the
count, mean and M2 of each class, so it is exact over any split into tasks. In a
run, task T adds its classes' statistics to the pooled scatter, row count and means
carried from task T-1's fit (bit-identical to the fit from scratch); `lda+drift`
refits.

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


def pooled_scatter(stats) -> torch.Tensor:
    """sum_c M2_c (d, d) float64 from each task's pooled scatter (exact in every covariance form), summed
    task by task in order: the same additions whether the fit starts from scratch or continues the
    previous task's sum (so both are equal to the bit)."""
    d = stats.pooled.shape[-1]
    total = torch.zeros(d, d, dtype=torch.float64, device=stats.pooled.device)
    for p in stats.pooled:
        total = total + p.to(torch.float64)
    return total


def lda_weights(n_rows: float, mean: torch.Tensor, scatter: torch.Tensor, shrinkage: float):
    """(W (C, d), b (C,)) float64 from the row count, the class means and the pooled scatter sum_c M2_c."""
    c = len(mean)
    cov = scatter / max(n_rows - c, 1.0)  # pooled, unbiased
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
    """Incremental: the pooled scatter, row count and class means of tasks < T are carried from the
    previous task's fit, and task T's statistics added (the only ones read); every class's w, b is then
    solved again (the shared covariance moved). From scratch at task 0, for a compensated head, or where
    the carry is gone."""
    prev = ctx.previous_state("lda")
    carry = prev[1]["carry"] if prev is not None and prev[1]["n_classes"] == ctx.tasks[ctx.task][0] else None
    if carry is not None:
        s = ctx.task_stats(ctx.task)
        scatter = carry["scatter"].to(s.pooled.device) + pooled_scatter(s)
        n_rows = carry["n_rows"].to(s.count.device) + s.count.sum()
        mean = torch.cat([carry["mean"].to(s.mean.device), s.mean.to(torch.float64)])
    else:
        s = ctx.class_stats()
        scatter, n_rows, mean = pooled_scatter(s), s.count.sum(), s.mean.to(torch.float64)
    w, b = lda_weights(float(n_rows), mean, scatter, settings.shrinkage)
    state = LinearScores(w.to(ctx.device, torch.float32), b.to(ctx.device, torch.float32),
                         info={"incremental": carry is not None})  # fmt: skip
    state.carry = {"scatter": scatter, "n_rows": n_rows.reshape(1).to(torch.float64), "mean": mean}
    return state


register_head(
    HeadSpec(
        "lda",
        "streaming LDA, shared shrunk covariance",
        LDAConfig,
        fit,
        # task T's statistics and the previous task's fit (its carry holds the earlier tasks' sums)
        inputs=lambda cfg, t: [("stats", t), *([("head:lda", t - 1)] if t > 0 else [])],
        drift_inputs=lambda cfg, t: stats_upto(t),  # compensated: old classes move, a full refit
        state_cls=LinearScores,
    )
)
