"""Evaluation from cached test features, and the continual-learning metrics.

Row T of the accuracy matrix holds, for each task j <= T, the accuracy on task
j's test classes after task T, predicting by argmax over all seen classes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from clpt import artifacts
from clpt import distributed as dist
from clpt.errors import MissingInputError


def accuracy_row(logits: torch.Tensor, labels: torch.Tensor, tasks: list[list[int]]) -> dict:
    """Top-1 accuracy overall and per task, top-5 overall, and each task's number of test images."""
    pred = logits.argmax(dim=1)
    correct = pred == labels
    k = min(5, logits.shape[1])
    top5 = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    per_task, per_task_n = [], []
    for start, stop in tasks:
        mask = (labels >= start) & (labels < stop)
        per_task.append(float(correct[mask].float().mean()) if mask.any() else float("nan"))
        per_task_n.append(int(mask.sum()))
    return {
        "accuracy": float(correct.float().mean()),
        "top5": float(top5.float().mean()),
        "per_task": per_task,
        "per_task_n": per_task_n,
        "n_test": int(len(labels)),
    }


def metrics(acc_matrix: list[list[float]], accuracies: list[float], counts: list[int] | None = None) -> dict:
    """Last-Acc, Inc-Acc, forgetting, old/new accuracy from rows 0..T (row i has i + 1 entries).

    Two conventions (METHOD_HEADS.md 1): `last_acc` / `inc_acc` are sample-weighted, the accuracy
    over all test images of the seen classes (SLCA, MIST, PILOT); `last_acc_task_balanced` /
    `inc_acc_task_balanced` average the per-task accuracies of each row (RanPAC's tables).

    Old and new classes after the last task T (tasks < T and task T): `old_task_acc` averages the
    old tasks' accuracies (task-averaged); `old_acc` and `new_acc` weight them by test images
    (sample-weighted; needs `counts`, the last row's images per task, else None).
    """
    T = len(acc_matrix) - 1
    last = acc_matrix[T]
    if T > 0:
        forgetting = float(np.mean([max(acc_matrix[i][j] for i in range(j, T)) - last[j] for j in range(T)]))
        old = float(np.mean(last[:T]))
    else:
        forgetting, old = 0.0, float("nan")
    old_sw = None
    if counts is not None and len(counts) == len(last) and T > 0 and sum(counts[:T]):
        old_sw = float(np.dot(last[:T], counts[:T]) / sum(counts[:T]))
    return {
        "old_acc": old_sw,
        "new_acc": last[T],
        "last_acc": accuracies[T],
        "inc_acc": float(np.mean(accuracies)),
        "forgetting": forgetting,
        "old_task_acc": old,
        "new_task_acc": last[T],
        "last_acc_task_balanced": float(np.mean(last)),
        "inc_acc_task_balanced": float(np.mean([np.mean(row) for row in acc_matrix])),
    }


def eval_stage(ctx) -> tuple[list[Path], dict]:
    """The method's own classifier (aligned heads, or the trained ones without alignment) on task T's test set."""
    from clpt.methods import METHODS

    run, t = ctx.run, ctx.task
    out = artifacts.eval_path(run.root, t)
    if not dist.is_main():
        return [out], {}
    own = METHODS.get(run.cfg.method).classifier
    if own is not None:  # a statistics head is the method's classifier: its row is the method's row
        row = artifacts.read_eval(artifacts.head_eval_path(run.root, own, t), "clpt-head-eval")
        row = {
            k: row[k] for k in ("accuracy", "top5", "per_task", "per_task_n", "n_test", "task") if k in row
        }
        artifacts.write_eval(out, row)
        return [out], {"accuracy": row["accuracy"], "classifier": own}
    heads = artifacts.load_aligned_heads(artifacts.aligned_path(run.root, t))
    x, y = artifacts.read_features(run.root, t, "test")
    with torch.no_grad():
        logits = heads(x)
    row = accuracy_row(logits, y, run.info.tasks[: t + 1])
    row["task"] = t
    artifacts.write_eval(out, row)
    return [out], {"accuracy": row["accuracy"]}


def head_stage(name: str):
    """The stage function of head `name`: fit from the cache, score task T's cached test features."""

    def stage(ctx) -> tuple[list[Path], dict]:
        from clpt.heads import HEADS, HeadContext, score_in_chunks

        run, t = ctx.run, ctx.task
        out = artifacts.head_eval_path(run.root, name, t)
        if not dist.is_main():
            return [out], {}
        device = dist.resolve_device(run.cfg.system.device)
        hctx = HeadContext(run.root, run.cfg, t, run.info.tasks, device, label=f"task {t} head:{name}")
        t0 = time.perf_counter()
        scores = HEADS.get(name).fit(hctx, run.cfg.heads.of(name))
        fit_s = time.perf_counter() - t0
        x, y = artifacts.read_features(run.root, t, "test")
        logits = score_in_chunks(scores, x, device)
        row = accuracy_row(logits, y, run.info.tasks[: t + 1])
        info = getattr(scores, "info", None)
        row.update(task=t, head=name, fit_seconds=round(fit_s, 4), **({"fit": info} if info else {}))
        artifacts.write_eval(out, row, fmt="clpt-head-eval")
        return [out], {"accuracy": row["accuracy"], "fit_seconds": round(fit_s, 4)}

    return stage


def _matrix(run, t: int, stage: str, path_of, fmt: str, command: str) -> tuple[list, list]:
    rows, accs = [], []
    for i in range(t + 1):
        state = run.state(stage, i)
        if state == "damaged":
            raise run.damaged_error(stage, i)
        if state != "done":
            raise MissingInputError(
                f"the accuracy matrix up to task {t} needs {stage} of task {i}",
                hint=f"run `{command.format(run=run.root, task=i)}` (or `clpt run {run.root}`)",
            )
        r = artifacts.read_eval(path_of(i), fmt, command.format(run=run.root, task=i) + " --force")
        rows.append(r["per_task"])
        accs.append(r["accuracy"])
        extra = {"top5": r.get("top5"), "counts": r.get("per_task_n")}  # absent in rows of older runs
    return rows, accs, extra


def head_report(run, t: int) -> dict:
    """{head: {accuracy, acc_matrix, last_acc, inc_acc, forgetting, ...}} for every head done up to task t."""
    from clpt.heads import HEADS

    out = {}
    names = list(run.cfg.heads.enabled) + [h for h in HEADS.names() if h not in run.cfg.heads.enabled]
    for name in names:
        stage = f"head:{name}"
        if not all(run.state(stage, i) in ("done", "damaged") for i in range(t + 1)):
            continue  # not evaluated up to task t; a damaged row is an error (in _matrix), never skipped
        rows, accs, extra = _matrix(
            run, t, stage, lambda i, n=name: artifacts.head_eval_path(run.root, n, i),
            "clpt-head-eval", f"clpt heads {{run}} --head {name} --task {{task}}",
        )  # fmt: skip
        out[name] = {"accuracy": accs[t], "top5": extra["top5"], "accuracies": accs, "acc_matrix": rows,
                     **metrics(rows, accs, extra["counts"])}  # fmt: skip
    return out


def report(run, t: int | None = None) -> dict:
    """The JSON document of `clpt eval --json`: accuracy matrix and metrics up to task t, and the heads'."""
    if t is None:
        done = [i for i in range(run.info.n_tasks) if run.state("eval", i) == "done"]
        if not done:
            raise MissingInputError(
                f"{run.root} has no evaluated task yet", hint=f"run `clpt run {run.root}`"
            )
        t = max(done)
    rows, accs, extra = _matrix(
        run,
        t,
        "eval",
        lambda i: artifacts.eval_path(run.root, i),
        "clpt-eval",
        "clpt eval {run} --task {task}",
    )
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
