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
  S~_c is positive definite whenever shrink1 > 0, so its pinv is its inverse and
  d_c(x) = |L_c^-1 (x^ - mu_c)|^2 with L_c its Cholesky factor: the fit keeps L_c
  (factorised in float32 where shrink1 bounds the condition number,
  `heads.fecam.dtype`) and scoring solves the triangular system, so no inverse
  is ever formed; with shrink1 = 0, the pseudo-inverse, kept as it is.

`tukey: true` applies the power transform x^0.5 (sign-preserving:
sign(x) |x|^0.5, since ViT features are not non-negative) before normalising.
It borrows the transform of their ResNet path and nothing else: that path
transforms unnormalised (non-negative) features, from task 1 on, and shrinks
twice; this option is not that path.

In a run the fit is incremental: an old class's features never change, so task
T fits only its own classes, a part saved after task T-1's state (joined,
bit-identical to a fit from scratch); a compensated `fecam+drift` refits every
task.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from clpt.errors import ClptError
from clpt.heads.base import HeadCache, HeadState
from clpt.heads.registry import FeCAMConfig
from clpt.stats import Scatter, class_blocks, compress, covariance, fit_class_stats, merge_ranks


def transform(x: torch.Tensor, settings: FeCAMConfig) -> torch.Tensor:
    x = x.float()
    if settings.tukey:
        x = torch.sign(x) * x.abs().sqrt()
    if settings.normalize:
        x = F.normalize(x, dim=1)
    return x


def shrink_(s: torch.Tensor, a1: float, a2: float, scratch: torch.Tensor) -> torch.Tensor:
    """In place on (C, d, d) S: S + a1 mean(diag S) I + a2 mean(non-zero off-diag S) (1 - I), per class;
    `scratch` (as S) is overwritten (used only where a2 != 0)."""
    diag = torch.diagonal(s, dim1=1, dim2=2)
    new_diag = diag + a1 * diag.mean(1)[:, None]  # before S changes
    if a2:  # a2 = 0 adds exactly 0 off the diagonal
        off = scratch.copy_(s)
        torch.diagonal(off, dim1=1, dim2=2).zero_()  # S (1 - I), for finite S
        nonzero = (off != 0).sum((1, 2)).clamp(min=1)
        s.add_((a2 * (off.sum((1, 2)) / nonzero))[:, None, None])
    # the diagonal gets a1 mean(diag S) and no off-diagonal term (exactly as S + a1 m I + a2 om (1 - I))
    diag.copy_(new_diag)
    return s


def correlation_(s: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """In place on (C, d, d) S: S_ij / (sd_i sd_j), sd = sqrt(diag S) (exactly symmetric: one product
    sd_i sd_j per entry); `scratch` (as S) is overwritten."""
    sd = torch.diagonal(s, dim1=1, dim2=2).clamp(min=1e-300).sqrt()  # (C, d); a 1-row class has S = 0
    return s.div_(torch.mul(sd[:, :, None], sd[:, None, :], out=scratch))


def shrink(cov: torch.Tensor, a1: float, a2: float) -> torch.Tensor:
    """`shrink_` on a copy of `cov`."""
    return shrink_(cov.clone(), a1, a2, torch.empty_like(cov) if a2 else cov.new_empty(0))


def correlation(cov: torch.Tensor) -> torch.Tensor:
    """`correlation_` on a copy of `cov`."""
    return correlation_(cov.clone(), torch.empty_like(cov))


AUTO_FLOAT32_COND = 2000.0  # the largest condition-number bound `auto` factorises in float32


def factor_dtype(settings: FeCAMConfig, d: int) -> torch.dtype:
    """The precision the factorisations run in (`heads.fecam.dtype`). `auto`: float32 where the
    shrinkage bounds the condition number of the correlation matrices well enough, float64 elsewhere.
    S' = S + a1 mean(diag S) I has eigenvalues in [a1 m, tr S + a1 m] (m = mean(diag S), tr S = d m),
    so its condition number is at most d / a1 + 1. A bound of at most `AUTO_FLOAT32_COND` (d = 768
    needs a1 >= 0.39) keeps a float32 inverse within about 1e-4 (relative) of the float64 one; the
    precisions are stored, and the scores computed, in float32 either way."""
    if settings.dtype == "float64":
        return torch.float64
    if settings.dtype == "float32":
        return torch.float32
    a1 = settings.shrink1
    return torch.float32 if a1 > 0 and d / a1 + 1 <= AUTO_FLOAT32_COND else torch.float64


def pseudo_inverse(s: torch.Tensor) -> torch.Tensor:
    """pinv of each symmetric (C, d, d) matrix in float64, exactly symmetric, at the numerical rank of
    statistics accumulated in float32: eigenvalues below d * eps(float32) times the largest are zero.
    (At float64's d * eps, the float32 rounding left in the null space of a class of at most d rows,
    about 1e-7 relative, would be inverted into distances of 1e7.)"""
    rtol = s.shape[-1] * torch.finfo(torch.float32).eps
    p = torch.linalg.pinv(s.to(torch.float64), hermitian=True, rtol=rtol)
    return (p + p.transpose(1, 2)) * 0.5


def precisions(s: torch.Tensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """pinv of each symmetric (C, d, d) matrix, in `dtype` (s's own by default): one batched Cholesky
    and its inverse (LAPACK's potri, exactly symmetric; several times cheaper than an
    eigendecomposition), for positive definite matrices (FeCAM's, once shrink1 > 0); the float64
    pseudo-inverse for any the factorisation refuses. Equal to pinv within rounding (of `dtype`).
    Written into `out` (converted to its dtype) when given."""
    a = s if dtype is None else s.to(dtype)
    chol, info = torch.linalg.cholesky_ex(a)
    bad = torch.nonzero(info).flatten()
    if len(bad):
        chol[bad] = torch.eye(s.shape[-1], dtype=a.dtype, device=s.device)  # placeholders, replaced below
    direct = out is not None and out.dtype == a.dtype
    prec = torch.cholesky_inverse(chol, out=out) if direct else torch.cholesky_inverse(chol)
    if len(bad):
        prec[bad] = pseudo_inverse(s[bad]).to(prec.dtype)
    if out is not None and not direct:
        out.copy_(prec)
        return out
    return prec


def _normalised(count: torch.Tensor, m2: torch.Tensor, settings: FeCAMConfig):
    """(block, S~) for each per-class block (`class_blocks`) of classes with moments (count, M2): their
    shrunk, correlation-normalised covariances, the matrices `full_factors` and `full_precisions` invert.
    `correlation(shrink(covariance(count, M2)))`, in place in two float64 arrays of a block that every
    block reuses (fresh (d, d) temporaries a class cost more in page faults than in
    arithmetic): consume each S~ before asking for the next."""
    blocks = class_blocks(len(m2), m2.device)
    if not blocks:
        return
    work = torch.empty((len(m2[blocks[0]]), *m2.shape[1:]), dtype=m2.dtype, device=m2.device)
    buf = torch.empty_like(work)
    for k in blocks:
        b = len(m2[k])
        s, scratch = work[:b], buf[:b]
        covariance(count[k], m2[k], out=s)
        correlation_(shrink_(s, settings.shrink1, settings.shrink2, scratch), scratch)
        yield k, s


def full_factors(
    count: torch.Tensor, m2: torch.Tensor, settings: FeCAMConfig, out: torch.Tensor
) -> dict[int, torch.Tensor]:
    """Into `out` (C, d, d) float32: the lower Cholesky factor L_c of each shrunk, correlation-normalised
    covariance S~_c (shrink1 > 0: positive definite), factorised in `factor_dtype`, so that
    (x - mu)^T S~_c^-1 (x - mu) = |L_c^-1 (x - mu)|^2. Where the factorisation refuses a class (rounding
    at the edge of definiteness, a class whose rows are all alike), its slot gets I and the class its
    float64 pseudo-inverse, returned as {class index within `out`: P (d, d) float32}. The same per-class
    blocks as `full_precisions`: a class gets the same bits alone or among others."""
    dtype = factor_dtype(settings, m2.shape[-1])
    refused: dict[int, torch.Tensor] = {}
    cast = None  # S~ in `dtype`, reused by every block where that is not float64
    for k, s in _normalised(count, m2, settings):
        if s.dtype != dtype:
            cast = torch.empty(s.shape, dtype=dtype, device=s.device) if cast is None else cast
            a = cast[: len(s)].copy_(s)
        else:
            a = s
        if a.dtype == out.dtype:  # straight into `out` (the same bits as through a new tensor)
            info = torch.empty(len(a), dtype=torch.int32, device=a.device)
            torch.linalg.cholesky_ex(a, out=(out[k], info))
        else:
            chol, info = torch.linalg.cholesky_ex(a)
            out[k] = chol
        for j in torch.nonzero(info).flatten().tolist():
            out[k][j] = torch.eye(s.shape[-1], dtype=out.dtype, device=out.device)
            refused[k.start + j] = pseudo_inverse(s[j : j + 1])[0].float()
    return refused


def full_precisions(
    count: torch.Tensor, m2: torch.Tensor, settings: FeCAMConfig, out: torch.Tensor | None = None
) -> torch.Tensor:
    """P (C, d, d) float32 (into `out` when given) of classes with moments (count, M2): the pinv of the
    shrunk, correlation-normalised covariances: their inverse, factorised in `factor_dtype`, when
    shrink1 > 0 makes them positive definite; the float64 pseudo-inverse with shrink1 = 0 (where
    rounding can let a Cholesky factorisation through a singular matrix). On a CPU one class at a
    time, from M2 to P, so every step works on a cache-sized (d, d) block; on a GPU all classes at once.
    A class's P depends on its own moments only, so a class gets the same bits alone or among others."""
    d = m2.shape[-1]
    dtype = factor_dtype(settings, d)
    if out is None:
        out = torch.empty(m2.shape, dtype=torch.float32, device=m2.device)
    for k, s in _normalised(count, m2, settings):
        if settings.shrink1 > 0:  # positive definite: its inverse
            precisions(s, dtype, out=out[k])
        else:  # a class of at most d rows has a singular S, which a Cholesky factorisation may not notice
            out[k] = pseudo_inverse(s)
    return out


def mahalanobis(x: torch.Tensor, mu: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    """(N, C) squared distances (x - mu_c)^T P_c (x - mu_c), one class at a time (no N-sized
    allocation, so `torch.export` keeps the batch dimension dynamic)."""
    cols = []
    for c in range(len(mu)):
        diff = x - mu[c]  # (N, d)
        cols.append(((diff @ prec[c]) * diff).sum(1))
    return torch.stack(cols, dim=1)


def cholesky_mahalanobis(x, mu, chol, dense: dict[int, torch.Tensor]) -> torch.Tensor:
    """(N, C) squared distances |L_c^-1 (x - mu_c)|^2, one class at a time (a triangular solve with the rows
    as right-hand sides: half a GEMM's flops); a class in `dense` ({class: P}) is (x - mu_c)^T P (x - mu_c)."""
    cols = []
    for c in range(len(mu)):
        diff = x - mu[c]  # (N, d)
        if c in dense:
            cols.append(((diff @ dense[c]) * diff).sum(1))
        else:  # z L_c^T = diff, so z = diff L_c^-T: each row's L_c^-1 (x - mu_c)
            z = torch.linalg.solve_triangular(chol[c].T, diff, upper=True, left=False)
            cols.append((z * z).sum(1))
    return torch.stack(cols, dim=1)


def structured_precision(scatter: Scatter, settings: FeCAMConfig):
    """FeCAM's precision of compact covariances S (a `Scatter` of covariances, diagonal or lowrank), in
    a form that stays compact: P = A^-1 - A^-1 W K W^T A^-1 (Woodbury), returned as (A^-1 (C, d), W (C, d, k),
    K (C, k, k)), float64. The shrinkage and the correlation normalisation are applied as for a full S:
    S' = U diag(e - rho) U^T + c I + a2 om 1 1^T (c = rho + a1 mean(diag S) - a2 om, om the mean
    off-diagonal entry, taken over all d (d - 1) of them), then D^-1/2 S' D^-1/2 = W L W^T + c D^-1,
    W = D^-1/2 [U, 1], L = diag(e - rho, a2 om), K = (I + L G)^-1 L, G = W^T A^-1 W. For the diagonal
    form S~ = I (a diagonal matrix's correlation), so P = I."""
    a1, a2 = settings.shrink1, settings.shrink2
    dg = scatter.diagonal()  # (C, d)
    c_cls, d = dg.shape
    m = dg.mean(1)  # (C,)
    if scatter.form == "diagonal":
        iso = dg + a1 * m[:, None]  # c_j, per feature: S' is diagonal (its off-diagonal mean is 0)
        w0 = dg.new_zeros(c_cls, d, 0)
        lam = dg.new_zeros(c_cls, 0)
    else:
        assert scatter.basis is not None and scatter.eigval is not None and scatter.resid is not None
        u, e, rho = scatter.basis, scatter.eigval, scatter.resid
        ones = torch.ones(c_cls, d, 1, dtype=u.dtype, device=u.device)
        total = ((e - rho[:, None]) * (u.sum(1) ** 2)).sum(1) + rho * d  # 1^T S 1
        om = (total - dg.sum(1)) / max(d * (d - 1), 1)
        iso = (rho + a1 * m - a2 * om)[:, None].expand(c_cls, d)
        w0 = torch.cat([u, ones], dim=2)  # (C, d, r + 1)
        lam = torch.cat([e - rho[:, None], (a2 * om)[:, None]], dim=1)  # (C, r + 1)
    if not bool((iso > 0).all()):
        raise ClptError(
            f"fecam in the {scatter.form} covariance form: the shrunk covariance is not positive definite "
            f"(shrink1 = {a1}, shrink2 = {a2})",
            hint="raise heads.fecam.shrink1, lower heads.fecam.shrink2, or use stats.covariance=full",
        )
    dd = iso + (w0**2 * lam[:, None, :]).sum(2)  # diag(S'), (C, d)
    w = w0 / dd.sqrt()[:, :, None]
    ainv = dd / iso  # A = c D^-1
    g = w.transpose(1, 2) @ (ainv[:, :, None] * w)  # (C, k, k)
    k = w.shape[2]
    eye = torch.eye(k, dtype=w.dtype, device=w.device)
    core = torch.linalg.solve(eye + lam[:, :, None] * g, torch.diag_embed(lam))
    return ainv, w, (core + core.transpose(1, 2)) * 0.5


def structured_mahalanobis(x, mu, ainv, w, core) -> torch.Tensor:
    """(N, C) (x - mu_c)^T P_c (x - mu_c) for P_c = diag(ainv_c) - diag(ainv_c) W_c K_c W_c^T diag(ainv_c)."""
    cols = []
    for c in range(len(mu)):
        za = (x - mu[c]) * ainv[c]  # (N, d)
        proj = za @ w[c]  # (N, k)
        cols.append(((x - mu[c]) * za).sum(1) - ((proj @ core[c]) * proj).sum(1))
    return torch.stack(cols, dim=1)


class FeCAMScores(HeadState):
    """-(x^ - mu_c)^T P_c (x^ - mu_c), float32, with P_c in the statistics' covariance form. Full: the
    Cholesky factors of S~_c (C, d, d) (shrink1 > 0; `dense_index`, where there are any, lists the
    classes the factorisation refused, whose pseudo-inverses are `dense_prec`), or the precisions (C, d, d) themselves (`prec`:
    shrink1 = 0, and states saved before the factors were kept); diagonal or lowrank, its compact
    Woodbury form (ainv (C, d), w (C, d, k), core (C, k, k))."""

    score = "the negative squared Mahalanobis distance"
    prec: torch.Tensor  # full, pseudo-inverses
    chol: torch.Tensor  # full, Cholesky factors
    dense_index: torch.Tensor
    dense_prec: torch.Tensor
    ainv: torch.Tensor  # compact forms
    w: torch.Tensor
    core: torch.Tensor

    def __init__(self, mu: torch.Tensor, parts: dict[str, torch.Tensor], settings: FeCAMConfig,
                 form: str = "full", info: dict | None = None):  # fmt: skip
        super().__init__(info)
        self.settings, self.form = settings, form
        self.mu: torch.Tensor
        self.register_buffer("mu", mu.contiguous())
        if form != "full":
            self.keys: tuple[str, ...] = ("ainv", "w", "core")
        elif "chol" in parts:  # the refused classes' tensors only where there are any (no empty buffers)
            self.keys = ("chol", "dense_index", "dense_prec") if "dense_index" in parts else ("chol",)
        else:
            self.keys = ("prec",)
        for k in self.keys:
            self.register_buffer(k, parts[k].contiguous())
        # which slot of dense_prec each refused class has (a constant of the state, for torch.export too)
        self._dense = [int(c) for c in parts["dense_index"].tolist()] if "dense_index" in self.keys else []

    @classmethod
    def join(cls, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Concatenated per class; a part's `dense_index` counts from its own first class: shifted (in
        place: `join` consumes its parts)."""
        n = 0
        for p in parts:
            if "dense_index" in p:
                p["dense_index"] = p["dense_index"] + n
            n += len(p["mu"])
        return super().join(parts)

    def parts(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.keys}

    def meta(self) -> dict:
        return {"normalize": self.settings.normalize, "tukey": self.settings.tukey, "form": self.form}

    @classmethod
    def from_state(cls, tensors, meta) -> FeCAMScores:
        settings = FeCAMConfig(normalize=bool(meta["normalize"]), tukey=bool(meta["tukey"]))
        return cls(tensors["mu"], tensors, settings, meta.get("form", "full"))

    def portable(self) -> FeCAMScores:
        """With Cholesky factors: the same distances from the precisions they give, P_c = (L_c L_c^T)^-1
        (computed in float64; ONNX has no triangular solve), so an ONNX graph is one GEMM per class."""
        if "chol" not in self.keys:
            return self
        prec = torch.cholesky_inverse(self.chol.double()).float()
        for i, c in enumerate(self._dense):
            prec[c] = self.dense_prec[i]
        return FeCAMScores(self.mu, {"prec": prec}, self.settings, self.form, self.info).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = transform(x, self.settings)
        if self.form != "full":
            return -structured_mahalanobis(x, self.mu, self.ainv, self.w, self.core)
        if "chol" in self.keys:
            dense = {c: self.dense_prec[i] for i, c in enumerate(self._dense)}
            return -cholesky_mahalanobis(x, self.mu, self.chol, dense)
        return -mahalanobis(x, self.mu, self.prec)


def fit(ctx: HeadCache, settings: FeCAMConfig) -> FeCAMScores:
    """Incremental: an old class's features never change (each task's were extracted with its own
    backbone), so after the previous task's state only task T's classes are fitted, a part
    (`first_class`); from scratch at task 0, for a compensated head, or where the previous state was
    fitted with other settings, in another covariance form (`stats.covariance`) or holds precisions
    where this fit keeps factors."""
    form, rank = ctx.cfg.stats.covariance, ctx.cfg.stats.rank
    factors = form == "full" and settings.shrink1 > 0  # Cholesky factors, else pseudo-inverses
    key = "chol" if factors else "prec"
    prev = ctx.previous_state("fecam")
    first = 0
    if prev is not None:
        tensors, md = prev
        same = md["settings"] == dataclasses.asdict(settings) and md["meta"].get("form", "full") == form
        same = same and (form != "full" or key in tensors)
        if same and (form != "lowrank" or tensors["w"].shape[2] == min(rank, len(tensors["mu"][0])) + 1):
            if md["n_classes"] == ctx.tasks[ctx.task][0]:
                first = ctx.task
    base = ctx.tasks[first][0]  # the state (a part where > 0) holds classes [base, C)
    full = None
    dense: dict[int, torch.Tensor] = {}  # refused classes, by index within the state
    if form == "full":  # written in place, task by task (no concatenation)
        full = torch.empty(ctx.tasks[ctx.task][1] - base, ctx.feature_dim(), ctx.feature_dim(), device=ctx.device)
    means, parts = [], []
    # on a CPU, one float64 M2 array for every task's classes in turn (each task's moments are consumed
    # before the next; the GPU accumulator makes its own)
    widest = max(ctx.tasks[i][1] - ctx.tasks[i][0] for i in range(first, ctx.task + 1))
    d = ctx.feature_dim()
    cpu = torch.device(ctx.device).type == "cpu"
    m2_work = torch.empty(widest, d, d, dtype=torch.float64, device=ctx.device) if cpu else None
    for i in range(first, ctx.task + 1):
        chunks = ((transform(x, settings), y) for x, y in ctx.train_chunks(i))
        classes = range(*ctx.tasks[i])
        work = None if m2_work is None else m2_work[: len(classes)]
        m = fit_class_stats(chunks, classes, d, ctx.device, m2_out=work)
        if ctx.shard[1] > 1:  # every rank read its own rows: merge them exactly
            m = merge_ranks(m)
        means.append(m.mean)
        lo, hi = ctx.tasks[i][0] - base, ctx.tasks[i][1] - base
        if full is not None and factors:
            refused = full_factors(m.count, m.m2, settings, out=full[lo:hi])
            dense.update({lo + c: p for c, p in refused.items()})
        elif full is not None:
            full_precisions(m.count, m.m2, settings, out=full[lo:hi])
        else:
            ainv, w, core = structured_precision(compress(covariance(m.count, m.m2), form, rank), settings)
            parts.append({"ainv": ainv, "w": w, "core": core})
    mu = torch.cat(means).float()
    if full is not None and factors:
        new = {"chol": full}
        if dense:
            order = sorted(dense)
            new["dense_index"] = torch.tensor(order, dtype=torch.int64, device=full.device)
            new["dense_prec"] = torch.stack([dense[c] for c in order])
    elif full is not None:
        new = {"prec": full}
    else:
        new = {k: torch.cat([p[k] for p in parts]).float() for k in parts[0]}
    state = FeCAMScores(mu, new, settings, form, info={"incremental": base > 0})
    state.first_class = base
    return state
