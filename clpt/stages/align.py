"""The align stage: Classifier Alignment of task t's heads on the class statistics of tasks 0..t."""

from __future__ import annotations

from pathlib import Path

from clpt import artifacts, checkpoint
from clpt import distributed as dist
from clpt.align import align_on_stats
from clpt.stages.base import StageContext
from clpt.stages.heads import RunCache


def run(ctx: StageContext) -> tuple[list[Path], dict]:
    cfg, t = ctx.cfg, ctx.task
    out = artifacts.aligned_path(ctx.root, t)
    heads = checkpoint.load_trained_heads(artifacts.model_path(ctx.root, t), ctx.redo("train", t))
    if (t == 0 and not cfg.align.first_task) or not cfg.align_enabled:
        reason = "first task" if t == 0 else f"method {cfg.method} has no alignment"
        if dist.is_main():
            checkpoint.save_heads(out, heads, t)
        return [out], {"aligned": False, "reason": reason}
    device = dist.resolve_device(cfg.system.device)
    stats = RunCache(ctx.root, cfg, t, ctx.tasks, device).class_stats()
    losses = align_on_stats(heads, stats, t, cfg, device, label=f"task {t} align")
    if dist.is_main():
        checkpoint.save_heads(out, heads.cpu(), t)
    return [out], {"aligned": True, "epoch_loss": [round(v, 6) for v in losses]}
