"""Feature extraction into zarr stores (the on-disk feature cache).

After the Slow Learner of task t, the backbone (eval mode, test transform, fp32)
maps
- the training images of task t's classes -> `features.zarr/task_{t}/train`
  (input of `fit-stats`), and
- the test images of every class seen so far -> `features.zarr/task_{t}/test`
  (input of `eval`; the backbone changed, so old classes are re-extracted).

Each group holds `feats` (n, d) float32 and `labels` (n,) int64, in row chunks.
Rows are written chunk by chunk; the array attribute `rows_done` is updated only
after a chunk's data is written, so an interrupted extraction resumes from the
last committed chunk and never serves fill values. Paths, format and the readers live in `clpt.artifacts`. Plain zarr reads the store:
`zarr.open_group("RUN/features.zarr")["task_000/train/feats"][:]`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from clpt import artifacts, progress
from clpt import distributed as dist
from clpt.data.benchmark import Benchmark, Split
from clpt.data.loader import batches
from clpt.errors import DataError
from clpt.model import CLModel
from clpt.precision import autocast
from clpt.precision import resolve as resolve_precision

log = logging.getLogger("clpt")


@torch.no_grad()
def extract_split(
    model: CLModel,
    bench: Benchmark,
    split: Split,
    rows: np.ndarray,
    root: Path,
    t: int,
    split_name: str,
    source: str,
    batch_size: int,
    chunk_rows: int,
    device: torch.device,
    resume: bool = True,
    num_workers: int = 0,
    precision: str = "fp32",
) -> int:
    """Write features of `split[rows]` to the run's feature store (task t, split_name); returns the rows.

    With `resume`, rows already committed by an interrupted attempt with the same
    source model are kept; otherwise the arrays are written afresh.
    """
    n, d = len(rows), model.dim
    feats_arr = labels_arr = None
    done = 0
    if dist.is_main():
        feats_arr, labels_arr, done = artifacts.prepare_features(
            root, t, split_name, n, d, chunk_rows, source, resume
        )
    done = dist.broadcast_object(done)
    dist.barrier()
    if not dist.is_main():
        feats_arr, labels_arr = artifacts.open_features_for_append(root, t, split_name)
    if done:
        log.info("task %d %s features: resuming at row %d of %d", t, split_name, done, n)
    model.eval()
    chunk_starts = list(range(done, n, chunk_rows))
    mine = chunk_starts[dist.rank() :: dist.world_size()]
    todo = sum(min(st + chunk_rows, n) - st for st in mine)
    with progress.bar(f"task {t} extract {split_name}", todo) as shown:
        for start in mine:
            _extract_chunk(model, bench, split, rows, start, min(start + chunk_rows, n), batch_size, device,
                           num_workers, precision, feats_arr, labels_arr, t, split_name, shown)  # fmt: skip
    dist.barrier()
    if dist.is_main():
        feats_arr.attrs["rows_done"] = n
    return n


def _extract_chunk(model, bench, split, rows, start, stop, batch_size, device, num_workers, precision,
                   feats_arr, labels_arr, t, split_name, shown) -> None:  # fmt: skip
    """Features of rows[start:stop], checked finite, written, then committed (one process)."""
    out = []
    for x, _ in batches(
        bench, split, rows[start:stop], batch_size, device, train=False, num_workers=num_workers
    ):
        with autocast(precision, device):
            out.append(model.features(x).float().cpu())
        shown.advance(len(x))
    chunk = torch.cat(out)
    if not bool(torch.isfinite(chunk).all()):  # stopped where it appears: never cached
        raise DataError(
            f"the backbone of task {t} produced non-finite {split_name} features (rows {start}-{stop - 1}): "
            "the model diverged",
            hint=f"re-train task {t} with a lower train.lr (`clpt train-task RUN --task {t} --force`)",
        )
    try:
        feats_arr[start:stop] = chunk.numpy()
        labels_arr[start:stop] = split.labels[rows[start:stop]]
    except OSError as e:  # a full disk, a read-only store: nothing past the committed rows counts
        from clpt.errors import from_os_error

        raise from_os_error(
            e,
            f"cannot write the {split_name} features of task {t} to {str(feats_arr.store).removeprefix('file://')}",
        ) from None
    if dist.world_size() == 1:
        feats_arr.attrs["rows_done"] = stop  # commit after the data


def extract_stage(ctx) -> tuple[list[Path], dict]:
    run, t, cfg = ctx.run, ctx.task, ctx.run.cfg
    device = dist.resolve_device(cfg.system.device)
    bench = run.benchmark()
    model = artifacts.load_model(artifacts.model_path(run.root, t), cfg, device)
    source = ctx.input_id("train", t)
    prec = resolve_precision(cfg.system.precision, device)
    classes = bench.tasks[t]
    seen = range(0, classes.stop)
    t0 = time.perf_counter()
    counts = {}
    for split_name, split, cls in (("train", bench.train, classes), ("test", bench.test, seen)):
        rows = split.indices_of(cls)
        # grouped by class, so fit-stats reads each class as one slice
        rows = rows[np.argsort(split.labels[rows], kind="stable")]
        counts[split_name] = extract_split(
            model,
            bench,
            split,
            rows,
            run.root,
            t,
            split_name,
            source,
            cfg.system.extract_batch_size,
            cfg.system.feature_chunk_rows,
            device,
            ctx.resume,
            cfg.system.num_workers,
            prec,
        )
    seconds = time.perf_counter() - t0
    n = counts["train"] + counts["test"]
    log.info("task %d: extracted %d feature rows (%.0f images/s)", t, n, n / max(seconds, 1e-9))
    outputs = [artifacts.features_path(run.root) / artifacts.feature_group(t, s) for s in ("train", "test")]
    return outputs, {"rows": counts, "images_per_second": round(n / max(seconds, 1e-9), 1), "precision": prec}
