"""Learners, registered by name: how the backbone and the task heads are trained on one task.

A learner is a function `train(model, bench, cfg, task, device, learner_state) -> summary`
that trains task `task` in place on `model` (adding its task head) and returns a
JSON-able summary; `learner_state` is a flat dict of tensors kept across tasks in
the model checkpoint (MIST's projection head and masks), empty for learners
without state. `config_keys` names the config sections (beyond the ones every
training depends on) whose edit makes the learner's training stale.

Adding a learner: a module with its training function, and one
`register_learner(LearnerSpec(...))` line here, with the function named lazily so
that reading a run's state imports no training code. A method then names it
(`clpt.methods`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from clpt.registry import Registry, lazy


@dataclass(frozen=True)
class LearnerSpec:
    name: str
    summary: str
    train: Callable[..., dict]  # (model, bench, cfg, task, device, learner_state) -> summary
    config_keys: tuple[str, ...] = ()  # config sections its result depends on, beyond train/backbone/...
    trains_heads: bool = True  # False: its task heads stay as initialised (CA then aligns them at task 0 too)


LEARNERS: Registry[LearnerSpec] = Registry("learner")


def register_learner(spec: LearnerSpec) -> LearnerSpec:
    return LEARNERS.register(spec.name, spec)


register_learner(
    LearnerSpec("slow_learner", "SLCA's slow learner: SGD on the current task's head and the backbone",
                lazy("clpt.train", "train_task_sl"))
)  # fmt: skip
register_learner(
    LearnerSpec("mist", "MIST: sparse, sensitivity-chosen tuning of the backbone's own weights",
                lazy("clpt.mist", "train_task_mist"), config_keys=("mist",), trains_heads=False)
)  # fmt: skip
register_learner(
    LearnerSpec("none", "no training: the frozen backbone and an untrained task head",
                lazy("clpt.train", "no_training"), trains_heads=False)
)  # fmt: skip
