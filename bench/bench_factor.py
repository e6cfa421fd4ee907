"""What one Cholesky factorisation per class costs on this machine, against the GEMM peak measured in
the same run: the part of FeCAM's (and CA's) fit that its arithmetic floor prices at that peak.

    python bench/bench_factor.py                  # d = 768, float32, 40 matrices
    python bench/bench_factor.py --dim 384 --dtype float64

Rows (GFLOP/s, counting d^3 / 3 a factorisation; the ratio is to the GEMM peak at the run's threads):
  lapack            torch.linalg.cholesky_ex, one matrix at a time (what FeCAM runs on a CPU)
  lapack batched    the same on all matrices in one call
  lapack 1 thread   one matrix at a time with one thread
  2 x 1 thread      two one-thread factorisations side by side (a thread pool of 2)
  blocked nb        a right-looking blocked factorisation in torch ops: LAPACK on the (nb, nb) diagonal
                    blocks, triangular solves for the panels, a GEMM for the trailing update
  gemm              a (2048, 2048) product at the run's threads (the peak), and with one thread
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import torch


def best(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def blocked(a: torch.Tensor, nb: int) -> torch.Tensor:
    a = a.clone()
    n = a.shape[0]
    for k in range(0, n, nb):
        e = min(k + nb, n)
        l11, _ = torch.linalg.cholesky_ex(a[k:e, k:e])
        a[k:e, k:e] = l11
        if e < n:
            l21 = torch.linalg.solve_triangular(l11.T, a[e:, k:e], upper=True, left=False)
            a[e:, k:e] = l21
            a[e:, e:].addmm_(l21, l21.T, alpha=-1)
    return a.tril_()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--count", type=int, default=40, help="matrices factorised per timing")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeat", type=int, default=3, help="timings per row (the best is printed)")
    args = ap.parse_args()
    d, c, dtype = args.dim, args.count, getattr(torch, args.dtype)
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(c, 2 * d, d, generator=g, dtype=dtype)
    a = x.transpose(1, 2) @ x / (2 * d) + 0.5 * torch.eye(d, dtype=dtype)  # well-conditioned SPD
    flop = c * d**3 / 3
    m = torch.randn(2048, 2048, generator=g, dtype=dtype)
    rows: list[tuple[str, float]] = []

    def one_by_one():
        for i in range(c):
            torch.linalg.cholesky_ex(a[i])

    rows.append(("gemm", 2 * 2048**3 / best(lambda: m @ m, args.repeat)))
    rows.append(("lapack", flop / best(one_by_one, args.repeat)))
    rows.append(("lapack batched", flop / best(lambda: torch.linalg.cholesky_ex(a), args.repeat)))
    for nb in (192, 384):
        sec = best(lambda nb=nb: [blocked(a[i], nb) for i in range(c)], args.repeat)
        rows.append((f"blocked nb={nb}", flop / sec))
    torch.set_num_threads(1)
    try:
        rows.append(("gemm 1 thread", 2 * 2048**3 / best(lambda: m @ m, args.repeat)))
        rows.append(("lapack 1 thread", flop / best(one_by_one, args.repeat)))
        with ThreadPoolExecutor(2) as pool:
            side = best(lambda: list(pool.map(lambda i: torch.linalg.cholesky_ex(a[i]), range(c))), args.repeat)
        rows.append(("2 x 1 thread", flop / side))
    finally:
        torch.set_num_threads(threads)
    peak = rows[0][1]
    print(f"Cholesky of {c} SPD ({d}, {d}) {args.dtype} matrices; torch {torch.__version__}, {threads} threads")
    print(f"{'':18}{'GFLOP/s':>9}{'/ gemm':>8}")
    for name, rate in rows:
        print(f"{name:18}{rate / 1e9:9.1f}{rate / peak:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
