"""Every stage of a run, declared once: name, inputs, config keys, producing command, function.

The run machinery (`clpt.run`) knows stages only through these declarations:
what a stage reads (the stages whose markers it consumes), which config keys
its result depends on (an edit of any makes it stale), the command that
produces it (for error messages: `explain`), and the function that runs it
(imported when it first runs, so reading a run's state imports no stage code).

The five stages of a task are `train`, `extract`, `stats`, `align` and `eval`
(the method's own classifier); each classifier head of `clpt.heads` adds a stage
`head:NAME`, declared from its registration. Adding a stage: a module in
`clpt/stages/` with a function of a `StageContext`, and a `declare(Stage(...))`
here.
"""

from __future__ import annotations

import functools

from clpt.config import RunConfig
from clpt.errors import ClptError
from clpt.heads import HEADS
from clpt.learners import LEARNERS
from clpt.methods import METHODS
from clpt.registry import Registry, lazy
from clpt.stages.base import Stage

TASK_STAGES: Registry[Stage] = Registry("stage")


def declare(stage: Stage) -> Stage:
    return TASK_STAGES.register(stage.name, stage)


def _learner_keys(cfg: RunConfig) -> tuple[str, ...]:
    return LEARNERS.get(METHODS.get(cfg.method).learner).config_keys


declare(
    Stage(
        "train",
        "a trained model",
        "clpt train-task {run} --task {task}",
        inputs=lambda cfg, t: [("train", t - 1)] if t > 0 else [],
        config_keys=lambda cfg: (
            "method",
            "seed",
            "benchmark",
            "backbone",
            "train",
            "lora",
            *_learner_keys(cfg),
        ),
        fn=lazy("clpt.stages.train", "run"),
        reads_images=True,
    )
)
declare(
    Stage(
        "extract",
        "cached features",
        "clpt extract {run} --task {task}",
        inputs=lambda cfg, t: [("train", t)],
        config_keys=lambda cfg: (),
        fn=lazy("clpt.stages.extract", "run"),
        reads_images=True,
    )
)
declare(
    Stage(
        "stats",
        "class statistics",
        "clpt fit-stats {run} --task {task}",
        inputs=lambda cfg, t: [("extract", t)],
        config_keys=lambda cfg: (),  # sufficient statistics: no setting changes them
        fn=lazy("clpt.stages.fit_stats", "run"),
    )
)
ALIGN_KEYS = (
    "align",
    "train.weight_decay",
    "seed",
    "stats.ridge",
)  # what alignment reads (the `ca` head too)
declare(
    Stage(
        "align",
        "aligned heads",
        "clpt align {run} --task {task}",
        inputs=lambda cfg, t: [("train", t)] + [("stats", i) for i in range(t + 1)],
        config_keys=lambda cfg: ALIGN_KEYS,
        fn=lazy("clpt.stages.align", "run"),
    )
)


def classifier(cfg: RunConfig) -> str | None:
    """The method's own classifier: None (its aligned task heads) or a head name."""
    return METHODS.get(cfg.method).classifier


declare(
    Stage(
        "eval",
        "an evaluation",
        "clpt eval {run} --task {task}",
        # the method's own classifier: its aligned task heads, or a statistics head (SimpleCIL, RanPAC)
        inputs=lambda cfg, t: (
            [(f"head:{c}", t)] if (c := classifier(cfg)) else [("align", t), ("extract", t)]
        ),
        config_keys=lambda cfg: (),
        fn=lazy("clpt.stages.evaluate", "run"),
    )
)

CORE = tuple(TASK_STAGES.names())  # train, extract, stats, align, eval: in order
HEAD_PREFIX = "head:"


@functools.cache
def head_stage(name: str) -> Stage:
    """The stage of classifier head `name`, declared from its registration in `clpt.heads`."""
    spec = HEADS.get(name)
    return Stage(
        f"{HEAD_PREFIX}{name}",
        f"the {name} head",
        f"clpt heads {{run}} --head {name} --task {{task}}",
        # every head scores the test features of task t
        inputs=lambda cfg, t: [*spec.inputs(cfg, t), ("extract", t)],
        config_keys=lambda cfg: (f"heads.{name}", *spec.config_keys(cfg)),
        fn=functools.partial(lazy("clpt.stages.evaluate", "run_head"), name),
    )


def get_stage(name: str) -> Stage:
    if name.startswith(HEAD_PREFIX):
        return head_stage(name[len(HEAD_PREFIX) :])
    return TASK_STAGES.get(name)


def run_order(cfg: RunConfig) -> list[str]:
    """Stages of one task, in order: the core five (the method's classifier head before eval), then the heads."""
    own = classifier(cfg)
    heads = [f"{HEAD_PREFIX}{h}" for h in ([own] if own else []) + [h for h in cfg.heads.enabled if h != own]]
    if own:
        return [*CORE[:-1], heads[0], "eval", *heads[1:]]
    return [*CORE, *heads]


def command(stage: str, root, task: int) -> str:
    """The command that produces `stage` of task `task` in run folder `root`."""
    return get_stage(stage).command.format(run=root, task=task)


def explain(e: ClptError) -> ClptError:
    """`e` with its fix written out from the command its `Redo` stage declares (in place; returned)."""
    if e.redo is not None:
        r = e.redo
        e.hint, e.redo = e.fix(command(r.stage, r.root, r.task)), None
    return e
