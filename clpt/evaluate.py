"""The continual-learning metrics: an accuracy row from scores, and the metrics of an accuracy matrix.

Row T of the accuracy matrix holds, for each task j <= T, the accuracy on task
j's test classes after task T, predicting by argmax over all seen classes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


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

    Two conventions (docs/methods/heads.md, metrics): `last_acc` / `inc_acc` are sample-weighted, the accuracy
    over all test images of the seen classes (SLCA, MIST, PILOT); `last_acc_task_balanced` /
    `inc_acc_task_balanced` average the per-task accuracies of each row (RanPAC's tables).

    Old and new classes after the last task T (tasks < T and task T): `old_task_acc` averages the
    old tasks' accuracies (task-averaged); `old_acc` and `new_acc` weight them by test images
    (sample-weighted; needs `counts`, the last row's images per task, else None).
    """
    import numpy as np

    T = len(acc_matrix) - 1
    last = acc_matrix[T]
    if T > 0:
        forgetting = float(np.mean([max(acc_matrix[i][j] for i in range(j, T)) - last[j] for j in range(T)]))
        old = float(np.mean(last[:T]))
    else:
        forgetting, old = 0.0, float("nan")
    old_sw = None
    if counts is not None and len(counts) == len(last) and T > 0 and sum(counts[:T]) > 0:
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
