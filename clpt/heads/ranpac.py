"""`ranpac`: random projection, ReLU, and a ridge head on the Gram matrix (docs/methods/heads.md, ranpac; RanPAC).

- W_rand (d, M), i.i.d. N(0, 1), no scaling, drawn once from `heads.ranpac.seed`
  (the run's seed by default); h(x) = ReLU(f(x) W_rand).
- G = sum over tasks <= T of H^T H (M x M) and Q = sum H^T Y (M x C, one-hot):
  streamed chunk by chunk from the feature cache with one GEMM per chunk, on
  the GPU when there is one; the projected features are never all in memory.
  Each task's rows were extracted with that task's backbone, as RanPAC
  accumulates them (G and Q are never recomputed with a later backbone).
- lambda: on task T's rows only, shuffled, fit on the first int(0.8 N),
  W_l = solve(H_a^T H_a + l I, H_a^T Y_a), validation MSE over all C columns on
  the last 20 %, l in 1e-8 .. 1e8 (17 values), argmin (the first on ties). (Computed on
  task T's own columns: the others are 0 in the targets and so in every prediction, and add 0.)
  One eigendecomposition serves the whole grid: of H_a H_a^T when the fit part
  has fewer rows than M (W_l = H_a^T (H_a H_a^T + l I)^-1 Y_a, the same
  solution), else of H_a^T H_a.
- W_o = solve(G + l I, Q); logits = h(x) W_o (argmax over the seen classes).
- In a run, task T continues G and Q from task T-1's fit (kept beside its state
  for the latest task only) and reads task T's features alone: bit-identical to
  the fit from scratch; `ranpac+drift` refits (old features move).

Deviation (named): `dtype: float64` by default, for the Gram accumulation and
the solves. Their code works in float32, where G depends on the order rows are
summed in and the choice among the small lambdas is rounding noise (a singular
system can even give NaN); `dtype: float32` is offered. G is then 800 MB at
M = 10000 instead of 400 MB.
"""

from __future__ import annotations

import dataclasses

import torch

from clpt import distributed as dist
from clpt.heads.base import HeadState
from clpt.heads.registry import LAMBDAS, RanPACConfig  # noqa: F401  (re-exported)


def random_projection(d: int, m: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, m, generator=g).to(device)  # (d, M), N(0, 1), no scaling


def project(x: torch.Tensor, w_rand: torch.Tensor) -> torch.Tensor:
    return torch.relu(x.float() @ w_rand)  # (N, M)


def choose_lambda(
    h_a, y_a, h_v, y_v, lambdas: list[float], dtype=torch.float64, n_columns: int | None = None
) -> tuple[float, list[float]]:
    """argmin over `lambdas` of the validation MSE of the ridge fitted on (h_a, y_a); and all the MSEs.
    `n_columns`: the MSE is over that many target columns, of which y_a and y_v hold the ones that can be
    non-zero: a column that is 0 in Y_a is 0 in every prediction too, so the others add exactly 0 (task
    T's rows give one-hot targets in its own classes' columns; the MSE still averages over all C)."""
    h_a, y_a, h_v, y_v = (t.to(dtype) for t in (h_a, y_a, h_v, y_v))
    per = len(y_v) * (y_v.shape[1] if n_columns is None else n_columns)  # the entries averaged over
    n, m = h_a.shape
    if n <= m:  # dual: W = H_a^T (H_a H_a^T + l I)^-1 Y_a
        evals, u = torch.linalg.eigh(h_a @ h_a.T)  # (n,), (n, n)
        uy = u.T @ y_a  # (n, C)
        kv = (h_v @ h_a.T) @ u  # (n_v, n)

        def predict(lam: float) -> torch.Tensor:
            return kv @ (uy / (evals + lam)[:, None])
    else:  # primal: W = (H_a^T H_a + l I)^-1 H_a^T Y_a
        evals, u = torch.linalg.eigh(h_a.T @ h_a)  # (M,), (M, M)
        uq = u.T @ (h_a.T @ y_a)  # (M, C)
        hv = h_v @ u  # (n_v, M)

        def predict(lam: float) -> torch.Tensor:
            return hv @ (uq / (evals + lam)[:, None])

    losses = [float(((predict(lam) - y_v) ** 2).sum() / per) for lam in lambdas]
    finite = [v if v == v else float("inf") for v in losses]  # NaN never wins
    best = min(range(len(lambdas)), key=lambda i: finite[i])
    return float(lambdas[best]), losses


def ridge_solution(gram: torch.Tensor, q: torch.Tensor, lam: float, dtype=torch.float64) -> torch.Tensor:
    """W_o = solve(G + l I, Q): (M, C)."""
    g = gram.to(dtype)
    g = g + lam * torch.eye(len(g), dtype=dtype, device=g.device)
    return torch.linalg.solve(g, q.to(dtype))


class RanPACScores(HeadState):
    """ReLU(x W_rand) W_o: W_o (M, C) float32 is saved; W_rand (d, M) is redrawn from its seed (30 MB at
    d = 768, M = 10000, derivable), unless it was saved too (`clpt export` writes it)."""

    score = "the ridge regression's output for the class (about 1 for the predicted one)"

    def __init__(self, w_o: torch.Tensor, seed: int, dim: int, w_rand: torch.Tensor | None = None,
                 info: dict | None = None):  # fmt: skip
        super().__init__(info)
        self.seed, self.dim = int(seed), int(dim)
        self.w_o: torch.Tensor
        self.w_rand: torch.Tensor
        self.register_buffer("w_o", w_o.contiguous())
        if w_rand is None:
            w_rand = random_projection(dim, len(w_o), seed, w_o.device)
        self.register_buffer("w_rand", w_rand.contiguous(), persistent=False)

    def meta(self) -> dict:
        return {"seed": self.seed, "feature_dim": self.dim}

    def tensors(self, with_projection: bool = False) -> dict[str, torch.Tensor]:
        out = super().tensors()
        if with_projection:
            out["w_rand"] = self.w_rand.detach().cpu().contiguous()
        return out

    @classmethod
    def from_state(cls, tensors, meta) -> RanPACScores:
        return cls(tensors["w_o"], int(meta["seed"]), int(meta["feature_dim"]), tensors.get("w_rand"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.w_rand) @ self.w_o


def fit(ctx, settings: RanPACConfig) -> RanPACScores:
    """Incremental: G and Q of tasks < T are carried from the previous task's fit (settings alike) and
    only task T's features are read; the same additions in the same order as from scratch, so equal to
    the bit. From scratch at task 0, for a compensated head, or where the carry is gone."""
    dtype = getattr(torch, settings.dtype)
    n_cls = ctx.n_seen
    seed = ctx.cfg.seed if settings.seed is None else settings.seed
    w_rand = random_projection(ctx.feature_dim(), settings.dim, seed, ctx.device)
    m = settings.dim
    prev = ctx.previous_state("ranpac")
    carry = None
    if prev is not None and prev[1]["settings"] == dataclasses.asdict(settings):
        carry = prev[1]["carry"] if prev[1]["n_classes"] == ctx.tasks[ctx.task][0] else None
    first = 0 if carry is None else ctx.task
    if carry is not None and ctx.shard[0] == 0:  # sharded: rank 0 alone carries the earlier tasks' sums
        gram = carry["gram"].to(ctx.device)
        q = torch.cat([carry["q"].to(ctx.device), torch.zeros(m, n_cls - carry["q"].shape[1], dtype=dtype,
                                                              device=ctx.device)], dim=1)  # fmt: skip
    else:
        gram = torch.zeros(m, m, dtype=dtype, device=ctx.device)
        q = torch.zeros(m, n_cls, dtype=dtype, device=ctx.device)
    current_x, current_y = [], []
    for i in range(first, ctx.task + 1):
        for x, y in ctx.train_chunks(i, settings.chunk_rows):
            h = project(x, w_rand).to(dtype)  # (n, M): one chunk at a time
            gram.addmm_(h.T, h)
            q.index_add_(1, y, h.T)  # H^T Y for one-hot Y: column y_j gets h_j
            if i == ctx.task:
                current_x.append(x.cpu())
                current_y.append(y.cpu())
    x_t, y_t = torch.cat(current_x), torch.cat(current_y)
    if ctx.shard[1] > 1:  # every rank read its own rows: sum G and Q, gather task T's rows in row order
        dist.all_reduce_sum(gram), dist.all_reduce_sum(q)
        x_t, y_t = (
            dist.all_gather_rows(x_t.to(ctx.device)).cpu(),
            dist.all_gather_rows(y_t.to(ctx.device)).cpu(),
        )
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(len(y_t), generator=g)
    n_fit = int(len(perm) * (1 - settings.val_fraction))  # int(0.8 N), as the authors (not round)
    fit_rows, val_rows = perm[:n_fit], perm[n_fit:]
    lo, hi = ctx.tasks[ctx.task]  # task T's rows: one-hot in its own classes' columns, 0 in the others
    onehot = torch.nn.functional.one_hot(y_t - lo, hi - lo).float()
    h_t = project(x_t.to(ctx.device), w_rand)
    lam, losses = choose_lambda(
        h_t[fit_rows.to(ctx.device)], onehot[fit_rows].to(ctx.device),
        h_t[val_rows.to(ctx.device)], onehot[val_rows].to(ctx.device),
        settings.lambdas, dtype, n_columns=n_cls,
    )  # fmt: skip
    del h_t
    w_o = ridge_solution(gram, q, lam, dtype).float()  # (M, C)
    state = RanPACScores(w_o, seed, ctx.feature_dim(), w_rand,
                         info={"lambda": lam, "val_mse": losses, "incremental": carry is not None})  # fmt: skip
    state.carry = {"gram": gram, "q": q}
    return state
