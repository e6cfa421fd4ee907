"""The heads, registered by name: what each is called, its settings, what its fit reads.

This module is the heads' registration and nothing heavier: it imports no torch,
so resolving a run's config and checking its stages (`clpt status`, `clpt config`)
never loads the numerical code. Each entry names its fit function and its fitted
state's class lazily (`clpt.registry.lazy`, "module:Class"); the head's module
(`clpt/heads/NAME.py`) holds that code and is imported when a head is fitted or a
saved state is loaded.

Adding a head: one module with its fit function and `HeadState` subclass, and one
`register_head(HeadSpec(...))` here (or in your own code), with its settings dataclass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clpt.config import checks, one_of
from clpt.learners import LEARNERS
from clpt.methods import METHODS
from clpt.registry import Registry, by_name, lazy

if TYPE_CHECKING:
    from clpt.config import RunConfig


@dataclass(frozen=True)
class HeadSpec:
    name: str
    summary: str
    config_cls: type  # dataclass of the head's settings (`heads.NAME.*`)
    fit: Callable[..., Any]  # (HeadCache, settings) -> HeadState (`clpt.heads.base`)
    # stages of task t (besides the test features of t) whose outputs the fit reads
    inputs: Callable[[RunConfig, int], list[tuple[str, int]]]
    # config keys beyond `heads.NAME` that the result depends on
    config_keys: Callable[[RunConfig], tuple[str, ...]] = lambda cfg: ()
    # drift compensation: whether a `NAME+drift` variant exists (fitted on compensated statistics
    # and features), and what it reads where that differs from the plain head (None: the same)
    drift: bool = True
    drift_inputs: Callable[[RunConfig, int], list[tuple[str, int]]] | None = None
    drift_config_keys: Callable[[RunConfig], tuple[str, ...]] | None = None
    # what `fit` returns: a `HeadState` subclass, or "module:Class" imported when first needed;
    # None: `TaskHeadScores` (the learner's task heads)
    state_cls: type | str | None = None
    # the fit reduces what it reads from `train_chunks` across ranks when the cache is sharded (`shard`):
    # under torchrun every rank fits from its own share of the rows; other heads fit on rank 0 alone
    sharded: bool = False

    def state_class(self) -> type:
        """The class of this head's fitted state (imported on first use where registered by name)."""
        cls = self.state_cls or "clpt.heads.base:TaskHeadScores"
        if isinstance(cls, str):  # by name, as the fit: this registry imports no head code
            return by_name(*cls.split(":"))
        return cls


HEADS: Registry[HeadSpec] = Registry("head")


def register_head(spec: HeadSpec) -> HeadSpec:
    return HEADS.register(spec.name, spec)


def stats_upto(t: int) -> list[tuple[str, int]]:
    return [("stats", i) for i in range(t + 1)]


def extracts_upto(t: int) -> list[tuple[str, int]]:
    return [("extract", i) for i in range(t + 1)]


# --- the built-in heads (their code: clpt/heads/NAME.py) ---------------------------------------

# what the alignment reads from the config (the align stage declares the same keys)
ALIGN_KEYS = ("align", "train.weight_decay", "seed", "stats.ridge")


@dataclass
class CAHeadConfig:
    """Settings live in `align.*` (shared with the align stage)."""


def aligns_first_task(cfg) -> bool:
    """Task 0 is aligned too: when asked (SLDC), or when the learner never trains its task heads
    (SimpleCIL, RanPAC, MIST: the heads would otherwise score as initialised, at chance)."""
    return bool(cfg.align.first_task) or not LEARNERS.get(METHODS.get(cfg.method).learner).trains_heads


def _ca_own_inputs(cfg, t: int) -> list[tuple[str, int]]:
    return [("train", t), *(stats_upto(t) if t > 0 or aligns_first_task(cfg) else [])]


def _ca_inputs(cfg, t: int) -> list[tuple[str, int]]:
    return [("align", t)] if cfg.align_enabled else _ca_own_inputs(cfg, t)


register_head(
    HeadSpec(
        "ca",
        "classifier alignment on Gaussian samples (SLCA / SLCA++)",
        CAHeadConfig,
        lazy("clpt.heads.ca", "fit"),
        inputs=_ca_inputs,
        config_keys=lambda cfg: () if cfg.align_enabled else ALIGN_KEYS,
        drift_inputs=_ca_own_inputs,
        drift_config_keys=lambda cfg: ALIGN_KEYS,
    )
)


@dataclass
class FeCAMConfig:
    shrink1: float = 1.0  # a1: times mean(diag S) on the diagonal
    shrink2: float = 0.0  # a2: times mean of the non-zero off-diagonal entries, off the diagonal
    normalize: bool = True  # L2-normalise features (the ViT path)
    tukey: bool = False  # sign(x) |x|^0.5 before normalising (the transform of their ResNet path only)
    dtype: str = "auto"  # the factorisations' precision: auto (float32 where d / shrink1 + 1 <= 2000) | float32 | float64

    def problems(self) -> list[str]:
        rules = [(k, lambda v: v >= 0, "must be >= 0") for k in ("shrink1", "shrink2")]
        return checks(self, [*rules, ("dtype", *one_of("auto", "float32", "float64"))])


register_head(
    HeadSpec(
        "fecam",
        "per-class Mahalanobis on normalised features (FeCAM)",
        FeCAMConfig,
        lazy("clpt.heads.fecam", "fit"),
        # the previous task's fitted state: fecam updates it with task T's classes
        inputs=lambda cfg, t: [("extract", t), *([("head:fecam", t - 1)] if t > 0 else [])],
        drift_inputs=lambda cfg, t: extracts_upto(t),  # compensated: old features move, a full refit
        config_keys=lambda cfg: () if cfg.stats.covariance == "full" else ("stats.covariance", "stats.rank"),
        state_cls="clpt.heads.fecam:FeCAMScores",
        sharded=True,
    )
)


@dataclass
class LDAConfig:
    shrinkage: float = 1e-4  # e in (1 - e) S + e I
    estimator: str = "exact"  # exact: sum_c M2_c / (N - C) | streaming: Hayes & Kanan's per-sample update

    def problems(self) -> list[str]:
        e = self.shrinkage  # None: its type was wrong, reported by the parser
        out = [] if e is None or 0 <= e <= 1 else [f"shrinkage: {e} must be in [0, 1]"]
        if self.estimator not in (None, "exact", "streaming"):
            out.append(f"estimator: {self.estimator!r} must be exact or streaming")
        return out


register_head(
    HeadSpec(
        "lda",
        "LDA, shared shrunk covariance (exact pooled, or the streaming estimate)",
        LDAConfig,
        lazy("clpt.heads.lda", "fit"),
        # task T's statistics (streaming: its features) and the previous task's fit (its carry holds the
        # earlier tasks' sums)
        inputs=lambda cfg, t: [
            ("extract" if cfg.heads.of("lda").estimator == "streaming" else "stats", t),
            *([("head:lda", t - 1)] if t > 0 else []),
        ],  # fmt: skip
        drift_inputs=lambda cfg, t: stats_upto(t),  # compensated: old classes move, a full refit
        state_cls="clpt.heads.lda:LinearScores",
    )
)


@dataclass
class LinearHeadConfig:
    """No settings: the trained heads are used as they are."""


register_head(
    HeadSpec(
        "linear",
        "the trained task heads, before alignment",
        LinearHeadConfig,
        lazy("clpt.heads.linear", "fit"),
        inputs=lambda cfg, t: [("train", t)],
        drift=False,  # the learner's heads: no statistics to compensate
    )
)


@dataclass
class NCMConfig:
    """No settings: cosine similarity to the class means, scale 1."""


register_head(
    HeadSpec(
        "ncm",
        "cosine nearest class mean (SimpleCIL)",
        NCMConfig,
        lazy("clpt.heads.ncm", "fit"),
        # task T's statistics and the previous task's prototypes (which covered every earlier task's)
        inputs=lambda cfg, t: [("stats", t), *([("head:ncm", t - 1)] if t > 0 else [])],
        drift_inputs=lambda cfg, t: stats_upto(t),  # compensated: old classes move, a full refit
        state_cls="clpt.heads.ncm:CosineScores",
    )
)


LAMBDAS = [10.0**k for k in range(-8, 9)]  # 1e-8 .. 1e8, 17 values


@dataclass
class RanPACConfig:
    dim: int = 10000  # M, the random projection's width
    seed: int | None = None  # W_rand's seed; None -> the run's seed
    lambdas: list[float] = field(default_factory=lambda: list(LAMBDAS))
    val_fraction: float = 0.2  # last part of the shuffled current task, for choosing lambda
    dtype: str = "float64"  # Gram and solves: float64 | float32 (the authors')
    chunk_rows: int = 4096  # cached feature rows per Gram update

    def problems(self) -> list[str]:
        out = checks(self, [
            ("dim", lambda v: v >= 1, "must be >= 1"),
            ("lambdas", lambda v: bool(v) and all(x is not None and x > 0 for x in v),
             "must be a non-empty list of positive numbers"),
            ("val_fraction", lambda v: 0 < v < 1, "must be in (0, 1)"),
            ("dtype", *one_of("float64", "float32")),
            ("chunk_rows", lambda v: v >= 1, "must be >= 1"),
        ])  # fmt: skip
        return out


register_head(
    HeadSpec(
        "ranpac",
        "random projection + ridge on the Gram matrix (RanPAC on the learner's backbone)",
        RanPACConfig,
        lazy("clpt.heads.ranpac", "fit"),
        # task T's features and the previous task's fit (its carry holds G and Q of the earlier tasks)
        inputs=lambda cfg, t: [("extract", t), *([("head:ranpac", t - 1)] if t > 0 else [])],
        drift_inputs=lambda cfg, t: extracts_upto(t),  # compensated: old features move, a full refit
        config_keys=lambda cfg: ("seed",),
        state_cls="clpt.heads.ranpac:RanPACScores",
        sharded=True,
    )
)
