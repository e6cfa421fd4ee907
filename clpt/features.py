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
last committed chunk and never serves fill values. Plain zarr reads the store:
`zarr.open_group("RUN/features.zarr")["task_000/train/feats"][:]`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from clpt import distributed as dist
from clpt.data.benchmark import Benchmark, Split
from clpt.data.loader import batches
from clpt.errors import MissingInputError
from clpt.model import CLModel

log = logging.getLogger("clpt")


def group_name(t: int, split: str) -> str:
    return f"task_{t:03d}/{split}"


def _prepare(
    store: Path, name: str, n: int, d: int, chunk_rows: int, source: str, resume: bool
) -> tuple[zarr.Array, zarr.Array, int]:
    """Arrays for a group, reusing committed rows when they come from the same source model."""
    root = zarr.open_group(store, mode="a")
    if resume and name in root:
        g = root[name]
        try:
            feats, labels = g["feats"], g["labels"]
            same = feats.shape == (n, d) and labels.shape == (n,) and feats.attrs.get("source") == source
        except KeyError:
            same = False
        if same:
            return feats, labels, int(feats.attrs.get("rows_done", 0))
    g = root.require_group(name)
    feats = g.create_array("feats", shape=(n, d), chunks=(chunk_rows, d), dtype="float32", overwrite=True)
    labels = g.create_array("labels", shape=(n,), chunks=(chunk_rows,), dtype="int64", overwrite=True)
    feats.attrs.update({"source": source, "rows_done": 0})
    return feats, labels, 0


@torch.no_grad()
def extract_split(
    model: CLModel,
    bench: Benchmark,
    split: Split,
    rows: np.ndarray,
    store: Path,
    name: str,
    source: str,
    batch_size: int,
    chunk_rows: int,
    device: torch.device,
    resume: bool = True,
    num_workers: int = 0,
) -> int:
    """Write features of `split[rows]` to `store/name`; returns the number of rows.

    With `resume`, rows already committed by an interrupted attempt with the same
    source model are kept; otherwise the arrays are written afresh.
    """
    n, d = len(rows), model.dim
    feats_arr = labels_arr = None
    done = 0
    if dist.is_main():
        feats_arr, labels_arr, done = _prepare(store, name, n, d, chunk_rows, source, resume)
    done = dist.broadcast_object(done)
    dist.barrier()
    if not dist.is_main():
        g = zarr.open_group(store, mode="r+")[name]
        feats_arr, labels_arr = g["feats"], g["labels"]
    if done:
        log.info("%s: resuming at row %d of %d", name, done, n)
    model.eval()
    chunk_starts = list(range(done, n, chunk_rows))
    mine = chunk_starts[dist.rank() :: dist.world_size()]
    for start in mine:
        stop = min(start + chunk_rows, n)
        out = []
        for x, _ in batches(
            bench, split, rows[start:stop], batch_size, device, train=False, num_workers=num_workers
        ):
            out.append(model.features(x).float().cpu())
        feats_arr[start:stop] = torch.cat(out).numpy()
        labels_arr[start:stop] = split.labels[rows[start:stop]]
        if dist.world_size() == 1:
            feats_arr.attrs["rows_done"] = stop  # commit after the data
    dist.barrier()
    if dist.is_main():
        feats_arr.attrs["rows_done"] = n
    return n


def extract_stage(run, t: int, resume: bool = True) -> tuple[list[Path], dict]:
    from clpt.train import load_model

    cfg = run.cfg
    device = dist.resolve_device(cfg.system.device)
    bench = run.benchmark()
    model = load_model(run.model_path(t), cfg, device)
    source = run.marker("train", t)["id"]
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
            run.features_path,
            group_name(t, split_name),
            source,
            cfg.system.extract_batch_size,
            cfg.system.feature_chunk_rows,
            device,
            resume,
            cfg.system.num_workers,
        )
    seconds = time.perf_counter() - t0
    n = counts["train"] + counts["test"]
    log.info("task %d: extracted %d feature rows (%.0f images/s)", t, n, n / max(seconds, 1e-9))
    outputs = [run.features_path / group_name(t, s) for s in ("train", "test")]
    return outputs, {"rows": counts, "images_per_second": round(n / max(seconds, 1e-9), 1)}


def open_features(run, t: int, split: str) -> tuple[zarr.Array, zarr.Array]:
    """The cached (feats, labels) arrays of a task and split, checked complete."""
    try:
        g = zarr.open_group(run.features_path, mode="r")[group_name(t, split)]
        feats, labels = g["feats"], g["labels"]
    except (KeyError, FileNotFoundError):
        feats = None
    if feats is None or int(feats.attrs.get("rows_done", -1)) != feats.shape[0]:
        raise MissingInputError(
            f"no complete {split} features for task {t} in {run.features_path}",
            hint=f"run `clpt extract {run.root} --task {t}`",
        )
    return feats, labels
