"""A run's accuracy matrices, read back from the evaluation rows: what `clpt eval --json` prints.

Reading results needs the rows (JSON) and the run's state only, never torch: `eval --json`
of a finished task stays as quick as `clpt status`. The rows are written by the eval and
head stages (`clpt.stages.evaluate`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from clpt import artifacts
from clpt.errors import MissingInputError, Redo
from clpt.evaluate import metrics
from clpt.heads.registry import HEADS
from clpt.stages.base import RunView
from clpt.stages.graph import head_names


def _matrix(
    run: RunView, t: int, stage: str, path_of: Callable[[int], Path], fmt: str
) -> tuple[list, list, dict]:
    """Rows 0..t of `stage`'s accuracy matrix, each row's accuracy, and the last row's top-5 and counts."""
    rows, accs = [], []
    extra: dict = {}
    for i in range(t + 1):
        state = run.state(stage, i)
        if state == "damaged":
            raise run.damaged_error(stage, i)
        if state != "done":
            raise MissingInputError(
                f"the accuracy matrix up to task {t} needs {stage} of task {i}",
                hint=f"run {{command}} (or `clpt run {run.root}` for everything)",
                redo=Redo(stage, i, str(run.root), force=False),
            )
        r = artifacts.read_eval(path_of(i), fmt, Redo(stage, i, str(run.root)))
        rows.append(r["per_task"])
        accs.append(r["accuracy"])
        extra = {"top5": r.get("top5"), "counts": r.get("per_task_n")}  # absent in rows of older runs
    return rows, accs, extra


def head_report(run: RunView, t: int) -> dict:
    """{head: {accuracy, acc_matrix, last_acc, inc_acc, forgetting, ...}} for every head done up to task t."""
    out = {}
    names = head_names(
        run.cfg, list(run.cfg.heads.enabled) + [h for h in HEADS.names() if h not in run.cfg.heads.enabled]
    )
    for name in names:
        stage = f"head:{name}"
        if not all(run.state(stage, i) in ("done", "damaged") for i in range(t + 1)):
            continue  # not evaluated up to task t; a damaged row is an error (in _matrix), never skipped
        rows, accs, extra = _matrix(run, t, stage, functools.partial(artifacts.head_eval_path, run.root, name),
                                    "clpt-head-eval")  # fmt: skip
        out[name] = {"accuracy": accs[t], "top5": extra["top5"], "accuracies": accs, "acc_matrix": rows,
                     **metrics(rows, accs, extra["counts"])}  # fmt: skip
    return out


def report(run: RunView, t: int | None = None) -> dict:
    """The JSON document of `clpt eval --json`: accuracy matrix and metrics up to task t, and the heads'."""
    if t is None:
        done = [i for i in range(run.info.n_tasks) if run.state("eval", i) == "done"]
        if not done:
            raise MissingInputError(
                f"{run.root} has no evaluated task yet", hint=f"run `clpt run {run.root}`"
            )
        t = max(done)
    rows, accs, extra = _matrix(run, t, "eval", lambda i: artifacts.eval_path(run.root, i), "clpt-eval")
    return {
        "run": str(run.root),
        "method": run.cfg.method,
        "task": t,
        "n_tasks": run.info.n_tasks,
        "accuracy": accs[t],
        "top5": extra["top5"],
        "accuracies": accs,
        "acc_matrix": rows,
        **metrics(rows, accs, extra["counts"]),
        "heads": head_report(run, t),
    }
