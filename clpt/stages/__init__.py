"""The stages of a run: their declarations (`graph`), and one module per stage function.

    base        Stage, StageContext, RunInfo: what a stage is and what it is given
    graph       every stage declared once (inputs, config keys, command), the order of a task's stages
    resolve     presets, head settings and validation: a config file and overrides -> RunConfig
    train       the learner of the run's method on task t                        [train]
    extract     features of task t's training images and of all seen test images [extract]
    fit_stats   per-class sufficient statistics of task t                         [stats]
    align       classifier alignment of the task heads                            [align]
    evaluate    the method's classifier and each head on the test features
    results     the accuracy matrices read back from the rows (`clpt eval --json`; imports no torch)
    heads       RunCache: the run folder as the cache a head's fit reads

Stage modules read and write artifacts and call library code (`clpt.train`,
`clpt.features`, `clpt.stats`, `clpt.align`, `clpt.heads`, ...), which knows
nothing of run folders or commands.
"""

from clpt.stages.base import RunInfo, Stage, StageContext
from clpt.stages.graph import CORE, HEAD_PREFIX, TASK_STAGES, command, explain, get_stage, run_order

__all__ = [
    "CORE",
    "HEAD_PREFIX",
    "TASK_STAGES",
    "RunInfo",
    "Stage",
    "StageContext",
    "command",
    "explain",
    "get_stage",
    "run_order",
]
