"""Drift compensation: maps fitted on paired features, applied to stored class statistics (docs/methods/drift.md).

The paired features of task t are the same training images of task t seen by
the previous backbone (X_old, rows f_{theta_{t-1}}(x_i)) and by the new one
(X_new). Each method fits one map per task from them and moves the sufficient
statistics (count, mean, M2) of every old class into the new backbone's space:

    linear          SLDC alpha-1: ridge on (normalised) pairs, shrunk toward I;  mu W, W^T M2 W (exact)
    weak_nonlinear  SLDC alpha-2: identity + linear + MLP mixed by a softmax; re-estimated from samples
    sdc             SDC (SSIAT / RSIAT): a kernel-weighted mean shift per class; means only
    dpcr            DPCR: a task-wise ridge map times a per-class projection onto the class's Gram span
    ldc             LDC: a linear projector learned by Adam on the pairs; means only

A map is applied to statistics (`apply`) and, where it has one, to features of
known classes (`apply_features`, for heads that read cached features). Maps
compose over tasks: a class of task s is moved by the maps of tasks s+1..t in
order (`compose`). Nothing here writes a ridge or an epsilon into statistics.
All solves are float64.

Adding a method: a `fit(x_old, x_new, stats, classes, settings, generator) -> DriftMap` and a
`restore` here (or in a module of your own), and its settings dataclass and `register_drift(DriftSpec(...))`
in `clpt.drift_methods`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from clpt.drift_methods import (  # noqa: F401  (the settings and the registry, re-exported)
    DRIFT_METHODS,
    DPCRConfig,
    DriftSpec,
    LDCConfig,
    LinearConfig,
    SDCConfig,
    WeakNonlinearConfig,
    register_drift,
)


@dataclass
class Moments:
    """Sufficient statistics of C classes: count (C,), mean (C, d), scatter M2 (C, d, d), float64."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    def gram(self) -> torch.Tensor:
        """(C, d, d) uncentred Gram G = M2 + n mu^T mu."""
        return self.m2 + self.count[:, None, None] * (self.mean[:, :, None] * self.mean[:, None, :])

    @classmethod
    def from_gram(cls, count: torch.Tensor, mean: torch.Tensor, gram: torch.Tensor) -> Moments:
        return cls(count, mean, gram - count[:, None, None] * (mean[:, :, None] * mean[:, None, :]))

    def select(self, rows: torch.Tensor | slice) -> Moments:
        return Moments(self.count[rows], self.mean[rows], self.m2[rows])


def moments_of(x: torch.Tensor, labels: torch.Tensor, n_classes: int) -> Moments:
    """Exact float64 moments of rows x (n, d) with labels in [0, n_classes): a reference, for tests and oracles."""
    x = x.to(torch.float64)
    d = x.shape[1]
    count = torch.zeros(n_classes, dtype=torch.float64)
    mean = torch.zeros(n_classes, d, dtype=torch.float64)
    m2 = torch.zeros(n_classes, d, d, dtype=torch.float64)
    for c in range(n_classes):
        xc = x[labels == c]
        count[c] = len(xc)
        if len(xc):
            mean[c] = xc.mean(0)
            diff = xc - mean[c]
            m2[c] = diff.T @ diff
    return Moments(count, mean, m2)


class DriftMap(Protocol):
    """A fitted compensation of one task: old classes' statistics (and features) into the new space."""

    info: dict  # what the fit found (recorded with the map)

    def apply(self, stats: Moments, classes: torch.Tensor) -> Moments:
        """The statistics of `classes` (label ids, one per row of `stats`) in the new backbone's space."""
        ...

    def apply_features(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Features of old classes `labels` in the new space, or None if the map acts on statistics only."""
        ...

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that restore the map (`restore` of its spec)."""
        ...


def symmetric(m: torch.Tensor) -> torch.Tensor:
    return (m + m.transpose(-1, -2)) * 0.5


# --- linear: SLDC alpha-1 -----------------------------------------------------------------------------


@dataclass
class LinearMap:
    """y = x W for every class: mu W, W^T M2 W (exact), features x W."""

    w: torch.Tensor  # (d, d) float64
    info: dict = field(default_factory=dict)

    def apply(self, stats: Moments, classes: torch.Tensor) -> Moments:
        w = self.w.to(stats.mean)
        return Moments(stats.count, stats.mean @ w, symmetric(w.T @ stats.m2 @ w))

    def apply_features(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float64) @ self.w.to(x.device)).to(x.dtype)

    def state(self) -> dict[str, torch.Tensor]:
        return {"w": self.w}


def linear_map(x_old: torch.Tensor, x_new: torch.Tensor, settings: LinearConfig) -> torch.Tensor:
    """SLDC alpha-1's W (d, d), float64: ridge solve, then (1 - w) W_ls + w I with w = exp(-N / (alpha_t d))."""
    a, b = x_old.to(torch.float64), x_new.to(torch.float64)
    if settings.normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    n, d = a.shape
    eye = torch.eye(d, dtype=torch.float64, device=a.device)
    w_ls = torch.linalg.solve(a.T @ a + settings.gamma1 * eye, a.T @ b)
    shrink = math.exp(-n / (settings.alpha_t * d))
    return (1 - shrink) * w_ls + shrink * eye


def _norm_ratio(x_old: torch.Tensor, x_new: torch.Tensor) -> float:
    """mean ||y|| / ||x|| over the pairs: whether a map fitted on unit rows may act on raw statistics."""
    return float((x_new.double().norm(dim=1) / x_old.double().norm(dim=1).clamp(min=1e-12)).mean())


def fit_linear(x_old, x_new, stats, classes, settings: LinearConfig, generator=None) -> LinearMap:
    w = linear_map(x_old, x_new, settings)
    return LinearMap(w, {"pairs": len(x_old), "shrink": math.exp(-len(x_old) / (settings.alpha_t * w.shape[0])),
                         "norm_ratio": _norm_ratio(x_old, x_new)})  # fmt: skip


# --- sdc: semantic drift compensation (as SSIAT / RSIAT use it) --------------------------------------------


@dataclass
class ShiftMap:
    """mu_c <- mu_c + delta_c per class; M2 unchanged; features of class c shifted by delta_c."""

    classes: torch.Tensor  # (C,) label ids
    delta: torch.Tensor  # (C, d) float64
    info: dict = field(default_factory=dict)

    def _rows(self, classes: torch.Tensor) -> torch.Tensor:
        index = {int(c): i for i, c in enumerate(self.classes.tolist())}
        return torch.tensor([index[int(c)] for c in classes.tolist()], dtype=torch.int64)

    def apply(self, stats: Moments, classes: torch.Tensor) -> Moments:
        d = self.delta[self._rows(classes)].to(stats.mean)
        return Moments(stats.count, stats.mean + d, stats.m2)

    def apply_features(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return x + self.delta[self._rows(labels)].to(x)

    def state(self) -> dict[str, torch.Tensor]:
        return {"classes": self.classes, "delta": self.delta}


def sdc_shift(
    x_old: torch.Tensor, x_new: torch.Tensor, means: torch.Tensor, sigma: float, floor: float
) -> torch.Tensor:
    """(C, d) drift of each mean: sum_i w_ic (y2_i - y1_i) / sum_i w_ic, w_ic = exp(-||y1_i - mu_c||^2 / 2 sigma^2) + floor."""
    y1, y2, mu = x_old.to(torch.float64), x_new.to(torch.float64), means.to(torch.float64)
    dist2 = (mu * mu).sum(1)[:, None] - 2 * mu @ y1.T + (y1 * y1).sum(1)[None, :]  # (C, N)
    w = torch.exp(-dist2.clamp(min=0) / (2 * sigma**2)) + floor
    return (w @ (y2 - y1)) / w.sum(1, keepdim=True)


def fit_sdc(x_old, x_new, stats: Moments, classes, settings: SDCConfig, generator=None) -> ShiftMap:
    delta = sdc_shift(x_old, x_new, stats.mean, settings.sigma, settings.floor)
    return ShiftMap(
        classes.clone(), delta, {"pairs": len(x_old), "mean_shift_norm": float(delta.norm(dim=1).mean())}
    )


# --- dpcr: dual projection -------------------------------------------------------------------------------


@dataclass
class DPCRMap:
    """W_c = P Pi_c per old class c: mu_c W_c and W_c^T G_c W_c (M2 from the Gram); features of class c: x W_c.

    Pi_c projects onto the span of class c's Gram in the previous space (`gram`), computed per class
    when used, so no (C, d, d) stack of maps is held.
    """

    classes: torch.Tensor  # (C,) label ids of the old classes
    p: torch.Tensor  # (d, d) float64: the task-wise ridge map
    gram: torch.Tensor  # (C, d, d) float64: the old classes' Grams before this map
    tolerance: float
    info: dict = field(default_factory=dict)

    def _index(self, classes: torch.Tensor) -> list[int]:
        index = {int(c): i for i, c in enumerate(self.classes.tolist())}
        return [index[int(c)] for c in classes.tolist()]

    def class_map(self, row: int) -> torch.Tensor:
        """(d, d) W_c of the class at `row` of `classes`."""
        return self.p @ span_projection(self.gram[row : row + 1], self.tolerance)[0]

    def apply(self, stats: Moments, classes: torch.Tensor) -> Moments:
        gram = stats.gram()
        means, grams = [], []
        for k, row in enumerate(self._index(classes)):
            w = self.class_map(row).to(stats.mean)
            means.append(stats.mean[k] @ w)
            grams.append(symmetric(w.T @ gram[k] @ w))
        return Moments.from_gram(stats.count, torch.stack(means), torch.stack(grams))

    def apply_features(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        for c in labels.unique().tolist():
            sel = labels == c
            w = self.class_map(self._index(torch.tensor([c]))[0]).to(x.device)
            out[sel] = (x[sel].to(torch.float64) @ w).to(x.dtype)
        return out

    def state(self) -> dict[str, torch.Tensor]:
        return {"classes": self.classes, "p": self.p}


def span_projection(gram: torch.Tensor, tolerance: float) -> torch.Tensor:
    """(C, d, d) projection onto the span of each Gram's singular vectors above tolerance * the largest."""
    evals, vecs = torch.linalg.eigh(symmetric(gram.to(torch.float64)))  # ascending; a Gram is PSD
    keep = evals > (tolerance * evals[:, -1:]).clamp(min=0) if tolerance > 0 else evals > 0
    v = vecs * keep[:, None, :].to(vecs.dtype)
    return v @ v.transpose(1, 2)


def dpcr_shift(x_old: torch.Tensor, x_new: torch.Tensor, rho: float, relative: bool = False) -> torch.Tensor:
    """DPCR's task-wise map P = solve(X_old^T X_old + r I, X_old^T X_new), raw features, float64;
    r = rho, or rho * mean(diag X_old^T X_old) when `relative`."""
    a, b = x_old.to(torch.float64), x_new.to(torch.float64)
    gram = a.T @ a
    r = rho * float(torch.diagonal(gram).mean()) if relative else rho
    return torch.linalg.solve(gram + r * torch.eye(a.shape[1], dtype=torch.float64, device=a.device), a.T @ b)


def fit_dpcr(x_old, x_new, stats: Moments, classes, settings: DPCRConfig, generator=None) -> DPCRMap:
    p = dpcr_shift(x_old, x_new, settings.rho, settings.relative)
    return DPCRMap(classes.clone(), p, stats.gram(), settings.tolerance, {"pairs": len(x_old)})


# --- weak_nonlinear: SLDC alpha-2 ---------------------------------------------------------------------------


class WeakNonlinear(torch.nn.Module):
    """g(u) = s0 u + s1 A u + s2 MLP(u), s = softmax(a), a = [1, 0, 0] at the start, A = I."""

    def __init__(self, d: int):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))
        self.lin = torch.nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(d))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.ReLU(), torch.nn.Linear(d, d))

    def mix(self) -> torch.Tensor:
        return torch.softmax(self.a, dim=0)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        s = self.mix()
        return s[0] * u + s[1] * self.lin(u) + s[2] * self.mlp(u)


@dataclass
class NonlinearMap:
    """Features: y = g(x / ||x||) ||x||. Statistics: re-estimated from K mapped samples of each class's Gaussian."""

    g: WeakNonlinear
    samples_per_dim: int
    seed: int
    info: dict = field(default_factory=dict)

    def apply_features(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            xf = x.float()
            norm = xf.norm(dim=1, keepdim=True)
            return (self.g(xf / norm.clamp(min=1e-12)) * norm).to(x.dtype)

    def apply(self, stats: Moments, classes: torch.Tensor) -> Moments:
        d = stats.mean.shape[1]
        k = self.samples_per_dim * d
        gen = torch.Generator().manual_seed(self.seed)
        means, m2s = [], []
        for c in range(len(stats.count)):
            n = float(stats.count[c])
            cov = stats.m2[c] / max(n - 1, 1.0)
            evals, vecs = torch.linalg.eigh(symmetric(cov))
            root = vecs * evals.clamp(min=0).sqrt()[None, :]  # cov = root root^T (PSD, no jitter)
            z = torch.randn(k, d, generator=gen, dtype=torch.float64)
            y = self.apply_features(stats.mean[c] + z @ root.T, torch.full((k,), int(classes[c]))).to(
                torch.float64
            )
            mu = y.mean(0)
            diff = y - mu
            means.append(mu)
            m2s.append(symmetric(diff.T @ diff / (k - 1) * max(n - 1, 1.0)))  # keep n: M2 = (n - 1) Sigma
        return Moments(stats.count, torch.stack(means), torch.stack(m2s))

    def state(self) -> dict[str, torch.Tensor]:
        extra = {"seed": torch.tensor(self.seed), "samples_per_dim": torch.tensor(self.samples_per_dim)}
        return {**{f"g.{k}": v.detach() for k, v in self.g.state_dict().items()}, **extra}


def fit_weak_nonlinear(x_old, x_new, stats, classes, settings: WeakNonlinearConfig,
                       generator: torch.Generator | None = None) -> NonlinearMap:  # fmt: skip
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    a, b = F.normalize(x_old.float(), dim=1), F.normalize(x_new.float(), dim=1)
    n, d = a.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        g = WeakNonlinear(d)
    opt = torch.optim.Adam(g.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.steps, eta_min=settings.lr_min)
    for _ in range(settings.steps):
        rows = torch.randint(0, n, (settings.batch,), generator=gen)
        loss = F.mse_loss(g(a[rows]), b[rows])
        if settings.regularize:
            loss = loss + settings.gamma2 * g.mix()[2] ** 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return NonlinearMap(g.eval(), settings.samples_per_dim, seed, {"pairs": n, "mix": g.mix().tolist()})


# --- ldc: a learned linear projector ----------------------------------------------------------------------


@dataclass
class MeanMap:
    """mu_c <- mu_c W for every class, M2 unchanged (LDC moves prototypes only); features x W."""

    w: torch.Tensor  # (d, d) float64
    info: dict = field(default_factory=dict)

    def apply(self, stats: Moments, classes: torch.Tensor) -> Moments:
        return Moments(stats.count, stats.mean @ self.w.to(stats.mean), stats.m2)

    def apply_features(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float64) @ self.w.to(x.device)).to(x.dtype)

    def state(self) -> dict[str, torch.Tensor]:
        return {"w": self.w}


def fit_ldc(
    x_old, x_new, stats, classes, settings: LDCConfig, generator: torch.Generator | None = None
) -> MeanMap:
    """LDC: a bias-free Linear(d, d) trained by Adam on MSE(p(x_old), x_new), raw features, `epochs` shuffled passes."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    a, b = x_old.float(), x_new.float()
    n, d = a.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        p = torch.nn.Linear(d, d, bias=False)
    if settings.init == "identity":
        with torch.no_grad():
            p.weight.copy_(torch.eye(d))
    opt = torch.optim.Adam(p.parameters(), lr=settings.lr)
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, settings.batch):
            rows = order[start : start + settings.batch]
            loss = F.mse_loss(p(a[rows]), b[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        mse = float(F.mse_loss(p(a), b))
    return MeanMap(
        p.weight.detach().double().T.contiguous(), {"pairs": n, "mse": mse}
    )  # y = x W, W = weight^T


# --- registry and composition -----------------------------------------------------------------------------


def restore_linear(state: dict, stats: Moments, settings: LinearConfig) -> LinearMap:
    return LinearMap(state["w"])


def restore_sdc(state: dict, stats: Moments, settings: SDCConfig) -> ShiftMap:
    return ShiftMap(state["classes"], state["delta"])


def restore_dpcr(state: dict, stats: Moments, settings: DPCRConfig) -> DPCRMap:
    return DPCRMap(state["classes"], state["p"], stats.gram(), settings.tolerance)


def restore_weak_nonlinear(state: dict, stats: Moments, settings: WeakNonlinearConfig) -> NonlinearMap:
    g = WeakNonlinear(int(stats.mean.shape[1]))
    g.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("g.")})
    return NonlinearMap(g.eval(), int(state["samples_per_dim"]), int(state["seed"]))


def restore_ldc(state: dict, stats: Moments, settings: LDCConfig) -> MeanMap:
    return MeanMap(state["w"])


def compose(stats: Moments, classes: torch.Tensor, maps: Sequence[DriftMap]) -> Moments:
    """`stats` of `classes` moved by each map in order (the maps of the tasks after the classes' own)."""
    for m in maps:
        stats = m.apply(stats, classes)
    return stats


def compose_features(x: torch.Tensor, labels: torch.Tensor, maps: Sequence[DriftMap]) -> torch.Tensor:
    """Features of old classes moved by each map in order; a map that acts on statistics only is an error."""
    for m in maps:
        y = m.apply_features(x, labels)
        if y is None:
            raise ValueError(f"{type(m).__name__} moves statistics only, not features")
        x = y
    return x
