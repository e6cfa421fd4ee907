"""Benchmark of the class-segmented moment kernel against baselines measured in the same run.

    python bench/bench_class_moments.py                 # CPU sizes (or GPU sizes when CUDA is there)
    python bench/bench_class_moments.py --n 50000 --classes 100 --dim 768

For each size (n rows, C classes, d features, float32 input, unsorted labels):
  kernel   `clpt_kernels.class_moments.class_scatter` (Triton on CUDA, BLAS on CPU)
  (a)      the reference code's way: boolean-mask gather + float64 torch.cov, per class
  (b)      one plain X.T @ X GEMM of the same n and d (the proxy for the floor)
  (c)      the physical floor, max(2 n d^2 / peak FLOP/s, C d^2 * 4 B / peak B/s), with both
           peaks measured here (a large GEMM at the kernel's precision, a large copy)
  (d)      GPU only: torch.nn.functional.grouped_mm on label-sorted rows (bf16), where available
"sorted" is the kernel again on the same rows grouped by label (as `clpt extract` stores them).
"stats" is what `clpt fit-stats` runs on them: `clpt.stats.fit_class_stats` over 8,192-row chunks of the
grouped rows, giving float64 count, mean and M2 per class (on a CPU, each class's GEMM goes straight into
its float64 row); "(e) fill" is the first write of a fresh float64 (C, d, d) array, as large as those
statistics: a floor of any path that returns them, measured in the same run.
Printed ratios are baseline time / kernel time (> 1: the kernel is faster), except
"vs floor" which is kernel time / floor (>= 1; 1 is the floor).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from clpt.stats import fit_class_stats
from clpt_kernels import class_moments as K


def timeit(fn, device: torch.device, repeat: int) -> float:
    """Median wall time in seconds (CUDA-synchronised on a GPU), after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reference_loop(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> None:
    for c in range(n_classes):
        rows = x[y == c]
        if len(rows) >= 2:
            torch.cov(rows.T.double())


def grouped_mm_fn(x: torch.Tensor, y: torch.Tensor, n_classes: int):
    """X_c^T X_c for all classes with one grouped GEMM on label-sorted bf16 rows, or None if unavailable."""
    gmm = getattr(torch.nn.functional, "grouped_mm", None)
    if gmm is None or x.device.type != "cuda":
        return None
    perm = torch.argsort(y)
    xs = x[perm].to(torch.bfloat16)
    offs = torch.cumsum(torch.bincount(y, minlength=n_classes), 0).to(torch.int32)
    a = xs.T.contiguous()  # (d, n)

    def run():
        return gmm(a, xs, offs=offs, out_dtype=torch.float32)

    try:
        run()
    except (RuntimeError, TypeError, NotImplementedError) as e:
        print(f"[bench] grouped_mm unavailable here: {str(e).splitlines()[0]}", file=sys.stderr)
        return None
    return run


def fit_stats(xs: torch.Tensor, ys: torch.Tensor, n_classes: int, device: torch.device):
    """What `clpt fit-stats` runs: float64 moments of label-grouped rows streamed in 8,192-row chunks."""
    chunks = ((xs[i : i + 8192], ys[i : i + 8192]) for i in range(0, len(ys), 8192))
    return fit_class_stats(chunks, range(n_classes), xs.shape[1], device)


def measured_peaks(device: torch.device, precision: str) -> tuple[float, float]:
    """(FLOP/s of a large float32 GEMM at the kernel's precision, bytes/s of a large copy)."""
    torch.backends.cuda.matmul.allow_tf32 = precision != "ieee"
    m = 8192 if device.type == "cuda" else 2048
    a = torch.randn(m, m, device=device)
    t = timeit(lambda: a @ a, device, 5)
    flops = 2 * m**3 / t
    src = torch.randn((512 if device.type == "cuda" else 256) * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, 5)
    return flops, 2 * src.numel() * 4 / t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=None)
    ap.add_argument("--classes", type=int, nargs="+", default=None)
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--precision", default="ieee", choices=K.PRECISIONS, help="tl.dot precision (GPU)")
    ap.add_argument("--skip-reference", action="store_true", help="skip (a), the slow per-class loop")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    sizes_n = args.n or ([50_000, 1_000_000] if gpu else [50_000, 200_000])
    sizes_c = args.classes or [100, 1000]
    d = args.dim or (768 if gpu else 384)
    name = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"class-segmented moments on {name}; d = {d}, float32 input, unsorted labels; median of {args.repeat}"
    )
    peaks = measured_peaks(device, args.precision)
    if peaks:
        prec = f" ({args.precision})" if gpu else " (float32)"
        print(f"measured peaks: GEMM {peaks[0] / 1e12:.2f} TFLOP/s{prec}, copy {peaks[1] / 1e9:.0f} GB/s")
    kw = {"precision": args.precision} if gpu else {}

    header = (
        f"{'n':>9} {'C':>5} {'kernel s':>9} {'(a) loop s':>10} {'vs (a)':>7} {'(b) GEMM s':>10} {'vs (b)':>7}"
        f" {'sorted s':>9} {'vs (b)':>7} {'floor s':>9} {'vs floor':>8}"
        f" {'stats s':>9} {'vs (b)':>7} {'(e) fill s':>10}"
    )
    if gpu:
        header += f" {'(d) gmm s':>9} {'vs (d)':>7}"
    print(header)
    for n in sizes_n:
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(n, d, generator=g) + 5.0).to(device)
        for c in sizes_c:
            y = torch.randint(0, c, (n,), generator=g).to(device)
            t_k = timeit(lambda x=x, y=y, c=c: K.class_scatter(x, y, c, **kw), device, args.repeat)
            t_a = (
                float("nan")
                if args.skip_reference
                else timeit(lambda x=x, y=y, c=c: reference_loop(x, y, c), device, 1)
            )
            t_b = timeit(lambda x=x: x.T @ x, device, args.repeat)
            order = torch.argsort(y, stable=True)
            xs, ys = x[order], y[order]
            t_s = timeit(lambda xs=xs, ys=ys, c=c: K.class_scatter(xs, ys, c, **kw), device, args.repeat)
            t_f = timeit(lambda xs=xs, ys=ys, c=c: fit_stats(xs, ys, c, device), device, args.repeat)
            t_e = timeit(lambda c=c: torch.empty(c, d, d, dtype=torch.float64, device=device).fill_(1), device,
                         args.repeat)  # fmt: skip
            del xs, ys
            floor = max(2 * n * d * d / peaks[0], c * d * d * 4 / peaks[1])
            line = (
                f"{n:>9} {c:>5} {t_k:>9.4f} {t_a:>10.4f} {t_a / t_k:>7.1f} {t_b:>10.4f} {t_b / t_k:>7.2f}"
                f" {t_s:>9.4f} {t_b / t_s:>7.2f} {floor:>9.4f} {t_k / floor:>8.2f}"
                f" {t_f:>9.4f} {t_b / t_f:>7.2f} {t_e:>10.4f}"
            )
            if gpu:
                fn = grouped_mm_fn(x, y, c)
                t_d = timeit(fn, device, args.repeat) if fn else float("nan")
                line += f" {t_d:>9.4f} {t_d / t_k:>7.2f}"
            print(line, flush=True)
            del y
    return 0


if __name__ == "__main__":
    sys.exit(main())
