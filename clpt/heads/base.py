"""What every classifier head is: a registered spec, a fit from the run's cache, a scoring function.

A head is fitted for task T from cached quantities only (class statistics,
cached features, the trained task heads), never from images. The fit returns a
`HeadState`: a module whose buffers are what scoring needs (saved as
safetensors beside the head's evaluation, loaded back by `clpt predict` and
`clpt export`) and whose forward scores features, (N, d) -> (N, C_seen);
argmax predicts. Each head is one stage of the run (`head:NAME`) with its own
marker, so editing `heads.NAME.*` makes exactly that head stale.

Adding a head: one module with a fit function returning a `HeadState` subclass,
and its registration (`clpt.heads.registry`: the name, the settings dataclass,
the fit and the state class named lazily).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from clpt.config import RunConfig
from clpt.heads.registry import HEADS, HeadSpec, extracts_upto, register_head, stats_upto  # noqa: F401
from clpt.model import Heads
from clpt.stats import Scatter, compress, fit_class_stats

Scores = Callable[[torch.Tensor], torch.Tensor]  # (N, d) features -> (N, C) scores, argmax predicts


class HeadState(nn.Module):
    """A fitted head: buffers (its saved tensors) and `meta()` (the JSON-able rest); forward scores.

    `from_state(tensors, meta)` rebuilds it from what was saved, so scoring a loaded
    state is the same arithmetic on the same tensors as scoring the fit (buffers are
    kept contiguous: a solver's column-major result would round differently). `info` is
    what the fit chose (recorded as `fit` in the head's evaluation row). `score`
    says what a score is (for `clpt predict`'s help and output).
    """

    score = "a logit"

    def __init__(self, info: dict | None = None):
        super().__init__()
        self.info = dict(info or {})
        # what the next task's incremental fit continues from and scoring does not need (RanPAC's Gram,
        # LDA's pooled scatter): saved beside the state for the latest task only, never exported
        self.carry: dict[str, torch.Tensor] = {}
        # > 0: this state is a part, classes [first_class, C) alone, fitted after the previous task's state
        # (classes [0, first_class)); a per-class head's incremental fit (NCM, FeCAM) returns one, so that a
        # task's fit and what it saves stay the size of the task (`join` makes the whole state from parts)
        self.first_class = 0

    def meta(self) -> dict:
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        """What is saved: the persistent buffers, as float32 / int64 CPU tensors."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> HeadState:
        raise NotImplementedError

    @classmethod
    def join(cls, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The tensors of a whole state from those of its parts (consecutive classes, oldest first): each
        buffer concatenated along its first dimension, the class (a head whose parts have other tensors
        overrides this). Consumes `parts`: each piece leaves its part as it is copied, so the memory
        held is about one state, not the parts and their concatenation."""
        if len(parts) == 1:
            return parts[0]
        out = {}
        for k in dict.fromkeys(k for p in parts for k in p):
            have = [p for p in parts if k in p]
            first = have[0][k]
            out[k] = first.new_empty((sum(len(p[k]) for p in have), *first.shape[1:]))
            del first
            at = 0
            for p in have:
                piece = p.pop(k)
                out[k][at : at + len(piece)] = piece
                at += len(piece)
                del piece
        return out

    def portable(self) -> HeadState:
        """The same scores from operators every exchange format has (for `clpt export --onnx`): itself,
        unless its scoring uses one ONNX lacks (FeCAM's triangular solve)."""
        return self


class TaskHeadScores(HeadState):
    """The learner's per-task linear heads (`linear`, `ca`, the aligned heads): concatenated logits."""

    score = "a logit of the task heads"

    def __init__(self, heads: Heads, info: dict | None = None):
        super().__init__(info)
        self.heads = heads.eval()

    def meta(self) -> dict:
        return {"dim": self.heads.dim, "sizes": self.heads.sizes}

    @classmethod
    def from_state(cls, tensors, meta) -> TaskHeadScores:
        heads = Heads(int(meta["dim"]), [int(n) for n in meta["sizes"]])
        heads.load_state_dict({k.removeprefix("heads."): v for k, v in tensors.items()})
        return cls(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(x)


def restore_state(head: str, tensors: dict[str, torch.Tensor], meta: dict) -> HeadState:
    """The fitted head `head` (a registered name) rebuilt from its saved tensors and meta."""
    cls: type[HeadState] = HEADS.get(head).state_class()
    return cls.from_state(tensors, meta).eval()


def restore_parts(head: str, parts: list[dict[str, torch.Tensor]], meta: dict) -> HeadState:
    """The fitted head `head` rebuilt from the tensors of its parts, oldest first (`HeadState.join`)."""
    cls: type[HeadState] = HEADS.get(head).state_class()
    return cls.from_state(cls.join(parts), meta).eval()


@dataclass
class ClassStats:
    """Sufficient statistics of every class seen up to task T, float64, in label order.

    `scatter` holds each class's M2 in the run's covariance form (`stats.covariance`, `clpt.stats.Scatter`);
    `pooled` (T', d, d) each task's sum_c M2_c, exact in every form, in task order (one per task present).
    """

    count: torch.Tensor  # (C,)
    mean: torch.Tensor  # (C, d)
    scatter: Scatter
    task_of_class: torch.Tensor  # (C,) int64
    pooled: torch.Tensor  # (T', d, d)

    @property
    def m2(self) -> torch.Tensor:
        """(C, d, d) full scatter matrices (the run's statistics must be `full`)."""
        if self.scatter.form != "full":
            raise ValueError(f"full scatter matrices asked of statistics in the {self.scatter.form} form")
        assert self.scatter.m2 is not None
        return self.scatter.m2

    @classmethod
    def from_tasks(
        cls, counts, means, scatters: list[Scatter], pooled=None, first_task: int = 0
    ) -> ClassStats:
        """Concatenate per-task (count, mean, scatter[, pooled]), tasks first_task.. in order, as float64 CPU
        tensors; `pooled` defaults to each task's sum of its full M2."""

        def cat(parts):
            return torch.cat([torch.as_tensor(p).cpu() for p in parts]).to(torch.float64)

        task_of_class = torch.cat([torch.full((len(c),), first_task + i, dtype=torch.int64)
                                   for i, c in enumerate(counts)])  # fmt: skip
        if pooled is None:
            pooled = [s.full().sum(0) for s in scatters]
        pooled_t = torch.stack([torch.as_tensor(p).cpu().to(torch.float64) for p in pooled])
        return cls(cat(counts), cat(means), Scatter.cat(scatters), task_of_class, pooled_t)


class HeadCache(Protocol):
    """What a head's fit may read for task `task`: cached quantities only, never images.

    Two implementations: `clpt.stages.heads.RunCache` (a run folder's feature and
    statistics stores and checkpoints) and `InMemoryCache` (features in memory).
    """

    cfg: RunConfig
    task: int
    tasks: list[list[int]]  # [start, stop) of every task
    device: torch.device
    label: str  # what progress bars of the fit are called ("" shows none)
    compensated: bool  # statistics and old features moved by drift compensation (a NAME+drift head)
    # (rank, world): `train_chunks` yields this rank's share of the rows only; a sharded head's fit
    # reduces across ranks where world > 1 (`clpt.stats.merge_ranks`, `distributed.all_reduce_sum`)
    shard: tuple[int, int]

    @property
    def n_seen(self) -> int: ...

    def class_stats(self) -> ClassStats:
        """Sufficient statistics of every class of tasks 0..task."""
        ...

    def train_chunks(self, i: int, rows: int = 8192) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training features of task i (as its backbone saw them) and their labels, on the device."""
        ...

    def feature_dim(self) -> int: ...

    def trained_heads(self) -> Heads:
        """The task heads as the learner left them after task `task`."""
        ...

    def aligned_heads(self) -> Heads:
        """The task heads after the align stage of task `task`."""
        ...

    def task_stats(self, i: int) -> ClassStats:
        """Sufficient statistics of task i's classes only (as `class_stats` gives them for those classes)."""
        ...

    def previous_state(self, head: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The fitted state of `head` after the previous task (tensors, metadata with `settings`, `meta`,
        `n_classes`, and `carry`: the state's carry tensors, or None where they are gone), for a head
        that updates incrementally; None where there is none to build on."""
        ...


@torch.no_grad()
def score_in_chunks(scores: Scores, x: torch.Tensor, device: torch.device, rows: int = 4096) -> torch.Tensor:
    """(N, C) scores on the CPU, computed `rows` test features at a time on the device."""
    return torch.cat([scores(x[s : s + rows].to(device)).float().cpu() for s in range(0, len(x), rows)])


class InMemoryCache:
    """A `HeadCache` over features in memory (library use, benchmarks): fit any head without a run.

    `x` (n, d) float32 training features, `y` (n,) labels in [0, C), `tasks` the
    [start, stop) class ranges; the heads are fitted as after task `task`.
    `heads`: the learner's task heads, for the heads that start from them (`ca`, `linear`).
    """

    def __init__(self, x, y, tasks, task: int, cfg: RunConfig, device="cpu", rows: int = 8192,
                 heads: Heads | None = None, label: str = ""):  # fmt: skip
        self.x, self.y, self.tasks, self.task, self.cfg, self.rows = x, y, tasks, task, cfg, rows
        self.device = torch.device(device)
        self.heads, self.label = heads, label
        self.compensated = False
        self.shard = (0, 1)  # every row is here
        self._order = torch.empty(0, dtype=torch.int64)  # rows grouped by task, and where each task ends
        self._by_task: list[int] | None = None

    @property
    def n_seen(self) -> int:
        return self.tasks[self.task][1]

    def trained_heads(self) -> Heads:
        if self.heads is None:
            raise ValueError("this InMemoryCache holds no task heads: pass heads=")
        return copy.deepcopy(self.heads)

    aligned_heads = trained_heads  # in memory, the heads given are the heads used

    def previous_state(self, head: str):
        return None  # in memory, every fit is from scratch

    def feature_dim(self) -> int:
        return int(self.x.shape[1])

    def _task_rows(self, i: int) -> torch.Tensor:
        """The rows of task i, in their order: every task's found in one pass over the labels (a scan of
        all rows per task would make a long run's per-task cost grow with the tasks)."""
        if self._by_task is None:
            bounds = torch.tensor([b for _, b in self.tasks])
            task_of_row = torch.bucketize(self.y, bounds, right=True)
            self._order = torch.argsort(task_of_row, stable=True)
            self._by_task = torch.bincount(task_of_row, minlength=len(self.tasks) + 1).cumsum(0).tolist()
        ends = self._by_task
        return self._order[(ends[i - 1] if i else 0) : ends[i]]

    def train_chunks(self, i: int, rows: int = 8192):
        sel = self._task_rows(i)
        x, y = self.x[sel], self.y[sel]
        step = min(rows, self.rows)
        for s in range(0, len(y), step):
            yield x[s : s + step].to(self.device), y[s : s + step].to(self.device)

    def _moments(self, i: int):
        return fit_class_stats(self.train_chunks(i), range(*self.tasks[i]), self.feature_dim(), self.device)

    def _stats(self, tasks: range) -> ClassStats:
        parts = [self._moments(i) for i in tasks]
        st = self.cfg.stats
        return ClassStats.from_tasks([p.count for p in parts], [p.mean for p in parts],
                                     [compress(p.m2, st.covariance, st.rank) for p in parts],
                                     [p.m2.sum(0) for p in parts], tasks.start)  # fmt: skip

    def class_stats(self) -> ClassStats:
        """What `fit-stats` would store for tasks 0..task (in the config's covariance form), from memory."""
        return self._stats(range(self.task + 1))

    def task_stats(self, i: int) -> ClassStats:
        return self._stats(range(i, i + 1))
