"""`ca`: SLCA / SLCA++ Classifier Alignment (docs/methods/slca.md, stage 3) as a head.

With a method that aligns (slca, slca_pp, frozen_ca) this is the align stage's
output, read back. With one that does not (seqft, seqft_sl), the head aligns the
trained heads itself, with the run's `align.*` settings, from the class
statistics: so CA can be compared on any backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

from clpt.align import align_on_stats
from clpt.heads.base import HeadCache, HeadSpec, TaskHeadScores, register_head, stats_upto
from clpt.learners import LEARNERS
from clpt.methods import METHODS

# what the alignment reads from the config (the align stage declares the same keys)
ALIGN_KEYS = ("align", "train.weight_decay", "seed", "stats.ridge")


@dataclass
class CAHeadConfig:
    """Settings live in `align.*` (shared with the align stage)."""


def fit(ctx: HeadCache, settings: CAHeadConfig) -> TaskHeadScores:
    if ctx.cfg.align_enabled and not ctx.compensated:
        return TaskHeadScores(ctx.aligned_heads().to(ctx.device))
    heads = (
        ctx.trained_heads()
    )  # aligned here: on compensated statistics, or for a method that does not align
    if ctx.task > 0 or aligns_first_task(ctx.cfg):
        align_on_stats(heads, ctx.class_stats(), ctx.task, ctx.cfg, ctx.device, label=ctx.label)
    return TaskHeadScores(heads.to(ctx.device))


def inputs(cfg, t: int) -> list[tuple[str, int]]:
    if cfg.align_enabled:
        return [("align", t)]
    return _own_inputs(cfg, t)


def aligns_first_task(cfg) -> bool:
    """Task 0 is aligned too: when asked (SLDC), or when the learner never trains its task heads
    (SimpleCIL, RanPAC, MIST: the heads would otherwise score as initialised, at chance)."""
    return bool(cfg.align.first_task) or not LEARNERS.get(METHODS.get(cfg.method).learner).trains_heads


def _own_inputs(cfg, t: int) -> list[tuple[str, int]]:
    return [("train", t), *(stats_upto(t) if t > 0 or aligns_first_task(cfg) else [])]


register_head(
    HeadSpec(
        "ca",
        "classifier alignment on Gaussian samples (SLCA / SLCA++)",
        CAHeadConfig,
        fit,
        inputs=inputs,
        config_keys=lambda cfg: () if cfg.align_enabled else ALIGN_KEYS,
        drift_inputs=_own_inputs,
        drift_config_keys=lambda cfg: ALIGN_KEYS,
    )
)
