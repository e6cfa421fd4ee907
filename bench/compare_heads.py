"""Classifier heads side by side, fitted from the cache: accuracy, fit time, peak memory.

    python bench/compare_heads.py                      # built-in benchmark + synthetic published sizes
    python bench/compare_heads.py --skip-runs --ranpac-dim 2000   # synthetic sizes only, smaller RanPAC

Part 1, the built-in benchmark, one run with a frozen backbone (`frozen_ca`) and
one with SLCA's: every head's Last-Acc, Inc-Acc, forgetting and its fit time
from the cache (summed over the 5 tasks), next to the wall time of one training
epoch of the same run (task 0's train stage / epochs), measured in this run.

Part 2, synthetic features of the published sizes (CIFAR-100: 50,000 x 768, 100
classes in 10 tasks; ImageNet-R: 24,000 x 768, 200 classes in 10 tasks): each
head's fit time after the last task and its peak memory (peak RSS growth of a
fresh process on CPU; `torch.cuda.max_memory_allocated` on a GPU). On a GPU,
compare the ImageNet-R total with one ViT-B/16 training epoch there. For FeCAM and CA the
arithmetic floor at the GEMM peaks measured in the same process is printed beside the fit
(`floor`), and the ratio. The one-off import of torch._dynamo by the first optimizer is done before
timing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

HEADS = ["ca", "linear", "ncm", "lda", "fecam", "ranpac"]
SIZES = {"cifar100": (50_000, 768, 100), "imagenet-r": (24_000, 768, 200)}


def builtin_runs(out: Path, overrides: list[str]) -> list[dict]:
    from clpt.io import read_json
    from clpt.run import create_run, report, run_all
    from clpt.stages import resolve as R

    rows = []
    for method in ("frozen_ca", "slca"):
        cfg = R.resolve(overrides=[f"method={method}", *overrides])
        run = create_run(out / method, cfg)
        run_all(run)
        rep = report(run)
        epoch_s = run.marker("train", 0)["seconds"] / cfg.train.epochs
        for head, h in rep["heads"].items():
            fit_s = sum(
                read_json(run.root / "tasks" / f"{t:03d}" / "heads" / f"{head}.json")["fit_seconds"]
                for t in range(run.info.n_tasks)
            )
            rows.append({
                "backbone": method, "head": head, "last_acc": h["last_acc"], "inc_acc": h["inc_acc"],
                "forgetting": h["forgetting"], "fit_s_all_tasks": fit_s, "train_epoch_s": epoch_s,
            })  # fmt: skip
    return rows


def _fit_one(args) -> dict:
    """In a fresh process: fit one head on synthetic features; time and peak memory of the fit alone."""
    head, (n, d, c), device, ranpac_dim = args
    from clpt.heads import HEADS as REG
    from clpt.heads import InMemoryCache
    from clpt.model import Heads
    from clpt.stages import resolve as R

    g = torch.Generator().manual_seed(0)
    mu = torch.randn(c, d, generator=g) * 0.5 + 1.0  # ViT-like: large common mean
    y = torch.arange(c).repeat_interleave(n // c)
    x = mu[y] + torch.randn(len(y), d, generator=g)
    inc = c // 10
    tasks = [[i, i + inc] for i in range(0, c, inc)]
    cfg = R.resolve(
        overrides=["benchmark.name=imagefolder", "benchmark.root=.", f"heads.ranpac.dim={ranpac_dim}"]
    )
    # heads of the right shape stand in for the trained ones (ca, linear)
    ctx = InMemoryCache(x, y, tasks, len(tasks) - 1, cfg, device, heads=Heads(d, [inc] * len(tasks)))
    settings = cfg.heads.of(head)
    if head in ("ca", "linear"):
        cfg.align.enabled = head == "linear"  # linear: just the heads; ca: align them from the statistics
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # the first optimizer imports torch._dynamo
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    REG.get(head).fit(ctx, settings)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if dev.type == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    )
    return {"size": f"{n}x{d}, {c} classes", "head": head, "fit_s": sec, "peak_mib": peak, "device": device,
            "floor_s": floor(head, n, d, c, cfg, dev)}  # fmt: skip


def gemm_peak(dtype, device, m: int = 2048) -> float:
    a = torch.randn(m, m, dtype=dtype, device=device)
    a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 3 * 2 * m**3 / (time.perf_counter() - t0)


def floor(head: str, n: int, d: int, c: int, cfg, device) -> float | None:
    """The fit's arithmetic at the GEMM peaks measured here, each at the precision the fit does it in
    (float32 for the moments and CA's sampling and training; FeCAM's factorisations in the precision
    `heads.fecam.dtype` picks, float32 by default; CA's Cholesky factors in float64): FeCAM, the class
    moments (2 n d^2) and one Cholesky factorisation per class (d^3 / 3; it keeps the factors and never
    forms an inverse, which would add 2 d^3 / 3); CA, the moments, one Cholesky per class (d^3 / 3), and
    per epoch the samples (2 C S d^2) and the heads' forward and backward (6 C S d C)."""
    if head not in ("fecam", "ca"):
        return None
    p32, p64 = gemm_peak(torch.float32, device), gemm_peak(torch.float64, device)
    moments = 2 * n * d * d / p32
    if head == "fecam":
        from clpt.heads.fecam import factor_dtype

        return moments + c * d**3 / 3 / (p32 if factor_dtype(cfg.heads.of("fecam"), d) == torch.float32 else p64)
    a = cfg.align
    per_epoch = (2 * c * a.samples_per_class * d * d + 6 * c * a.samples_per_class * d * c) / p32
    return moments + c * d**3 / 3 / p64 + a.epochs * per_epoch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-runs", action="store_true", help="only the synthetic published sizes")
    ap.add_argument("--skip-synthetic", action="store_true", help="only the built-in benchmark runs")
    ap.add_argument(
        "--ranpac-dim", type=int, default=10000, help="M for the synthetic sizes (published: 10000)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], help="override for the built-in runs"
    )
    ap.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    ap.add_argument(
        "--heads", default=",".join(HEADS), help=f"the heads of the synthetic sizes (default {','.join(HEADS)})"
    )
    ap.add_argument("--repeat", type=int, default=1, help="fits per head and size (the median is printed)")
    args = ap.parse_args()
    out = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if not args.skip_runs:
        rows = builtin_runs(Path(tempfile.mkdtemp(prefix="clpt-heads-")), args.overrides)
        out["builtin"] = rows
        print(
            "\nbuilt-in benchmark (accuracies in %; fit time from the cache, all 5 tasks):", file=sys.stderr
        )
        print(
            "| backbone | head | Last-Acc | Inc-Acc | Forgetting | fit s (5 tasks) | fit / one train epoch |",
            file=sys.stderr,
        )
        print("|---|---|---|---|---|---|---|", file=sys.stderr)
        for r in rows:
            print(
                f"| {r['backbone']} | {r['head']} | {100 * r['last_acc']:.2f} | {100 * r['inc_acc']:.2f} | "
                f"{100 * r['forgetting']:.2f} | {r['fit_s_all_tasks']:.2f} | {r['fit_s_all_tasks'] / r['train_epoch_s']:.2f} |",
                file=sys.stderr,
            )
        print(
            f"(one training epoch: frozen {rows[0]['train_epoch_s']:.2f} s, slca {rows[-1]['train_epoch_s']:.2f} s)",
            file=sys.stderr,
        )
    if not args.skip_synthetic:
        heads = [h for h in args.heads.split(",") if h]
        if unknown := sorted(set(heads) - set(HEADS)):
            ap.error(f"--heads: unknown {', '.join(unknown)}; valid: {', '.join(HEADS)}")
        jobs = [(h, SIZES[s], args.device, args.ranpac_dim) for s in SIZES for h in heads]
        ctx = mp.get_context("spawn")
        res = []
        for job in jobs:  # one fresh process per fit: its peak memory is its own
            tries = []
            for _ in range(args.repeat):
                with ctx.Pool(1) as pool:
                    tries.append(pool.apply(_fit_one, (job,)))
            res.append(sorted(tries, key=lambda r: r["fit_s"])[len(tries) // 2])  # the median fit
        out["synthetic"] = res
        print(
            f"\nsynthetic features, fit after the last of 10 tasks (RanPAC M = {args.ranpac_dim}, {args.device}):",
            file=sys.stderr,
        )
        print("| size | head | fit s | peak MiB | floor s | fit / floor |", file=sys.stderr)
        print("|---|---|---|---|---|---|", file=sys.stderr)
        for r in res:
            fl = r["floor_s"]
            extra = f"{fl:.2f} | {r['fit_s'] / fl:.1f}" if fl else "- | -"
            print(f"| {r['size']} | {r['head']} | {r['fit_s']:.2f} | {r['peak_mib']:.0f} | {extra} |", file=sys.stderr)
        for s in SIZES:
            tot = sum(r["fit_s"] for r in res if r["size"].startswith(str(SIZES[s][0])))
            print(f"{s}: all heads {tot:.1f} s", file=sys.stderr)
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
