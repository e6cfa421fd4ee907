"""The pairs stage: task t's training images through the previous backbone (the paired features of drift compensation).

Rows are the task's training rows in the order of its cached training features
(`extract.rows_of`), with the same test transform, so row i of
`features.zarr/task_{t}/pairs` and of `features.zarr/task_{t}/train` are the same
image under theta_{t-1} and theta_t (docs/methods/drift.md). Resumable like
extraction. Task 0 needs none: its previous backbone is the pre-trained one,
whose statistics no class has.
"""

from __future__ import annotations

import time
from pathlib import Path

from clpt import artifacts, checkpoint
from clpt import distributed as dist
from clpt.precision import resolve as resolve_precision
from clpt.stages.base import StageContext
from clpt.stages.extract import extract_rows, rows_of


def run(ctx: StageContext) -> tuple[list[Path], dict]:
    t, cfg = ctx.task, ctx.cfg
    if t == 0:
        return [], {"rows": 0, "reason": "first task: no earlier class to compensate"}
    device = dist.resolve_device(cfg.system.device)
    bench = ctx.benchmark()
    model = checkpoint.load_model(
        artifacts.model_path(ctx.root, t - 1), cfg, device, ctx.redo("train", t - 1)
    )
    prec = resolve_precision(cfg.system.precision, device)
    t0 = time.perf_counter()
    rows = rows_of(bench.train, bench.tasks[t])
    n = extract_rows(ctx, model, bench, bench.train, rows, artifacts.PAIRS, ctx.input_id("train", t - 1), device,
                     prec, t - 1)  # fmt: skip
    seconds = time.perf_counter() - t0
    out = artifacts.features_path(ctx.root) / artifacts.feature_group(t, artifacts.PAIRS)
    return [out], {"rows": n, "images_per_second": round(n / max(seconds, 1e-9), 1), "precision": prec}
