"""Scale: what a task costs as the number of tasks grows (issue 20's benchmark; more sections as they land).

    python bench/scale.py                       # tasks 5, 20, 100, 300
    python bench/scale.py --tasks 5 20 --head-tasks 5 20

Sections, each measured in one run against its own baseline:

  machinery  the run machinery's per-task overhead on a cache-only run: checking every stage of the
             last task (markers, digests, inputs) when all tasks before it are done, with markers
             written for T tasks of a run (no training, no features). The baseline is the same check at
             the smallest T; the ratio is the growth (target: flat, within 1.2x from 20 to 300 tasks).
  heads      fitting each head at the last task from synthetic cached features (d = 768 by default,
             10 classes and 50 rows per class per task): the cost of task T's fit against T, which
             grows with T where a head refits from tasks 0..T; `fecam incr.` is FeCAM as a run fits it,
             updating task T-1's saved state with task T's classes only.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch


def machinery(n_tasks: int, repeats: int = 3, remember: bool = True) -> tuple[float, float]:
    """(seconds to check every stage of the last task, seconds per task of checking every task's stages,
    as a resumed `clpt run` does) on a run whose T tasks are all done. `remember=False`: the machinery
    without its memory of markers and states (the baseline: how it was before)."""
    from clpt.run import Run
    from clpt.stages import RunInfo, run_order
    from clpt.stages import resolve as R

    cfg = R.resolve(overrides=["benchmark.init_classes=1", "benchmark.increment=1"])
    info = RunInfo("builtin", n_tasks, [[t, t + 1] for t in range(n_tasks)], list(range(n_tasks)),
                   [f"c{t}" for t in range(n_tasks)], {})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(Path(tmp), cfg, info)
        order = run_order(cfg)
        for t in range(
            n_tasks
        ):  # markers in stage order, each naming its inputs' ids, as run_stage writes them
            for stage in order:
                inputs = {f"{s}/{i}": run.marker(s, i)["id"] for s, i in run.inputs(stage, t)}  # type: ignore[index]
                run.complete(stage, t, inputs, [], 0.0, {})
        last, per_task = [], []
        for _ in range(repeats):
            fresh = _forgetful(Run(Path(tmp), cfg, info), remember)  # a new command: nothing remembered
            t0 = time.perf_counter()
            assert all(fresh.state(s, n_tasks - 1) == "done" for s in order)
            last.append(time.perf_counter() - t0)
            fresh = _forgetful(Run(Path(tmp), cfg, info), remember)
            t0 = time.perf_counter()
            assert all(fresh.state(s, t) == "done" for t in range(n_tasks) for s in order)
            per_task.append((time.perf_counter() - t0) / n_tasks)
            if not remember and n_tasks > 20:
                break  # the baseline grows as T^2 per task: one repeat is enough
    return statistics.median(last), statistics.median(per_task)


def _forgetful(run, remember: bool):
    if not remember:  # every lookup reads and checks again, recursively, as before the memory
        run.state, run.marker = run._state, run._read_marker
    return run


def heads(n_tasks: int, d: int, classes: int, rows: int) -> dict[str, float]:
    """Seconds of each head's fit at the last task (from features in memory: InMemoryCache)."""
    from clpt.heads import HEADS, InMemoryCache
    from clpt.model import Heads
    from clpt.stages import resolve as R

    g = torch.Generator().manual_seed(0)
    n_cls = n_tasks * classes
    y = torch.arange(n_cls).repeat_interleave(rows)
    x = torch.randn(len(y), d, generator=g) + 3 * torch.randn(n_cls, d, generator=g)[y]
    tasks = [[t * classes, (t + 1) * classes] for t in range(n_tasks)]
    cfg = R.resolve(overrides=["align.epochs=1", "align.samples_per_class=16", "heads.ranpac.dim=2000"])
    cache = InMemoryCache(x, y, tasks, n_tasks - 1, cfg, heads=Heads(d, [classes] * n_tasks))
    out = {}
    for name in ("ncm", "lda", "fecam", "ranpac", "ca"):
        t0 = time.perf_counter()
        HEADS.get(name).fit(cache, cfg.heads.of(name))
        out[name] = time.perf_counter() - t0
    # fecam as a run fits it: task T-1's saved state updated with task T's classes
    settings = cfg.heads.of("fecam")
    before = InMemoryCache(x, y, tasks, n_tasks - 2, cfg) if n_tasks > 1 else None
    if before is not None:
        prev = HEADS.get("fecam").fit(before, settings)
        md = {"settings": dataclasses.asdict(settings), "n_classes": tasks[-1][0], "meta": prev.meta()}
        cache.previous_state = lambda head: (prev.tensors(), md)  # type: ignore[method-assign]
        t0 = time.perf_counter()
        HEADS.get("fecam").fit(cache, settings)
        out["fecam incr."] = time.perf_counter() - t0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[5, 20, 100, 300])
    ap.add_argument("--head-tasks", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--baseline-max", type=int, default=100, help="largest T for the (quadratic) baseline")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        "machinery: a cache-only run whose T tasks are done; a fresh command checks the last task's stages,"
    )
    print("  and a resumed `clpt run` checks every task's stages (per task); before = without the memory")
    base = None
    for n in args.tasks:
        last, per = machinery(n)
        b_last, b_per = machinery(n, remember=False) if n <= args.baseline_max else (float("nan"),) * 2
        base = base or per
        print(
            f"  T = {n:4d}: last task {1000 * last:7.2f} ms (before {1000 * b_last:8.2f});  per task "
            f"{1000 * per:6.2f} ms, x{per / base:4.2f} of T = {args.tasks[0]} (before {1000 * b_per:8.2f} ms)"
        )
    print(f"heads: the fit at the last task, d = {args.dim}, 10 classes x 50 rows per task")
    first = None
    for n in args.head_tasks:
        h = heads(n, args.dim, 10, 50)
        first = first or h
        print(f"  T = {n:4d}: " + "  ".join(f"{k} {v:6.2f} s (x{v / first[k]:4.1f})" for k, v in h.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
