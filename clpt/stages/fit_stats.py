"""The fit-stats stage: per-class sufficient statistics of task t's cached training features."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from clpt import artifacts
from clpt import distributed as dist
from clpt.stages.base import StageContext
from clpt.stats import compress, fit_class_stats, merge_ranks

log = logging.getLogger("clpt")


def run(ctx: StageContext) -> tuple[list[Path], dict]:
    """Under torchrun every rank reduces its own share of the rows (`artifacts.shard_rows`) and the ranks'
    moments are merged exactly (`clpt.stats.merge_ranks`); rank 0 writes them."""
    t = ctx.task
    classes = range(*ctx.tasks[t])
    out = artifacts.stats_path(ctx.root) / artifacts.stats_group(t)
    feats, _ = artifacts.open_features(ctx.root, t, "train")
    device = dist.resolve_device(ctx.cfg.system.device)  # CUDA -> the Triton kernel, CPU -> BLAS
    shard = (dist.rank(), dist.world_size())
    label = f"task {t} fit-stats" if dist.is_main() else ""
    chunks = artifacts.iter_feature_chunks(ctx.root, t, "train", ctx.cfg.stats.chunk_rows, label, shard)
    mine = fit_class_stats(chunks, classes, feats.shape[1], device, ctx.cfg.stats.kernel_precision)
    rows_read = [int(n) for n in dist.all_gather(mine.count.sum().reshape(1))]
    m = merge_ranks(mine)
    if not dist.is_main():
        return [out], {}
    counts = m.count.to(torch.int64).tolist()
    few = [classes.start + i for i, k in enumerate(counts) if k < 2]
    if few:
        log.warning("task %d: classes %s have fewer than 2 training rows: covariance is ridge * I", t, few)
    st = ctx.cfg.stats
    m2 = m.m2.cpu()
    scatter = compress(m2, st.covariance, st.rank)  # the full form is m2 itself
    artifacts.save_stats(ctx.root, t, classes, m.count.cpu().numpy(), m.mean.cpu().numpy(), scatter,
                         ctx.input_id("extract", t), pooled=m2.sum(0))  # fmt: skip
    summary: dict = {"classes": len(classes), "rows": int(sum(counts)), "min_count": int(min(counts)),
                     "covariance": st.covariance, "scatter_bytes": scatter.nbytes()}  # fmt: skip
    if len(rows_read) > 1:
        summary["rows_per_rank"] = rows_read  # each rank read its own share of the rows, and only that
    return [out], summary
