"""Feature extraction: a backbone's features of a split's rows, chunk by chunk, into a writer.

The backbone runs in eval mode with the test transform; each chunk of rows is
checked finite before it is written, so a diverged model never leaves features
behind. Under `torchrun` the chunks are sharded across ranks. Where the rows
go (the run's zarr feature store, `clpt.artifacts.FeatureWriter`) and which
rows a task extracts are decided by the extract stage (`clpt.stages.extract`).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from clpt import distributed as dist
from clpt import progress
from clpt.data.benchmark import Benchmark, Split
from clpt.data.loader import batches
from clpt.errors import DataError
from clpt.model import CLModel
from clpt.precision import autocast


class FeatureSink(Protocol):
    """Where extracted rows go: `write(start, feats (n, d) float32, labels (n,) int64)`."""

    rows_done: int  # rows already committed (an interrupted attempt resumes after them)

    def write(self, start: int, x: np.ndarray, y: np.ndarray) -> None: ...


class NonFiniteFeatures(DataError):
    """The backbone produced NaN or infinite features: it diverged."""


@torch.no_grad()
def extract_split(
    model: CLModel,
    bench: Benchmark,
    split: Split,
    rows: np.ndarray,
    sink: FeatureSink,
    batch_size: int,
    chunk_rows: int,
    device: torch.device,
    num_workers: int = 0,
    precision: str = "fp32",
    label: str = "",
) -> int:
    """Features of `split[rows]` from row `sink.rows_done` on, `chunk_rows` at a time; returns len(rows).

    Each rank extracts every world_size-th chunk. `label` names the progress bar ("" shows none).
    """
    n = len(rows)
    model.eval()
    starts = list(range(sink.rows_done, n, chunk_rows))
    mine = starts[dist.rank() :: dist.world_size()]
    todo = sum(min(st + chunk_rows, n) - st for st in mine)
    with progress.bar(label, todo) as shown:
        for start in mine:
            stop = min(start + chunk_rows, n)
            out = []
            for x, _ in batches(bench, split, rows[start:stop], batch_size, device, train=False,
                                num_workers=num_workers):  # fmt: skip
                with autocast(precision, device):
                    out.append(model.features(x).float().cpu())
                shown.advance(len(x))
            chunk = torch.cat(out)
            if not bool(torch.isfinite(chunk).all()):  # stopped where it appears: never cached
                raise NonFiniteFeatures(f"rows {start}-{stop - 1}")
            sink.write(start, chunk.numpy(), split.labels[rows[start:stop]])
    return n
