"""The extract stage: task t's features in the run's zarr feature store (the on-disk cache).

After training task t, the backbone (eval mode, test transform) maps
- the training images of task t's classes -> `features.zarr/task_{t}/train`
  (input of `fit-stats` and of the heads that read features), and
- the test images of every class seen so far -> `features.zarr/task_{t}/test`
  (input of `eval` and the heads; the backbone changed, so old classes are re-extracted).

Rows are grouped by class. Each chunk's `rows_done` is committed after its data,
so an interrupted extraction resumes from the last committed chunk and never
serves fill values. Plain zarr reads the store:
`zarr.open_group("RUN/features.zarr")["task_000/train/feats"][:]`.

The pairs stage (`clpt.stages.pairs`) writes the same training rows, in the same
order, through the previous backbone, with `extract_rows` below.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from clpt import artifacts, checkpoint
from clpt import distributed as dist
from clpt.data.benchmark import Benchmark, Split
from clpt.errors import DataError
from clpt.features import NonFiniteFeatures, extract_split
from clpt.model import CLModel
from clpt.precision import resolve as resolve_precision
from clpt.stages.base import StageContext

log = logging.getLogger("clpt")


def _writer(ctx: StageContext, split: str, n: int, d: int, source: str, labels_of_rows: np.ndarray
            ) -> artifacts.FeatureWriter:  # fmt: skip
    """The store group of `split` for writing, resumed where an interrupted attempt with `source` stopped."""
    feats: zarr.Array | None = None
    labels: zarr.Array | None = None
    done = 0
    if dist.is_main():
        feats, labels, done = artifacts.prepare_features(
            ctx.root, ctx.task, split, n, d, ctx.cfg.system.feature_chunk_rows, source, ctx.resume, labels_of_rows
        )
    done = dist.broadcast_object(done)
    dist.barrier()
    if not dist.is_main():
        feats, labels = artifacts.open_features_for_append(ctx.root, ctx.task, split)
    assert feats is not None and labels is not None
    return artifacts.FeatureWriter(feats, labels, done, commit_each=dist.world_size() == 1)


def rows_of(split: Split, classes: range) -> np.ndarray:
    """The rows of `classes` in `split`, grouped by class (stable): one slice per class, the same order every time."""
    rows = split.indices_of(classes)
    return rows[np.argsort(split.labels[rows], kind="stable")]


def extract_rows(
    ctx: StageContext, model: CLModel, bench: Benchmark, split: Split, rows: np.ndarray, store_split: str,
    source: str, device: torch.device, precision: str, backbone_task: int,
) -> int:  # fmt: skip
    """Features of `split[rows]` under `model` (the backbone after task `backbone_task`) into `store_split`."""
    cfg, t = ctx.cfg, ctx.task
    sink = _writer(ctx, store_split, len(rows), model.dim, source, split.labels[rows])
    if sink.rows_done:
        log.info("task %d %s features: resuming at row %d of %d", t, store_split, sink.rows_done, len(rows))
    try:
        n = extract_split(
            model, bench, split, rows, sink, cfg.system.extract_batch_size, cfg.system.feature_chunk_rows,
            device, cfg.system.num_workers, precision, label=f"task {t} extract {store_split}",
        )  # fmt: skip
    except NonFiniteFeatures as e:
        raise DataError(
            f"the backbone of task {backbone_task} produced non-finite {store_split} features ({e.message}): "
            "the model diverged",
            hint=f"re-train task {backbone_task} with a lower train.lr ({{command}})",
            redo=ctx.redo("train", backbone_task),
        ) from None
    dist.barrier()
    if dist.is_main():
        sink.finish(n)
    return n


def run(ctx: StageContext) -> tuple[list[Path], dict]:
    cfg, t = ctx.cfg, ctx.task
    device = dist.resolve_device(cfg.system.device)
    bench = ctx.benchmark()
    model = checkpoint.load_model(artifacts.model_path(ctx.root, t), cfg, device, ctx.redo("train", t))
    source = ctx.input_id("train", t)
    prec = resolve_precision(cfg.system.precision, device)
    classes = bench.tasks[t]
    t0 = time.perf_counter()
    counts = {}
    for split_name, split, cls in (
        ("train", bench.train, classes),
        ("test", bench.test, range(classes.stop)),
    ):
        rows = rows_of(split, cls)
        counts[split_name] = extract_rows(ctx, model, bench, split, rows, split_name, source, device, prec, t)
    seconds = time.perf_counter() - t0
    n = counts["train"] + counts["test"]
    log.info("task %d: extracted %d feature rows (%.0f images/s)", t, n, n / max(seconds, 1e-9))
    outputs = [artifacts.features_path(ctx.root) / artifacts.feature_group(t, s) for s in ("train", "test")]
    return outputs, {"rows": counts, "images_per_second": round(n / max(seconds, 1e-9), 1), "precision": prec}
