"""Drift compensation methods, registered by name: each one's settings and, named lazily, its code.

This module imports no torch: resolving a run's config (`drift.method`,
`drift.NAME.*`) reads only these declarations. The maps themselves are in
`clpt.drift` (docs/methods/drift.md), imported when a map is fitted or restored.

Adding a method: a settings dataclass and one `register_drift(DriftSpec(...))` here,
naming its `fit(x_old, x_new, stats, classes, settings, generator) -> DriftMap` and its
`restore(state, stats, settings)` (in `clpt.drift` or a module of your own).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clpt.config import checks, one_of
from clpt.registry import Registry, lazy


@dataclass(frozen=True)
class DriftSpec:
    name: str
    summary: str
    config_cls: type
    # (x_old, x_new, stats of the old classes, their ids, settings, generator) -> DriftMap
    fit: Callable[..., Any]
    # (state, the old classes' statistics the map was fitted with, settings) -> the same map
    restore: Callable[..., Any]


DRIFT_METHODS: Registry[DriftSpec] = Registry("drift method")


def register_drift(spec: DriftSpec) -> DriftSpec:
    return DRIFT_METHODS.register(spec.name, spec)


def _code(name: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """fit_NAME and restore_NAME of `clpt.drift`, imported on first call."""
    return lazy("clpt.drift", f"fit_{name}"), lazy("clpt.drift", f"restore_{name}")


@dataclass
class LinearConfig:
    gamma1: float = 1e-4  # ridge of the least-squares fit
    alpha_t: float = 1.0  # shrinkage toward I: w = exp(-N / (alpha_t d))
    normalize: bool = True  # fit on L2-normalised rows (SLDC); false: on raw rows

    def problems(self) -> list[str]:
        return checks(
            self, [("alpha_t", lambda v: v > 0, "must be > 0"), ("gamma1", lambda v: v >= 0, "must be >= 0")]
        )


@dataclass
class SDCConfig:
    sigma: float = 4.0  # kernel width on raw features (SSIAT, RSIAT)
    floor: float = 1e-5  # added to every weight (SSIAT, RSIAT); 0 as the original SDC

    def problems(self) -> list[str]:
        return checks(
            self, [("sigma", lambda v: v > 0, "must be > 0"), ("floor", lambda v: v >= 0, "must be >= 0")]
        )


@dataclass
class DPCRConfig:
    rho: float = 1e-4  # ridge of the task-wise shift; theirs (rg_tssp): 1e-9, absolute
    relative: bool = True  # rho times mean(diag X_old^T X_old): scale-free, as SLDC's ridge (theirs: false)
    tolerance: float = 0.0  # 0: singular values > 0 (their code); > 0: above tolerance * the largest

    def problems(self) -> list[str]:
        return checks(self, [(k, lambda v: v >= 0, "must be >= 0") for k in ("rho", "tolerance")])


@dataclass
class WeakNonlinearConfig:
    steps: int = 5000  # Adam steps
    batch: int = 32  # rows per step, drawn with replacement
    lr: float = 1e-3  # cosine to lr_min
    lr_min: float = 5e-4
    gamma2: float = 0.5  # weight of R = s2^2
    regularize: bool = False  # false: MSE alone (their code); true: MSE + gamma2 R (their intent)
    samples_per_dim: int = 10  # K = samples_per_dim * d samples per class for the update

    def problems(self) -> list[str]:
        rules = [(k, lambda v: v >= 1, "must be >= 1") for k in ("steps", "batch", "samples_per_dim")]
        rules += [(k, lambda v: v > 0, "must be > 0") for k in ("lr", "lr_min")]
        return checks(self, [*rules, ("gamma2", lambda v: v >= 0, "must be >= 0")])


@dataclass
class LDCConfig:
    epochs: int = 20  # passes over the task's pairs
    batch: int = 128
    lr: float = 1e-3  # Adam
    init: str = "random"  # random: PyTorch's default Linear init, as their code | identity: the safer start

    def problems(self) -> list[str]:
        rules = [(k, lambda v: v >= 1, "must be >= 1") for k in ("epochs", "batch")]
        return checks(
            self, [*rules, ("lr", lambda v: v > 0, "must be > 0"), ("init", *one_of("random", "identity"))]
        )


register_drift(DriftSpec("linear", "SLDC alpha-1: ridge map shrunk toward I", LinearConfig, *_code("linear")))
register_drift(DriftSpec("weak_nonlinear", "SLDC alpha-2: identity + linear + MLP", WeakNonlinearConfig,
                         *_code("weak_nonlinear")))  # fmt: skip
register_drift(DriftSpec("sdc", "SDC: kernel-weighted mean shift (SSIAT, RSIAT)", SDCConfig, *_code("sdc")))
register_drift(DriftSpec("dpcr", "DPCR: task-wise ridge map times per-class projection", DPCRConfig,
                         *_code("dpcr")))  # fmt: skip
register_drift(
    DriftSpec("ldc", "LDC: a linear projector learned by Adam; means only", LDCConfig, *_code("ldc"))
)
