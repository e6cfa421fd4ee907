"""RunCache: a run folder as the cache a head's fit reads (`clpt.heads.base.HeadCache`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clpt import artifacts, checkpoint
from clpt.config import RunConfig
from clpt.drift import DriftMap, compose_features
from clpt.errors import DataError, Redo
from clpt.heads.base import ClassStats
from clpt.model import Heads
from clpt.stages.drift import concat, load_map, record_moments
from clpt.stats import Scatter


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
    shard: tuple[int, int] = (0, 1)  # (rank, world): train_chunks reads this rank's share of the rows
    _maps: dict[int, DriftMap] = field(default_factory=dict, repr=False)  # each task's drift map, read once

    @property
    def n_seen(self) -> int:
        return self.tasks[self.task][1]

    def _redo(self, stage: str, t: int) -> Redo:
        return Redo(stage, t, str(self.root))

    def _checked(self, p: dict, classes: range, stage: str, t: int) -> dict:
        """A statistics store's arrays, checked to cover exactly `classes` (else the damaged line of `stage`)."""
        expected, got = list(classes), p["classes"].tolist()
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected)))
            which = f"class {got[at]} at position {at}, where the task has {expected[at]}" if at < min(
                len(got), len(expected)) else f"{len(got)} classes, where the task has {len(expected)}"  # fmt: skip
            raise DataError(
                f"the statistics of task {t} are damaged: they list {which} "
                f"(the task's classes are {classes.start}..{classes.stop - 1})",
                redo=self._redo(stage, t),
            )
        return p

    def _stats(self, tasks: range) -> ClassStats:
        """The statistics of tasks `tasks` as fit-stats stored them (never compensated)."""
        parts = [self._checked(artifacts.load_stats(self.root, i), range(*self.tasks[i]), "stats", i) for i in tasks]
        return ClassStats.from_tasks(
            [p["count"] for p in parts], [p["mean"] for p in parts],
            [Scatter.of(p["covariance"], p) for p in parts],
            None if parts[0]["covariance"] == "full" else [p["pooled"] for p in parts], tasks.start,
        )  # fmt: skip

    def task_stats(self, i: int) -> ClassStats:
        return self._stats(range(i, i + 1))

    def class_stats(self) -> ClassStats:
        if self.compensated and self.task > 0:  # the old classes as the drift stage moved them, then task T's
            own = self._checked(artifacts.load_stats(self.root, self.task), range(*self.tasks[self.task]),
                                "stats", self.task)  # fmt: skip
            old = self._checked(artifacts.load_stats(self.root, self.task, store="drift"),
                                range(0, self.tasks[self.task][0]), "drift", self.task)  # fmt: skip
            both = concat([record_moments(old), record_moments(own)])
            task_of_class = torch.cat([torch.full((b - a,), i, dtype=torch.int64) for i, (a, b) in
                                       enumerate(self.tasks[: self.task + 1])])  # fmt: skip
            pooled = torch.stack([both.m2[task_of_class == i].sum(0) for i in range(self.task + 1)])
            return ClassStats(both.count, both.mean, Scatter("full", m2=both.m2), task_of_class, pooled)
        return self._stats(range(self.task + 1))

    def _map(self, j: int) -> DriftMap:
        if j not in self._maps:
            self._maps[j] = load_map(self.root, self.cfg, j)
        return self._maps[j]

    def train_chunks(self, i: int, rows: int = 8192) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Cached training features of task i (extracted with task i's backbone), on the device."""
        label = f"{self.label}, features of task {i}" if self.label else ""
        maps = [self._map(j) for j in range(i + 1, self.task + 1)] if self.compensated else []
        for x, y in artifacts.iter_feature_chunks(self.root, i, "train", rows, label, self.shard):
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

    def previous_state(self, head: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The saved state of `head` after task `task` - 1 (tensors, metadata), for an incremental fit;
        None at task 0 and for a compensated head (its old features move every task)."""
        if self.task == 0 or self.compensated:
            return None
        path = artifacts.head_state_path(self.root, head, self.task - 1)
        tensors, md = artifacts.read_head_state(path, head, Redo(f"head:{head}", self.task - 1, str(self.root)))
        md["carry"] = artifacts.read_head_carry(artifacts.head_carry_path(self.root, head, self.task - 1),
                                                md.get("carry"))  # fmt: skip
        return tensors, md
