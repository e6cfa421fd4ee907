"""What a stage is: its declaration, the context its function is given, and the run it reads.

A stage function takes a `StageContext` and returns (outputs, summary): the
paths it wrote (listed in its completion marker) and a JSON-able summary. It
reads artifacts (`clpt.artifacts`, `clpt.checkpoint`), calls library code that
knows nothing of run folders, and writes artifacts; the run machinery
(`clpt.run`) checks its inputs, removes its old marker first and writes the new
one last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from clpt.config import RunConfig
from clpt.errors import ClptError, Redo


@dataclass
class RunInfo:
    """What `benchmark.json` records about the benchmark at creation."""

    benchmark: str
    n_classes: int
    tasks: list[list[int]]  # [start, stop) per task
    class_order: list[int]
    class_names: list[str]
    source: dict
    additions: list[dict] = field(
        default_factory=list
    )  # tasks appended by `clpt add-task` (clpt.stages.grow)

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)


class RunView(Protocol):
    """The parts of an opened run (`clpt.run.Run`) that reports read."""

    root: Path
    cfg: RunConfig
    info: RunInfo

    def state(self, stage: str, t: int) -> str: ...

    def damaged_error(self, stage: str, t: int) -> ClptError: ...


@dataclass
class StageContext:
    """What a stage function is given: the run's folder, config and tasks, the task, its inputs' marker ids."""

    root: Path
    cfg: RunConfig
    tasks: list[list[int]]  # [start, stop) of every task of the run
    task: int
    benchmark: Callable[[], Any]  # the run's images (clpt.data.benchmark.Benchmark), checked once per process
    resume: bool = True
    inputs: dict[str, str] = field(default_factory=dict)  # "stage/task" -> marker id

    def input_id(self, stage: str, t: int) -> str:
        """The marker id of an input this stage consumed (what its outputs are derived from)."""
        return self.inputs[f"{stage}/{t}"]

    def redo(self, stage: str, t: int, force: bool = True) -> Redo:
        """The fix of an error in the output of `stage` of task t: (re-)run it."""
        return Redo(stage, t, str(self.root), force)


StageFn = Callable[[StageContext], tuple[list[Path], dict]]


@dataclass(frozen=True)
class Stage:
    name: str
    what: str  # in messages: "needs <what> of task t"
    command: str  # produces it; {run} and {task} are filled in
    inputs: Callable[[RunConfig, int], list[tuple[str, int]]]  # (cfg, task) -> [(stage, task)]
    config_keys: Callable[[RunConfig], tuple[str, ...]]  # cfg -> dotted keys the result depends on
    fn: StageFn
    reads_images: bool = False  # checked against the run's manifest before its marker is removed
