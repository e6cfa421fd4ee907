"""The fit-stats stage: per-class sufficient statistics of task t's cached training features."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from clpt import artifacts
from clpt import distributed as dist
from clpt.stages.base import StageContext
from clpt.stats import fit_class_stats

log = logging.getLogger("clpt")


def run(ctx: StageContext) -> tuple[list[Path], dict]:
    t = ctx.task
    classes = range(*ctx.tasks[t])
    out = artifacts.stats_path(ctx.root) / artifacts.stats_group(t)
    if not dist.is_main():  # one rank reduces; the feature store is on shared disk
        return [out], {}
    feats, _ = artifacts.open_features(ctx.root, t, "train")
    device = dist.resolve_device(ctx.cfg.system.device)  # CUDA -> the Triton kernel, CPU -> BLAS
    chunks = artifacts.iter_feature_chunks(
        ctx.root, t, "train", ctx.cfg.stats.chunk_rows, f"task {t} fit-stats"
    )
    m = fit_class_stats(chunks, classes, feats.shape[1], device, ctx.cfg.stats.kernel_precision)
    counts = m.count.to(torch.int64).tolist()
    few = [classes.start + i for i, k in enumerate(counts) if k < 2]
    if few:
        log.warning("task %d: classes %s have fewer than 2 training rows: covariance is ridge * I", t, few)
    artifacts.save_stats(
        ctx.root, t, classes, m.count.cpu().numpy(), m.mean.cpu().numpy(), m.m2.cpu().numpy(),
        ctx.input_id("extract", t),
    )  # fmt: skip
    return [out], {"classes": len(classes), "rows": int(sum(counts)), "min_count": int(min(counts))}
