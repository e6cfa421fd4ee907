"""Evaluation from cached test features, and the continual-learning metrics.

Row T of the accuracy matrix holds, for each task j <= T, the accuracy on task
j's test classes after task T, predicting by argmax over all seen classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clpt import distributed as dist
from clpt.errors import MissingInputError
from clpt.io import read_json, write_json


def accuracy_row(logits: torch.Tensor, labels: torch.Tensor, tasks: list[list[int]]) -> dict:
    pred = logits.argmax(dim=1)
    correct = pred == labels
    per_task = []
    for start, stop in tasks:
        mask = (labels >= start) & (labels < stop)
        per_task.append(float(correct[mask].float().mean()) if mask.any() else float("nan"))
    return {"accuracy": float(correct.float().mean()), "per_task": per_task, "n_test": int(len(labels))}


def metrics(acc_matrix: list[list[float]], accuracies: list[float]) -> dict:
    """Last-Acc, Inc-Acc and forgetting from rows 0..T (rows are ragged: row i has i + 1 entries)."""
    T = len(acc_matrix) - 1
    last = acc_matrix[T]
    if T > 0:
        forgetting = float(np.mean([max(acc_matrix[i][j] for i in range(j, T)) - last[j] for j in range(T)]))
        old = float(np.mean(last[:T]))
    else:
        forgetting, old = 0.0, float("nan")
    return {
        "last_acc": accuracies[T],
        "inc_acc": float(np.mean(accuracies)),
        "forgetting": forgetting,
        "old_task_acc": old,
        "new_task_acc": last[T],
    }


def eval_stage(run, t: int, resume: bool = True) -> tuple[list[Path], dict]:
    from clpt.align import load_aligned_heads
    from clpt.features import open_features

    out = run.eval_path(t)
    if not dist.is_main():
        return [out], {}
    heads = load_aligned_heads(run.aligned_path(t))
    feats, labels = open_features(run, t, "test")
    x = torch.from_numpy(np.asarray(feats[...]))
    y = torch.from_numpy(np.asarray(labels[...]))
    with torch.no_grad():
        logits = heads(x)
    row = accuracy_row(logits, y, run.info.tasks[: t + 1])
    row["task"] = t
    write_json(out, row)
    return [out], {"accuracy": row["accuracy"]}


def report(run, t: int | None = None) -> dict:
    """The JSON document of `clpt eval --json`: accuracy matrix and metrics up to task t."""
    if t is None:
        done = [i for i in range(run.info.n_tasks) if run.state("eval", i) == "done"]
        if not done:
            raise MissingInputError(
                f"{run.root} has no evaluated task yet", hint=f"run `clpt run {run.root}`"
            )
        t = max(done)
    rows, accs = [], []
    for i in range(t + 1):
        if run.state("eval", i) != "done":
            raise MissingInputError(
                f"the accuracy matrix up to task {t} needs the evaluation of task {i}",
                hint=f"run `clpt eval {run.root} --task {i}` (or `clpt run {run.root}`)",
            )
        r = read_json(run.eval_path(i))
        rows.append(r["per_task"])
        accs.append(r["accuracy"])
    return {
        "run": str(run.root),
        "method": run.cfg.method.value,
        "task": t,
        "n_tasks": run.info.n_tasks,
        "accuracy": accs[t],
        "accuracies": accs,
        "acc_matrix": rows,
        **metrics(rows, accs),
    }
