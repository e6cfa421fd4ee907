"""`lda`: linear discriminant with a shared, shrunk covariance (docs/methods/heads.md, lda).

`estimator: exact` (the default): the exact pooled within-class covariance
S = sum_c M2_c / (N - C), shrunk to (1 - e) S + e I; w_c = S^-1 mu_c,
b_c = -1/2 mu_c^T S^-1 mu_c; predict argmax_c (w_c . x + b_c). It needs only the
count, mean and M2 of each class, so it is exact over any split into tasks. In a
run, task T adds its classes' statistics to the pooled scatter, row count and means
carried from task T-1's fit (bit-identical to the fit from scratch); `lda+drift`
refits. This is not Hayes & Kanan's streaming estimate (deep SLDA, Avalanche's
StreamingLDA), which this head names `estimator: streaming`:

`estimator: streaming`: their per-sample update, over the training rows in the
order the cache stores them (grouped by class): with k the number of rows seen
before, d = x - mu_y (the running mean of x's class, which starts at 0),
Sigma <- (k Sigma + k/(k+1) d d^T) / (k+1), then mu_y <- mu_y + d / (n_y + 1).
Unrolled, Sigma_N = (1/N) sum_k k/(k+1) d_k d_k^T: one weighted GEMM per run of
rows of one class (`streaming_scatter`), carried across tasks as the update is.
It reads features, not statistics (its stage inputs say so).

Default e = 1e-4, the deep streaming LDA authors' default: with C classes of
n_c >= d rows S is well conditioned and e barely moves it, and where classes are
small (CUB: ~30 images, d = 768) pooling over all seen classes already makes S
full rank once N - C >= d.
"""

from __future__ import annotations

import torch

from clpt.heads.base import HeadState
from clpt.heads.registry import LDAConfig


def streaming_scatter(chunks, state: dict) -> dict:
    """Hayes & Kanan's streaming covariance over `chunks` of (x, y) in stream order, continuing `state`:
    u (d, d) = sum_k k/(k+1) d_k d_k^T (so Sigma = u / k), k the rows seen, and per class its row count and
    sum (the running mean). Float64. One weighted GEMM per run of consecutive rows of one class: within
    it, row j's mean before it is (sum before the run + the run's prefix sum) / (count + j)."""
    u, k = state["u"], int(state["k"])
    sums, counts = state["sums"], state["counts"]  # {class: (d,) float64}, {class: int}
    for x, y in chunks:
        x = x.to(torch.float64)
        y = y.tolist()
        start = 0
        while start < len(y):
            c = y[start]
            stop = start
            while stop < len(y) and y[stop] == c:
                stop += 1
            seg = x[start:stop]
            n0 = counts.get(c, 0)
            s0 = sums.get(c, torch.zeros(x.shape[1], dtype=torch.float64, device=x.device))
            before = s0 + torch.cumsum(seg, 0) - seg  # sum of the class's rows before each row
            n_before = n0 + torch.arange(len(seg), dtype=torch.float64, device=x.device)
            mean_before = before / n_before.clamp(min=1)[:, None]  # 0 before the class's first row
            d = seg - mean_before
            kk = k + torch.arange(len(seg), dtype=torch.float64, device=x.device)
            u = u + (d * (kk / (kk + 1))[:, None]).T @ d
            sums[c], counts[c] = s0 + seg.sum(0), n0 + len(seg)
            k += len(seg)
            start = stop
    return {"u": u, "k": k, "sums": sums, "counts": counts}


def pooled_scatter(stats) -> torch.Tensor:
    """sum_c M2_c (d, d) float64 from each task's pooled scatter (exact in every covariance form), summed
    task by task in order: the same additions whether the fit starts from scratch or continues the
    previous task's sum (so both are equal to the bit)."""
    d = stats.pooled.shape[-1]
    total = torch.zeros(d, d, dtype=torch.float64, device=stats.pooled.device)
    for p in stats.pooled:
        total = total + p.to(torch.float64)
    return total


def lda_weights(
    n_rows: float, mean: torch.Tensor, scatter: torch.Tensor, shrinkage: float, unbiased: bool = True
):
    """(W (C, d), b (C,)) float64 from the row count, the class means and the pooled scatter sum_c M2_c
    (unbiased: divided by N - C; else `scatter` is the covariance itself)."""
    c = len(mean)
    cov = scatter / max(n_rows - c, 1.0) if unbiased else scatter  # pooled, unbiased
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


def _fit_streaming(ctx, settings: LDAConfig) -> LinearScores:
    """The streaming estimate (Hayes & Kanan): task T's rows continue the update carried from task T-1
    (u, k and the class means); from scratch over tasks 0..T where there is no carry."""
    prev = ctx.previous_state("lda")
    carry = prev[1]["carry"] if prev is not None and prev[1]["n_classes"] == ctx.tasks[ctx.task][0] else None
    d = ctx.feature_dim()
    if carry is not None and "u" in carry:
        first = ctx.task
        mean_old = carry["mean"].to(ctx.device)
        state = {"u": carry["u"].to(ctx.device), "k": int(carry["k"].item()), "sums": {}, "counts": {}}
    else:
        first, mean_old = 0, None
        state = {
            "u": torch.zeros(d, d, dtype=torch.float64, device=ctx.device),
            "k": 0,
            "sums": {},
            "counts": {},
        }
    for i in range(first, ctx.task + 1):
        state = streaming_scatter(ctx.train_chunks(i), state)
    lo, hi = ctx.tasks[first][0], ctx.tasks[ctx.task][1]
    new_means = torch.stack([state["sums"][c] / state["counts"][c] for c in range(lo, hi)])
    mean = new_means if mean_old is None else torch.cat([mean_old, new_means])
    sigma = state["u"] / max(state["k"], 1)
    w, b = lda_weights(1.0, mean, sigma, settings.shrinkage, unbiased=False)
    out = LinearScores(w.to(ctx.device, torch.float32), b.to(ctx.device, torch.float32),
                       info={"incremental": mean_old is not None, "estimator": "streaming"})  # fmt: skip
    out.carry = {"u": state["u"], "k": torch.tensor([float(state["k"])], dtype=torch.float64), "mean": mean}
    return out


def fit(ctx, settings: LDAConfig) -> LinearScores:
    """Incremental: the pooled scatter, row count and class means of tasks < T are carried from the
    previous task's fit, and task T's statistics added (the only ones read); every class's w, b is then
    solved again (the shared covariance moved). From scratch at task 0, for a compensated head, or where
    the carry is gone."""
    if settings.estimator == "streaming":
        return _fit_streaming(ctx, settings)
    prev = ctx.previous_state("lda")
    carry = prev[1]["carry"] if prev is not None and prev[1]["n_classes"] == ctx.tasks[ctx.task][0] else None
    if carry is not None and "scatter" in carry:
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
