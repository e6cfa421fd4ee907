"""The train stage: the learner of the run's method on task t, from task t-1's model."""

from __future__ import annotations

from pathlib import Path

from clpt import artifacts, checkpoint
from clpt import distributed as dist
from clpt.errors import DataError
from clpt.learners import LEARNERS
from clpt.methods import METHODS
from clpt.seeding import seed_everything, task_seed
from clpt.stages.base import StageContext
from clpt.train import initial_model


def _same_weights(ctx: StageContext, record: dict) -> None:
    """Task 0 redone: the pre-trained weights are those the run started from (`backbone.json`), whatever
    their source (the hub's cache, a checkpoint file, the built-in cache), or a DataError."""
    if not artifacts.run_record_path(ctx.root, "clpt-backbone-record").is_file():
        return
    before = artifacts.read_record(ctx.root, "clpt-backbone-record")
    if before.get("sha256") not in (None, record["sha256"]):
        raise DataError(
            f"the pre-trained weights ({record['source']}) are not those the run started from: their digest "
            f"{record['sha256'][:12]}... differs from backbone.json's {str(before['sha256'])[:12]}...",
            hint="restore the weights the run was created with, or start a new run folder for these",
        )


def run(ctx: StageContext) -> tuple[list[Path], dict]:
    """Task t's model: the pre-trained backbone at t = 0 (its weights recorded), else task t-1's."""
    cfg, t = ctx.cfg, ctx.task
    seed_everything(task_seed(cfg.seed, t), cfg.system.deterministic)
    device = dist.resolve_device(cfg.system.device)
    bench = ctx.benchmark()
    extra: dict = {}
    if t == 0:
        model, record = initial_model(cfg, device)
        _same_weights(ctx, record)
        extra["pretrained"] = record  # which weights the run started from
        if dist.is_main():
            artifacts.write_record(ctx.root, "clpt-backbone-record", record)
        learner_state: dict = {}
    else:
        prev, redo = artifacts.model_path(ctx.root, t - 1), ctx.redo("train", t - 1)
        ckpt = checkpoint.read_model(prev, redo)
        model = checkpoint.model_from(ckpt, prev, cfg, device, redo)
        learner_state = ckpt.get("learner_state", {})
    summary = LEARNERS.get(METHODS.get(cfg.method).learner).train(model, bench, cfg, t, device, learner_state)
    if learner_state:  # e.g. MIST's projection head and masks, for the next task
        extra["learner_state"] = learner_state
    summary.update({k: v for k, v in extra.items() if k != "learner_state"})
    out = artifacts.model_path(ctx.root, t)
    if dist.is_main():
        checkpoint.save_model(out, model.backbone, model.heads, cfg.backbone, t, extra)
    return [out], summary
