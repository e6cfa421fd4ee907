"""RunCache: a run folder as the cache a head's fit reads (`clpt.heads.base.HeadCache`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from clpt import artifacts, checkpoint
from clpt.config import RunConfig
from clpt.drift import compose_features
from clpt.errors import DataError, Redo
from clpt.heads.base import ClassStats
from clpt.model import Heads
from clpt.stages.drift import compensated_statistics, load_map


@dataclass
class RunCache:
    """The statistics store, feature store and checkpoints of a run, as after task `task`."""

    root: Path
    cfg: RunConfig
    task: int
    tasks: list[list[int]]  # [start, stop) of every task of the run
    device: torch.device
    label: str = ""  # what progress bars of the fit are called ("" shows none)
    compensated: bool = False  # drift-compensated statistics and old features (a NAME+drift head)

    @property
    def n_seen(self) -> int:
        return self.tasks[self.task][1]

    def _redo(self, stage: str, t: int) -> Redo:
        return Redo(stage, t, str(self.root))

    def class_stats(self) -> ClassStats:
        if self.compensated and self.task > 0:  # the old classes as the drift stage moved them, then task T's
            old, _ = compensated_statistics(self.root, self.task)
            own = artifacts.load_stats(self.root, self.task)
            task_of_class = torch.cat([torch.full((b - a,), i, dtype=torch.int64) for i, (a, b) in
                                       enumerate(self.tasks[: self.task + 1])])  # fmt: skip
            return ClassStats(
                torch.cat([old.count, torch.as_tensor(own["count"]).double()]),
                torch.cat([old.mean, torch.as_tensor(own["mean"]).double()]),
                torch.cat([old.m2, torch.as_tensor(own["m2"]).double()]),
                task_of_class,
            )
        parts = [artifacts.load_stats(self.root, i) for i in range(self.task + 1)]
        for i, p in enumerate(parts):
            expected = list(range(*self.tasks[i]))
            if p["classes"].tolist() != expected:
                raise DataError(
                    f"the statistics of task {i} cover classes {p['classes'].tolist()[:3]}..., "
                    f"not the task's {expected[:3]}...",
                    redo=self._redo("stats", i),
                )
        return ClassStats.from_tasks(*([p[k] for p in parts] for k in ("count", "mean", "m2")))

    def train_chunks(self, i: int, rows: int = 8192) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Cached training features of task i (extracted with task i's backbone), on the device."""
        label = f"{self.label}, features of task {i}" if self.label else ""
        maps = (
            [load_map(self.root, self.cfg, j) for j in range(i + 1, self.task + 1)]
            if self.compensated
            else []
        )
        for x, y in artifacts.iter_feature_chunks(self.root, i, "train", rows, label):
            if maps:  # task i's features moved by the maps of tasks i+1..T
                x = compose_features(x.double(), y, maps).float()
            yield x.to(self.device), y.to(self.device)

    def feature_dim(self) -> int:
        feats, _ = artifacts.open_features(self.root, self.task, "test")
        return int(feats.shape[1])

    def trained_heads(self) -> Heads:
        return checkpoint.load_trained_heads(
            artifacts.model_path(self.root, self.task), self._redo("train", self.task)
        )

    def aligned_heads(self) -> Heads:
        return checkpoint.load_aligned_heads(
            artifacts.aligned_path(self.root, self.task), self._redo("align", self.task)
        )
