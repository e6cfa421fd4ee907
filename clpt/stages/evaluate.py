"""The eval stage (the method's own classifier) and the head stages.

Both score task T's cached test features over all seen classes and write row T
of their accuracy matrix (`eval.json`, `heads/NAME.json`); `clpt.stages.results`
reads the rows back into the matrices and metrics of `clpt eval --json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import torch

from clpt import artifacts, checkpoint
from clpt import distributed as dist
from clpt.errors import ClptError, Redo
from clpt.evaluate import accuracy_row
from clpt.heads import HEADS, restore_parts, score_in_chunks
from clpt.io import write_bytes
from clpt.stages.base import StageContext
from clpt.stages.graph import classifier, head_name
from clpt.stages.heads import RunCache

_ROW_KEYS = ("accuracy", "top5", "per_task", "per_task_n", "n_test", "task")


def run(ctx: StageContext) -> tuple[list[Path], dict]:
    """The method's own classifier (aligned heads, or a statistics head) on task T's test features."""
    t = ctx.task
    out = artifacts.eval_path(ctx.root, t)
    if not dist.is_main():
        return [out], {}
    own = classifier(ctx.cfg)
    if own is not None:  # a statistics head is the method's classifier: its row is the method's row
        row = artifacts.read_eval(artifacts.head_eval_path(ctx.root, own, t), "clpt-head-eval",
                                  ctx.redo(f"head:{own}", t))  # fmt: skip
        row = {k: row[k] for k in _ROW_KEYS if k in row}
        artifacts.write_eval(out, row, "clpt-eval")
        return [out], {"accuracy": row["accuracy"], "classifier": own}
    heads = checkpoint.load_aligned_heads(artifacts.aligned_path(ctx.root, t), ctx.redo("align", t))
    x, y = artifacts.read_features(ctx.root, t, "test")
    with torch.no_grad():
        logits = heads(x)
    row = accuracy_row(logits, y, ctx.tasks[: t + 1])
    row["task"] = t
    artifacts.write_eval(out, row, "clpt-eval")
    return [out], {"accuracy": row["accuracy"]}


def run_head(name: str, ctx: StageContext) -> tuple[list[Path], dict]:
    """Head `name`: fit from the run's cache, score task T's cached test features."""
    t = ctx.task
    out = artifacts.head_eval_path(ctx.root, name, t)
    base, compensated = head_name(name)
    spec = HEADS.get(base)
    # a sharded head fits on every rank, each from its own share of the rows; the others on rank 0
    shard = (dist.rank(), dist.world_size()) if spec.sharded else (0, 1)
    if not dist.is_main() and shard[1] == 1:
        return [out], {}
    device = dist.resolve_device(ctx.cfg.system.device)
    label = f"task {t} head:{name}" if dist.is_main() else ""
    cache = RunCache(ctx.root, ctx.cfg, t, ctx.tasks, device, label=label, compensated=compensated, shard=shard)
    t0 = time.perf_counter()
    settings = ctx.cfg.heads.of(base)
    state = spec.fit(cache, settings)
    fit_s = time.perf_counter() - t0
    if not dist.is_main():
        return [out], {}
    scorer, base_sha = state, None
    if state.first_class:  # the classes of task t alone: scored after the previous task's state, joined
        def redo(k: int) -> Redo:
            return Redo(f"head:{name}", k, str(ctx.root), force=True)

        parts, _ = artifacts.read_head_parts(ctx.root, name, t - 1, redo)
        base_sha = artifacts.file_sha256(artifacts.head_state_path(ctx.root, name, t - 1))
        scorer = restore_parts(base, [*parts, state.tensors()], state.meta()).to(device)
    x, y = artifacts.read_features(ctx.root, t, "test")
    logits = score_in_chunks(scorer, x, device)
    if not bool(torch.isfinite(logits).all()):  # a NaN head would score as one class: never recorded
        raise ClptError(
            f"head {name} of task {t} gives non-finite scores",
            hint=f"check the settings it was fitted with (clpt config {ctx.root}), correct them and run again",
        )
    row = accuracy_row(logits, y, ctx.tasks[: t + 1])
    info = state.info
    row.update(task=t, head=name, fit_seconds=round(fit_s, 4), **({"fit": info} if info else {}))
    state_path = artifacts.head_state_path(ctx.root, name, t)
    carry = None
    if state.carry and not compensated:  # written first: the state's sha256 of it ties the two together
        # (a compensated head refits every task: nothing continues from its carry)
        data = artifacts.head_carry_bytes(name, t, state.carry)
        carry = hashlib.sha256(data).hexdigest()
        write_bytes(artifacts.head_carry_path(ctx.root, name, t), data)
    artifacts.save_head_state(state_path, name, t, cache.n_seen, state.tensors(), state.meta(),
                              dataclasses.asdict(settings), info, carry, state.first_class, base_sha)  # fmt: skip
    artifacts.write_eval(out, row, fmt="clpt-head-eval")
    if carry is not None and t > 0:  # the previous task's carry is superseded (a Gram can be 800 MB): the latest alone is kept
        artifacts.head_carry_path(ctx.root, name, t - 1).unlink(missing_ok=True)
    return [out, state_path], {"accuracy": row["accuracy"], "fit_seconds": round(fit_s, 4)}
