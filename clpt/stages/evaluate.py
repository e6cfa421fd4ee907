"""The eval stage (the method's own classifier), the head stages, and the accuracy report of a run.

Both score task T's cached test features over all seen classes and write row T
of their accuracy matrix (`eval.json`, `heads/NAME.json`); `report` assembles
the matrices and metrics of `clpt eval --json`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import torch

from clpt import artifacts, checkpoint
from clpt import distributed as dist
from clpt.errors import ClptError, MissingInputError, Redo
from clpt.evaluate import accuracy_row, metrics
from clpt.heads import HEADS, score_in_chunks
from clpt.io import write_bytes
from clpt.stages.base import RunView, StageContext
from clpt.stages.graph import classifier, head_name, head_names
from clpt.stages.heads import RunCache

_ROW_KEYS = ("accuracy", "top5", "per_task", "per_task_n", "n_test", "task")


def run(ctx: StageContext) -> tuple[list[Path], dict]:
    """The method's own classifier (aligned heads, or a statistics head) on task T's test features."""
    t = ctx.task
    out = artifacts.eval_path(ctx.root, t)
    if not dist.is_main():
        return [out], {}
    own = classifier(ctx.cfg)
    if own is not None:  # a statistics head is the method's classifier: its row is the method's row
        row = artifacts.read_eval(artifacts.head_eval_path(ctx.root, own, t), "clpt-head-eval",
                                  ctx.redo(f"head:{own}", t))  # fmt: skip
        row = {k: row[k] for k in _ROW_KEYS if k in row}
        artifacts.write_eval(out, row, "clpt-eval")
        return [out], {"accuracy": row["accuracy"], "classifier": own}
    heads = checkpoint.load_aligned_heads(artifacts.aligned_path(ctx.root, t), ctx.redo("align", t))
    x, y = artifacts.read_features(ctx.root, t, "test")
    with torch.no_grad():
        logits = heads(x)
    row = accuracy_row(logits, y, ctx.tasks[: t + 1])
    row["task"] = t
    artifacts.write_eval(out, row, "clpt-eval")
    return [out], {"accuracy": row["accuracy"]}


def run_head(name: str, ctx: StageContext) -> tuple[list[Path], dict]:
    """Head `name`: fit from the run's cache, score task T's cached test features."""
    t = ctx.task
    out = artifacts.head_eval_path(ctx.root, name, t)
    base, compensated = head_name(name)
    spec = HEADS.get(base)
    # a sharded head fits on every rank, each from its own share of the rows; the others on rank 0
    shard = (dist.rank(), dist.world_size()) if spec.sharded else (0, 1)
    if not dist.is_main() and shard[1] == 1:
        return [out], {}
    device = dist.resolve_device(ctx.cfg.system.device)
    label = f"task {t} head:{name}" if dist.is_main() else ""
    cache = RunCache(ctx.root, ctx.cfg, t, ctx.tasks, device, label=label, compensated=compensated, shard=shard)
    t0 = time.perf_counter()
    settings = ctx.cfg.heads.of(base)
    state = spec.fit(cache, settings)
    fit_s = time.perf_counter() - t0
    if not dist.is_main():
        return [out], {}
    x, y = artifacts.read_features(ctx.root, t, "test")
    logits = score_in_chunks(state, x, device)
    if not bool(torch.isfinite(logits).all()):  # a NaN head would score as one class: never recorded
        raise ClptError(
            f"head {name} of task {t} gives non-finite scores",
            hint=f"check the settings it was fitted with (clpt config {ctx.root}), correct them and run again",
        )
    row = accuracy_row(logits, y, ctx.tasks[: t + 1])
    info = state.info
    row.update(task=t, head=name, fit_seconds=round(fit_s, 4), **({"fit": info} if info else {}))
    state_path = artifacts.head_state_path(ctx.root, name, t)
    carry = None
    if state.carry and not compensated:  # written first: the state's sha256 of it ties the two together
        # (a compensated head refits every task: nothing continues from its carry)
        data = artifacts.head_carry_bytes(name, t, state.carry)
        carry = hashlib.sha256(data).hexdigest()
        write_bytes(artifacts.head_carry_path(ctx.root, name, t), data)
    artifacts.save_head_state(state_path, name, t, cache.n_seen, state.tensors(), state.meta(),
                              dataclasses.asdict(settings), info, carry)  # fmt: skip
    artifacts.write_eval(out, row, fmt="clpt-head-eval")
    if carry is not None and t > 0:  # the previous task's carry is superseded (a Gram can be 800 MB): the latest alone is kept
        artifacts.head_carry_path(ctx.root, name, t - 1).unlink(missing_ok=True)
    return [out, state_path], {"accuracy": row["accuracy"], "fit_seconds": round(fit_s, 4)}


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
