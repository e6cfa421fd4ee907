"""Every stage of a run, declared once: name, inputs, config keys, producing command, function.

The run machinery (`clpt.run`) knows stages only through these declarations:
what a stage reads (the stages whose markers it consumes), which config keys
its result depends on (an edit of any makes it stale), the command that
produces it (for error messages: `explain`), and the function that runs it
(imported when it first runs, so reading a run's state imports no stage code).

The five stages of a task are `train`, `extract`, `stats`, `align` and `eval`
(the method's own classifier); each classifier head of `clpt.heads` adds a stage
`head:NAME`, declared from its registration. With a drift method
(`drift.method`, docs/methods/drift.md) a task also has `pairs` and `drift`
after `stats`, and every head with statistics a twin `head:NAME+drift` fitted
on the compensated statistics. Adding a stage: a module in
`clpt/stages/` with a function of a `StageContext`, and a `declare(Stage(...))`
here.
"""

from __future__ import annotations

import functools

from clpt.config import RunConfig
from clpt.errors import ClptError
from clpt.heads import HEADS
from clpt.heads.registry import ALIGN_KEYS  # what alignment reads (the `ca` head too)
from clpt.learners import LEARNERS
from clpt.methods import METHODS
from clpt.registry import Registry, lazy
from clpt.stages.base import Stage

TASK_STAGES: Registry[Stage] = Registry("stage")
DRIFT_SUFFIX = "+drift"  # a head fitted on drift-compensated statistics: head:NAME+drift


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
        # sufficient statistics: only the compact covariance forms depend on settings
        config_keys=lambda cfg: {"full": (), "diagonal": ("stats.covariance",)}.get(
            cfg.stats.covariance, ("stats.covariance", "stats.rank")
        ),
        fn=lazy("clpt.stages.fit_stats", "run"),
    )
)
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
    """The method's own classifier: None (its aligned task heads) or a head name.

    A compensated head (`ca+drift`, SLDC's) falls back to its stale twin in a run
    whose `drift.method` is none."""
    own = METHODS.get(cfg.method).classifier
    if own is not None and own.endswith(DRIFT_SUFFIX) and not cfg.drift.enabled:
        return own[: -len(DRIFT_SUFFIX)]
    return own


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


def _drift_keys(cfg: RunConfig) -> tuple[str, ...]:
    return ("drift.method", f"drift.{cfg.drift.method}") if cfg.drift.enabled else ("drift.method",)


# Drift compensation (docs/methods/drift.md): only in runs with a drift method, between stats and align.
declare(
    Stage(
        "pairs",
        "paired features (task t's training images under the previous backbone)",
        "clpt extract-pairs {run} --task {task}",
        inputs=lambda cfg, t: [("train", t - 1)] if t > 0 else [],
        config_keys=lambda cfg: (),
        fn=lazy("clpt.stages.pairs", "run"),
        reads_images=True,
    )
)
declare(
    Stage(
        "drift",
        "compensated class statistics",
        "clpt fit-drift {run} --task {task}",
        # the pairs and task t's own rows; the old classes' statistics as they stood after task t-1
        inputs=lambda cfg, t: (
            [("pairs", t), ("extract", t), ("stats", t - 1), *([("drift", t - 1)] if t > 1 else [])]
            if t > 0
            else []
        ),
        config_keys=lambda cfg: (*_drift_keys(cfg), "stats.ridge"),  # the ridge decides what is repaired
        fn=lazy("clpt.stages.drift", "run"),
    )
)
DRIFT_STAGES = ("pairs", "drift")


def head_name(name: str) -> tuple[str, bool]:
    """`lda+drift` -> ("lda", True): the registered head and whether it reads compensated statistics."""
    return (name[: -len(DRIFT_SUFFIX)], True) if name.endswith(DRIFT_SUFFIX) else (name, False)


@functools.cache
def head_stage(name: str) -> Stage:
    """The stage of classifier head `name` (or `NAME+drift`), declared from its registration in `clpt.heads`."""
    base, compensated = head_name(name)
    spec = HEADS.get(base)
    if not compensated:
        inputs, keys = spec.inputs, spec.config_keys
    else:
        if not spec.drift:
            raise ValueError(f"head {base!r} has no drift-compensated variant")
        inputs, keys = spec.drift_inputs or spec.inputs, spec.drift_config_keys or spec.config_keys

    def all_inputs(cfg: RunConfig, t: int) -> list[tuple[str, int]]:
        # every head scores the test features of task t; a compensated one reads task t's drift stage
        return [*inputs(cfg, t), ("extract", t), *([("drift", t)] if compensated and t > 0 else [])]

    return Stage(
        f"{HEAD_PREFIX}{name}",
        f"the {name} head",
        f"clpt heads {{run}} --head {name} --task {{task}}",
        inputs=all_inputs,
        config_keys=lambda cfg: (f"heads.{base}", *keys(cfg), *(_drift_keys(cfg) if compensated else ())),
        fn=functools.partial(lazy("clpt.stages.evaluate", "run_head"), name),
    )


def head_names(cfg: RunConfig, names: list[str]) -> list[str]:
    """`names`, then, with a drift method, the compensated variant of each that has one."""
    if not cfg.drift.enabled:
        return list(names)
    return [*names, *(f"{n}{DRIFT_SUFFIX}" for n in names if HEADS.get(n).drift)]


def get_stage(name: str) -> Stage:
    if name.startswith(HEAD_PREFIX):
        return head_stage(name[len(HEAD_PREFIX) :])
    return TASK_STAGES.get(name)


def run_order(cfg: RunConfig) -> list[str]:
    """Stages of one task, in order: the core five (the method's classifier head before eval), then the heads."""
    own = classifier(cfg)
    bases = list(cfg.heads.enabled)
    if own and head_name(own)[0] not in bases:
        bases.insert(0, head_name(own)[0])
    heads = [f"{HEAD_PREFIX}{h}" for h in head_names(cfg, bases)]
    core = [*CORE[:3], *(DRIFT_STAGES if cfg.drift.enabled else ()), *CORE[3:]]  # [pairs, drift] after stats
    if own:
        first = f"{HEAD_PREFIX}{own}"
        return [*core[:-1], first, "eval", *(h for h in heads if h != first)]
    return [*core, *heads]


def command(stage: str, root, task: int) -> str:
    """The command that produces `stage` of task `task` in run folder `root`."""
    return get_stage(stage).command.format(run=root, task=task)


def explain(e: ClptError) -> ClptError:
    """`e` with its fix written out from the command its `Redo` stage declares (in place; returned)."""
    if e.redo is not None:
        r = e.redo
        e.hint, e.redo = e.fix(command(r.stage, r.root, r.task)), None
    return e
