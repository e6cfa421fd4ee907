"""`ca`: SLCA / SLCA++ Classifier Alignment (docs/methods/slca.md, stage 3) as a head.

With a method that aligns (slca, slca_pp, frozen_ca) this is the align stage's
output, read back. With one that does not (seqft, seqft_sl), the head aligns the
trained heads itself, with the run's `align.*` settings, from the class
statistics: so CA can be compared on any backbone.
"""

from __future__ import annotations

from clpt.align import align_on_stats
from clpt.heads.base import HeadCache, TaskHeadScores
from clpt.heads.registry import ALIGN_KEYS, CAHeadConfig, aligns_first_task  # noqa: F401  (re-exported)


def fit(ctx: HeadCache, settings: CAHeadConfig) -> TaskHeadScores:
    if ctx.cfg.align_enabled and not ctx.compensated:
        return TaskHeadScores(ctx.aligned_heads().to(ctx.device))
    heads = (
        ctx.trained_heads()
    )  # aligned here: on compensated statistics, or for a method that does not align
    if ctx.task > 0 or aligns_first_task(ctx.cfg):
        align_on_stats(heads, ctx.class_stats(), ctx.task, ctx.cfg, ctx.device, label=ctx.label)
    return TaskHeadScores(heads.to(ctx.device))
