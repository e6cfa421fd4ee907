"""Every stage of a run, declared once: name, inputs, config keys, producing command, function.

The run machinery (`clpt.run`) knows stages only through these declarations:
what a stage reads (the stages whose markers it consumes), which config keys
its result depends on (an edit of any makes it stale), the command that
produces it (for error messages), and the function that runs it. Stage
functions receive a `StageContext`, never marker internals.

The five stages of a task are `train`, `extract`, `stats`, `align` and `eval`
(the method's own classifier); each classifier head of `clpt.heads` adds a stage
`head:NAME`, declared from its registration.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clpt.registry import Registry, lazy


@dataclass
class StageContext:
    """What a stage function is given: the run, the task, whether to resume, its inputs' marker ids."""

    run: Any  # clpt.run.Run
    task: int
    resume: bool = True
    inputs: dict[str, str] = field(default_factory=dict)  # "stage/task" -> marker id

    @property
    def cfg(self):
        return self.run.cfg

    def input_id(self, stage: str, t: int) -> str:
        """The marker id of an input this stage consumed (what its outputs are derived from)."""
        return self.inputs[f"{stage}/{t}"]


StageFn = Callable[[StageContext], tuple[list[Path], dict]]


@dataclass(frozen=True)
class Stage:
    name: str
    what: str  # in messages: "needs <what> of task t"
    command: str  # produces it; {run} and {task} are filled in
    inputs: Callable[[Any, int], list[tuple[str, int]]]  # (cfg, task) -> [(stage, task)]
    config_keys: Callable[[Any], tuple[str, ...]]  # cfg -> dotted keys the result depends on
    fn: StageFn
    reads_images: bool = False  # checked against the run's manifest before its marker is removed


TASK_STAGES: Registry[Stage] = Registry("stage")


def _learner(cfg) -> str:
    from clpt.methods import METHODS

    return METHODS.get(cfg.method).learner


def _declare(stage: Stage) -> Stage:
    return TASK_STAGES.register(stage.name, stage)


_declare(
    Stage(
        "train",
        "a trained model",
        "clpt train-task {run} --task {task}",
        inputs=lambda cfg, t: [("train", t - 1)] if t > 0 else [],
        config_keys=lambda cfg: (
            ("method", "seed", "benchmark", "backbone", "train", "lora")
            + (("mist",) if _learner(cfg) == "mist" else ())
        ),
        fn=lazy("clpt.train", "train_stage"),
        reads_images=True,
    )
)
_declare(
    Stage(
        "extract",
        "cached features",
        "clpt extract {run} --task {task}",
        inputs=lambda cfg, t: [("train", t)],
        config_keys=lambda cfg: (),
        fn=lazy("clpt.features", "extract_stage"),
        reads_images=True,
    )
)
_declare(
    Stage(
        "stats",
        "class statistics",
        "clpt fit-stats {run} --task {task}",
        inputs=lambda cfg, t: [("extract", t)],
        config_keys=lambda cfg: (),  # sufficient statistics: no setting changes them
        fn=lazy("clpt.stats", "stats_stage"),
    )
)
_declare(
    Stage(
        "align",
        "aligned heads",
        "clpt align {run} --task {task}",
        inputs=lambda cfg, t: [("train", t)] + [("stats", i) for i in range(t + 1)],
        config_keys=lambda cfg: ("align", "train.weight_decay", "seed", "stats.ridge"),
        fn=lazy("clpt.align", "align_stage"),
    )
)


def _classifier(cfg) -> str | None:
    from clpt.methods import METHODS

    return METHODS.get(cfg.method).classifier


_declare(
    Stage(
        "eval",
        "an evaluation",
        "clpt eval {run} --task {task}",
        # the method's own classifier: its aligned task heads, or a statistics head (SimpleCIL, RanPAC)
        inputs=lambda cfg, t: (
            [(f"head:{c}", t)] if (c := _classifier(cfg)) else [("align", t), ("extract", t)]
        ),
        config_keys=lambda cfg: (),
        fn=lazy("clpt.evaluate", "eval_stage"),
    )
)

CORE = tuple(TASK_STAGES.names())  # train, extract, stats, align, eval: in order
HEAD_PREFIX = "head:"


@functools.cache
def head_stage(name: str) -> Stage:
    """The stage of classifier head `name`, declared from its registration in `clpt.heads`."""
    from clpt.evaluate import head_stage as head_fn
    from clpt.heads import HEADS

    spec = HEADS.get(name)
    return Stage(
        f"{HEAD_PREFIX}{name}",
        f"the {name} head",
        f"clpt heads {{run}} --head {name} --task {{task}}",
        # every head scores the test features of task t
        inputs=lambda cfg, t: [*spec.inputs(cfg, t), ("extract", t)],
        config_keys=lambda cfg: (f"heads.{name}", *spec.config_keys(cfg)),
        fn=head_fn(name),
    )


def get_stage(name: str) -> Stage:
    if name.startswith(HEAD_PREFIX):
        return head_stage(name[len(HEAD_PREFIX) :])
    return TASK_STAGES.get(name)


def run_order(cfg) -> list[str]:
    """Stages of one task, in order: the core five (the method's classifier head before eval), then the heads."""
    own = _classifier(cfg)
    heads = [f"{HEAD_PREFIX}{h}" for h in ([own] if own else []) + [h for h in cfg.heads.enabled if h != own]]
    if own:
        return [*CORE[:-1], heads[0], "eval", *heads[1:]]
    return [*CORE, *heads]
