"""Scale: what a task costs as the number of tasks and classes grows (issue 20's benchmark).

    python bench/scale.py                                   # everything (several minutes on 2 cores)
    python bench/scale.py --tasks 5 20 --head-tasks 5 20 --classes 100 1000
    python bench/scale.py --skip machinery classes          # one section

Sections, each measured in one run against its own baseline:

  machinery  the run machinery's per-task overhead on a cache-only run: checking every stage of the
             last task (markers, digests, inputs) when all tasks before it are done, with markers
             written for T tasks of a run (no training, no features). Baseline: the machinery without
             its memory of markers and states (as before), and the smallest T (target: flat, within
             1.2x from 20 to 300 tasks).
  per-task   synthetic features (d = 768, 10 classes x 50 rows a task, lowrank statistics): each head's
             fit at task T as a run does it (ncm, lda, fecam, ranpac update task T-1's state and read task
             T's data alone), fit-stats of task T, and CA at task T (it aligns every seen class, so its
             cost grows with the classes by design); baseline: the same heads fitted from scratch (every
             task's features again), up to --scratch-max.
  classes    statistics of 100 / 1,000 / 10,000 classes in each form (full, diagonal, lowrank): fit-stats
             time, the statistics' size, NCM and LDA from them, one CA epoch, and peak host memory of a
             fresh process; the full form is not run where its matrices alone would not fit in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
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


def warm_up() -> None:
    """torch's first optimizer imports torch._dynamo (seconds): done before anything is timed."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def synthetic(n_cls: int, d: int, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of `n_cls` classes (`rows` each, grouped by class): a shared mean, a class mean, a few
    strong directions per class and a noise floor, as backbone features have."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_cls).repeat_interleave(rows)
    x = torch.randn(len(y), d, generator=g) + 3 * torch.randn(n_cls, d, generator=g)[y] + 1.0
    x += torch.randn(len(y), 4, generator=g) @ torch.randn(4, d, generator=g)
    return x, y


class Carried:
    """An InMemoryCache whose `previous_state` is the state the last fit of each head returned (with its
    carry), as a run keeps it on disk: heads fitted task after task update instead of refitting."""

    def __init__(self, cache):
        self.cache, self.saved = cache, {}
        self.nbytes: dict[str, dict[int, int]] = {}  # head -> task -> bytes of tensors its file holds

    def fit(self, name: str, task: int):
        from clpt.heads import HEADS

        c, spec = self.cache, HEADS.get(name)
        c.task = task
        c.previous_state = lambda head: self.saved.get(head) if task > 0 else None
        settings = c.cfg.heads.of(name)
        t0 = time.perf_counter()
        state = spec.fit(c, settings)
        sec = time.perf_counter() - t0
        md = {"settings": dataclasses.asdict(settings), "n_classes": c.n_seen, "meta": state.meta(),
              "carry": state.carry or None}  # fmt: skip
        self.saved[name] = (state.tensors(), md)  # NCM's and FeCAM's: a part, the task's own classes
        self.nbytes.setdefault(name, {})[task + 1] = sum(v.nbytes for v in self.saved[name][0].values())
        return sec


WINDOW = 5  # tasks whose median fit time stands for task T


def windowed(seconds: dict[int, float], t: int) -> float:
    """The median of the times of tasks max(1, T - WINDOW + 1) .. T."""
    return statistics.median(seconds[i] for i in range(max(1, t - WINDOW + 1), t + 1))


def per_task(n_tasks: list[int], d: int, classes: int, rows: int, scratch_max: int, ca_max: int) -> None:
    """Each head's fit at task T as a run does it (updating task T-1's state: ncm, lda, fecam, ranpac),
    fit-stats of task T, and CA at task T (it aligns every seen class: its cost grows with the classes);
    from scratch (every task's features again) up to T = scratch_max, the baseline."""
    from clpt.align import align_on_stats
    from clpt.heads import HEADS, ClassStats, InMemoryCache
    from clpt.model import Heads
    from clpt.stages import resolve as R
    from clpt.stats import compress, fit_class_stats

    warm_up()
    big = max(n_tasks)
    x, y = synthetic(big * classes, d, rows)
    tasks = [[t * classes, (t + 1) * classes] for t in range(big)]
    cfg = R.resolve(overrides=["method=seqft", "stats.covariance=lowrank", "heads.ranpac.dim=2000",
                               "align.epochs=1", "align.samples_per_class=64"])  # fmt: skip
    cache = InMemoryCache(x, y, tasks, 0, cfg)
    run = Carried(cache)
    names = ("ncm", "lda", "fecam", "ranpac")
    times: dict[str, dict[int, float]] = {k: {} for k in (*names, "fit-stats", "ca", *(f"{n} scratch" for n in names))}
    stats_parts: list = []
    for t in range(big):
        t0 = time.perf_counter()
        m = fit_class_stats(cache.train_chunks(t), range(*tasks[t]), d)
        part = (m.count, m.mean, compress(m.m2, cfg.stats.covariance, cfg.stats.rank), m.m2.sum(0))
        times["fit-stats"][t + 1] = time.perf_counter() - t0
        stats_parts.append(part)
        for name in names:
            times[name][t + 1] = run.fit(name, t)
        if (t + 1) % 20 == 0:
            print(f"  ... task {t + 1} of {big}", file=sys.stderr, flush=True)
        if t + 1 in n_tasks and t + 1 <= ca_max:
            st = ClassStats.from_tasks(*(list(p) for p in zip(*stats_parts, strict=True)))
            heads = Heads(d, [classes] * (t + 1))
            t0 = time.perf_counter()
            align_on_stats(heads, st, t, cfg, torch.device("cpu"))
            times["ca"][t + 1] = time.perf_counter() - t0
        if t + 1 in n_tasks:
            if t + 1 <= scratch_max:
                for name in names:
                    cache.task, cache.previous_state = t, lambda head: None
                    t0 = time.perf_counter()
                    HEADS.get(name).fit(cache, cfg.heads.of(name))
                    times[f"{name} scratch"][t + 1] = time.perf_counter() - t0
    print(f"per task, d = {d}, {classes} classes x {rows} rows a task, lowrank statistics (r = {cfg.stats.rank}), "
          f"RanPAC M = 2000; seconds at task T (ncm, lda, fecam, ranpac, fit-stats: the median of tasks T - "
          f"{WINDOW - 1} .. T, each fitted once), and the growth from the first T to the last")  # fmt: skip
    print("  " + f"{'':16}" + "".join(f"{'T = ' + str(n):>11}" for n in n_tasks) + "   growth")
    for k in (*names, "fit-stats"):  # one task's fit is a tenth of a second, as is the machine's noise
        times[k] = {n: windowed(times[k], n) for n in n_tasks}
    for k, v in times.items():
        row = [v.get(n) for n in n_tasks]
        known = [r for r in row if r is not None]
        growth = f"x{known[-1] / known[0]:5.2f}" if len(known) > 1 and known[0] > 0 else ""
        print(f"  {k:16}" + "".join(f"{r:11.3f}" if r is not None else f"{'-':>11}" for r in row) + f"   {growth}")
    print("  the state file a task writes (MB; NCM and FeCAM: the task's classes alone, continuing the one before)")
    for k in names:
        print(f"  {k:16}" + "".join(f"{run.nbytes[k][n] / 1e6:11.3f}" for n in n_tasks))
    first20 = [n for n in n_tasks if n >= 20]
    if len(first20) > 1:
        for k in (*names, "fit-stats"):
            a, b = times[k][first20[0]], times[k][first20[-1]]
            print(f"  {k}: T = {first20[0]} -> {first20[-1]}: x{b / a:.2f} (target: flat, within 1.2x)")


def _classes_one(args) -> dict:
    """In a fresh process: fit-stats in `form` for n_cls classes (tasks of 100 classes), then each head
    that reads statistics, and CA; seconds, stored bytes and peak host memory (RSS growth)."""
    n_cls, d, rows, form, with_ca = args
    from clpt.align import align_on_stats
    from clpt.heads import HEADS, ClassStats
    from clpt.model import Heads
    from clpt.stages import resolve as R
    from clpt.stats import compress, fit_class_stats

    warm_up()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # a ridge of 1e-2: with 20 rows a class at d = 768, float32 accumulation leaves the full covariance's
    # null space with rounding noise above the default 1e-4 (CA's Cholesky refused 3 of 100 classes)
    cfg = R.resolve(overrides=["method=seqft", f"stats.covariance={form}", "align.epochs=1", "stats.ridge=1e-2"])
    x, y = synthetic(n_cls, d, rows)
    per = 100
    t0 = time.perf_counter()
    parts = []
    for s in range(0, n_cls, per):
        sel = (y >= s) & (y < s + per)
        m = fit_class_stats([(x[sel], y[sel])], range(s, min(s + per, n_cls)), d)
        parts.append((m.count, m.mean, compress(m.m2, form, cfg.stats.rank), m.m2.sum(0)))
        del m
    stats_s = time.perf_counter() - t0
    del x, y
    st = ClassStats.from_tasks(*(list(p) for p in zip(*parts, strict=True)))
    del parts
    nbytes = st.scatter.nbytes() + sum(t.numel() * t.element_size() for t in (st.count, st.mean, st.pooled))
    out = {"classes": n_cls, "form": form, "fit_stats_s": stats_s, "stats_gb": nbytes / 1e9}

    class Stats:  # the statistics a head reads, nothing else
        def __init__(self):
            self.cfg, self.task, self.device, self.label, self.compensated = cfg, 0, torch.device("cpu"), "", False
            self.tasks, self.shard = [[0, n_cls]], (0, 1)

        n_seen = n_cls

        def class_stats(self):
            return st

        def previous_state(self, head):
            return None

    for name in ("ncm", "lda"):
        t0 = time.perf_counter()
        HEADS.get(name).fit(Stats(), cfg.heads.of(name))
        out[f"{name}_s"] = time.perf_counter() - t0
    if with_ca:
        t0 = time.perf_counter()
        align_on_stats(Heads(d, [n_cls]), st, 0, cfg, torch.device("cpu"))
        out["ca_epoch_s"] = time.perf_counter() - t0
    out["peak_gb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20
    return out


def classes_sweep(n_classes: list[int], d: int, rows: int, ca_max: int, mem_gb: float) -> None:
    import multiprocessing as mp

    print(f"classes: statistics of C classes (d = {d}, {rows} rows a class, fit in tasks of 100 classes), each "
          f"form; NCM and LDA from them; one CA epoch (256 samples a class, stats.ridge 1e-2) up to C = {ca_max}")  # fmt: skip
    print(f"  {'C':>6} {'form':>9} {'fit-stats s':>11} {'stats GB':>9} {'ncm s':>7} {'lda s':>7} {'CA epoch s':>10} "
          f"{'peak GB':>8}")  # fmt: skip
    ctx = mp.get_context("spawn")
    for c in n_classes:
        for form in ("full", "diagonal", "lowrank"):
            need = c * d * d * 8 / 1e9 if form == "full" else 0.0
            if need > mem_gb / 2:
                print(f"  {c:>6} {form:>9}   not run: full scatter matrices would take {need:.1f} GB (> half of "
                      f"this machine's {mem_gb:.0f} GB)")  # fmt: skip
                continue
            with ctx.Pool(1) as pool:
                r = pool.apply(_classes_one, ((c, d, rows, form, c <= ca_max),))
            ca = f"{r['ca_epoch_s']:10.2f}" if "ca_epoch_s" in r else f"{'-':>10}"
            print(f"  {c:>6} {form:>9} {r['fit_stats_s']:11.2f} {r['stats_gb']:9.3f} {r['ncm_s']:7.2f} "
                  f"{r['lda_s']:7.2f} {ca} {r['peak_gb']:8.2f}", flush=True)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[5, 20, 100, 300])
    ap.add_argument("--head-tasks", type=int, nargs="+", default=[5, 20, 100, 300])
    ap.add_argument("--scratch-max", type=int, default=20, help="largest T of the from-scratch baseline")
    ap.add_argument("--classes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--ca-max", type=int, default=1000, help="largest C for the CA epoch")
    ap.add_argument("--ca-max-tasks", type=int, default=100,
                    help="largest T for CA in the per-task section (its steps grow with the task heads)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--baseline-max", type=int, default=100, help="largest T for the (quadratic) baseline")
    ap.add_argument("--skip", nargs="*", default=[], choices=["machinery", "per-task", "classes"])
    args = ap.parse_args()
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {mem_gb:.0f} GB of memory")
    if "machinery" not in args.skip:
        print("machinery: a cache-only run whose T tasks are done; a fresh command checks the last task's stages,")
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
    if "per-task" not in args.skip:
        per_task(args.head_tasks, args.dim, 10, 50, args.scratch_max, args.ca_max_tasks)
    if "classes" not in args.skip:
        classes_sweep(args.classes, args.dim, 20, args.ca_max, mem_gb)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
