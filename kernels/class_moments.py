"""Class-segmented moment accumulation: per-class count, shifted sum and scatter matrix.

Given rows x (n, d) with class labels (n,) in [0, C) (in any order), compute for
every class c, with a per-class shift k_c (the class's first row in this chunk):

    count[c]   = n_c
    sum[c]     = sum_i (x_i - k_c)                      (d,)    float32
    scatter[c] = sum_i (x_i - k_c)(x_i - k_c)^T         (d, d)  float32

from which mean = k_c + sum / n_c and M2 = scatter - sum sum^T / n_c follow
without the cancellation that raw sums of squares suffer when features have
large means (ViT features do). Results of several chunks or processes merge
exactly with the pairwise update of Chan, Golub and LeVeque (`clpt.stats`).

Three implementations, tested against each other:
- `reference_class_moments`: the reference code's way, a boolean-mask gather and
  `torch.cov` per class in float64 (slow, obviously right);
- `class_scatter_torch`: the CPU path, per class: gather its rows (a slice when
  labels arrive grouped), shift them, one BLAS GEMM (`class_pieces_torch` yields
  them class by class, for a consumer that reduces each at once);
- `class_scatter_triton`: the GPU path, one fused Triton kernel. Rows are never
  copied: the kernel gathers them through the label-sorting permutation, a
  program handles one (piece of a class, tile pair) with upper-triangular
  tile pairs only, mirrors off-diagonal tiles on store, and long classes are
  split into pieces whose partial tiles are reduced with atomic adds.

Symmetry: `scatter` is symmetric to rounding, not bit for bit. A diagonal tile
(and the torch path's whole GEMM) sums entries (p, q) and (q, p) in orders the
matrix-multiply implementation picks (NumPy's BLAS build in the interpreter,
tensor cores on a GPU), and on a GPU the pieces of a long class are reduced with
atomic adds in no fixed order, so even mirrored tiles can differ in the last
bit. Exact symmetry is established once, where every result enters the
statistics: `clpt.stats.moments_from_scatter`.

`class_scatter` dispatches: CUDA tensors -> Triton, CPU tensors -> torch.
`CLPT_KERNEL_BACKEND=torch|triton` (or `backend=`) forces either; with
`TRITON_INTERPRET=1` set before import, the Triton kernel runs on CPU tensors in
Triton's interpreter (slowly; for tests).
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional: without it every tensor takes the torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PRECISIONS = ("ieee", "tf32", "tf32x3")


# ---------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------


def reference_class_moments(x: torch.Tensor, labels: torch.Tensor, n_classes: int):
    """count (C,), mean (C, d) and unbiased covariance (C, d, d), float64, one class at a time."""
    d = x.shape[1]
    count = torch.zeros(n_classes, dtype=torch.int64)
    mean = torch.zeros(n_classes, d, dtype=torch.float64)
    cov = torch.zeros(n_classes, d, d, dtype=torch.float64)
    for c in range(n_classes):
        rows = x[labels == c].to(torch.float64)
        count[c] = len(rows)
        if len(rows):
            mean[c] = rows.mean(0)
        if len(rows) >= 2:
            cov[c] = torch.cov(rows.T)
    return count, mean, cov


# ---------------------------------------------------------------------------
# Shared planning: group rows by label
# ---------------------------------------------------------------------------


def _check(x: torch.Tensor, labels: torch.Tensor, n_classes: int) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must be (n, d), got shape {tuple(x.shape)}")
    if labels.ndim != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must be (n,) with n = {x.shape[0]}, got shape {tuple(labels.shape)}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"labels must be int32 or int64, got {labels.dtype}")
    if labels.device != x.device:
        raise ValueError(f"x is on {x.device} but labels are on {labels.device}")
    if n_classes < 1:
        raise ValueError("n_classes must be >= 1")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes})")


def group_rows(labels: torch.Tensor, n_classes: int):
    """perm sorting rows by label (stable), per-class counts and start offsets in sorted order.

    Labels must lie in [0, n_classes) (the launchers' `_check` ensures it).
    """
    labels = labels.to(torch.int64)
    counts = torch.bincount(labels, minlength=n_classes)
    perm = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    return perm, counts, starts


def _shifts(x: torch.Tensor, perm: torch.Tensor, counts: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """(C, d) float32: each class's first row (sorted order); zeros for absent classes."""
    shift = torch.zeros(len(counts), x.shape[1], dtype=torch.float32, device=x.device)
    present = counts > 0
    if bool(present.any()):
        shift[present] = x[perm[starts[present]]].to(torch.float32)
    return shift


# ---------------------------------------------------------------------------
# CPU path: BLAS
# ---------------------------------------------------------------------------


def class_pieces_torch(
    x: torch.Tensor, labels: torch.Tensor, n_classes: int, accum_dtype=torch.float32, out: torch.Tensor | None = None
):
    """Per present class c, in class order: (c, n_c, shift (d,), sum (d,), scatter (d, d)) with torch.

    The class's rows are gathered (a slice when labels arrive grouped, non-decreasing, as `clpt extract`
    stores them), shifted by the first of them, and multiplied in one BLAS GEMM into a (d, d) workspace
    that the next class reuses: consume each piece before asking for the next. No array of all classes'
    matrices is made, so a consumer that reduces each piece at once (`clpt.stats.ScatterAccumulator`)
    touches no memory beyond its own results. `out` (C, d, d): each class's GEMM writes out[c] instead.
    """
    _check(x, labels, n_classes)
    grouped = bool((labels[1:] >= labels[:-1]).all())
    perm, counts, starts = group_rows(labels, n_classes)
    work = None if out is not None else torch.empty(x.shape[1], x.shape[1], dtype=accum_dtype, device=x.device)
    for c, (s, k) in enumerate(zip(starts.tolist(), counts.tolist(), strict=True)):
        if not k:
            continue
        rows = x[s : s + k] if grouped else x.index_select(0, perm[s : s + k])  # (k, d)
        shift = rows[0].to(torch.float32)
        r = rows.to(accum_dtype) - shift.to(accum_dtype)  # one cache-sized temporary per class
        target = out[c] if out is not None else work
        torch.mm(r.T, r, out=target)
        yield c, k, shift, r.sum(0), target


def class_scatter_torch(x: torch.Tensor, labels: torch.Tensor, n_classes: int, accum_dtype=torch.float32):
    """count, shift, sum, scatter with torch: `class_pieces_torch`, stacked (zeros for absent classes)."""
    _check(x, labels, n_classes)
    d = x.shape[1]
    counts = torch.bincount(labels.to(torch.int64), minlength=n_classes)
    shift = torch.zeros(n_classes, d, dtype=torch.float32, device=x.device)
    total = torch.zeros(n_classes, d, dtype=accum_dtype, device=x.device)
    scatter = torch.empty(n_classes, d, d, dtype=accum_dtype, device=x.device)
    scatter[counts == 0] = 0  # every present class's matrix is written below
    for c, _, sh, tot, _ in class_pieces_torch(x, labels, n_classes, accum_dtype, out=scatter):
        shift[c], total[c] = sh, tot
    return counts, shift, total, scatter


# ---------------------------------------------------------------------------
# GPU path: the fused Triton kernel
# ---------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _class_scatter_kernel(
        # pointers
        x_ptr, perm_ptr, shift_ptr,
        piece_class_ptr, piece_start_ptr, piece_stop_ptr,
        tile_i_ptr, tile_j_ptr,
        sum_ptr, scatter_ptr,
        # sizes
        d, n_tiles,
        # strides
        stride_xn, stride_xd,
        stride_kc, stride_kd,
        stride_uc, stride_ud,
        stride_sc, stride_si, stride_sj,
        # meta-parameters
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        # One program: one piece of one class x one upper-triangular tile pair (ti <= tj).
        # Tile pairs vary fastest, so the programs running together share a piece's rows in L2.
        pid = tl.program_id(0)
        piece = pid // n_tiles
        tile = pid % n_tiles
        c = tl.load(piece_class_ptr + piece).to(tl.int64)
        r0 = tl.load(piece_start_ptr + piece)
        r1 = tl.load(piece_stop_ptr + piece)
        ti = tl.load(tile_i_ptr + tile)
        tj = tl.load(tile_j_ptr + tile)

        offs_i = ti * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_j = tj * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_i = offs_i < d
        mask_j = offs_j < d
        shift_i = tl.load(shift_ptr + c * stride_kc + offs_i * stride_kd, mask=mask_i, other=0.0)
        shift_j = tl.load(shift_ptr + c * stride_kc + offs_j * stride_kd, mask=mask_j, other=0.0)

        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        acc_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for start in range(r0, r1, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            mask_r = rows < r1
            src = tl.load(perm_ptr + rows, mask=mask_r, other=0).to(tl.int64)  # gather through the sort
            m_a = mask_r[:, None] & mask_i[None, :]
            m_b = mask_r[:, None] & mask_j[None, :]
            a = tl.load(x_ptr + src[:, None] * stride_xn + offs_i[None, :] * stride_xd, mask=m_a, other=0.0)
            b = tl.load(x_ptr + src[:, None] * stride_xn + offs_j[None, :] * stride_xd, mask=m_b, other=0.0)
            # fp32 whatever the input dtype; masked rows and columns contribute exactly 0
            a = tl.where(m_a, a.to(tl.float32) - shift_i[None, :], 0.0)  # (BLOCK_N, BLOCK_D)
            b = tl.where(m_b, b.to(tl.float32) - shift_j[None, :], 0.0)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)  # (BLOCK_D, BLOCK_D)
            acc_sum += tl.sum(a, axis=0)

        m_out = mask_i[:, None] & mask_j[None, :]
        base = scatter_ptr + c * stride_sc
        tl.atomic_add(base + offs_i[:, None] * stride_si + offs_j[None, :] * stride_sj, acc, mask=m_out)
        if ti != tj:  # mirror: element (i, j) of this tile is also element (j, i)
            tl.atomic_add(base + offs_j[None, :] * stride_si + offs_i[:, None] * stride_sj, acc, mask=m_out)
        else:
            tl.atomic_add(sum_ptr + c * stride_uc + offs_i * stride_ud, acc_sum, mask=mask_i)


def _pieces(counts: torch.Tensor, starts: torch.Tensor, rows_per_piece: int):
    """Split each class's row range into pieces of at most rows_per_piece rows."""
    n_pieces = (counts + rows_per_piece - 1) // rows_per_piece  # 0 for absent classes
    total = int(n_pieces.sum())
    cls = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), n_pieces)
    first = torch.cumsum(n_pieces, 0) - n_pieces
    within = torch.arange(total, device=counts.device) - first[cls]
    start = starts[cls] + within * rows_per_piece
    stop = torch.minimum(start + rows_per_piece, starts[cls] + counts[cls])
    return cls.to(torch.int32), start.to(torch.int32), stop.to(torch.int32)


def class_scatter_triton(
    x: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    block_d: int = 64,
    block_n: int = 32,
    rows_per_piece: int = 1024,
    precision: str = "ieee",
    num_warps: int = 4,
):
    """count, shift, sum, scatter with the fused Triton kernel (CUDA tensors, or CPU under TRITON_INTERPRET=1).

    `precision` is the tl.dot input precision for the float32 products: "ieee"
    (exact fp32, the default: covariances at float32 accuracy), "tf32" (tensor
    cores, ~1e-3 relative per product, faster), or "tf32x3".
    """
    if triton is None:
        raise RuntimeError("triton is not installed: use backend='torch'")
    _check(x, labels, n_classes)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    if block_d < 16 or block_d & (block_d - 1) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError("block_d and block_n must be powers of two >= 16 (tl.dot)")
    if x.shape[0] >= 2**31:
        raise ValueError("more than 2**31 rows in one chunk: split it")
    n, d = x.shape
    perm, counts, starts = group_rows(labels, n_classes)
    shift = _shifts(x, perm, counts, starts)
    total = torch.zeros(n_classes, d, dtype=torch.float32, device=x.device)
    scatter = torch.zeros(n_classes, d, d, dtype=torch.float32, device=x.device)
    piece_cls, piece_start, piece_stop = _pieces(counts, starts, rows_per_piece)
    n_t = triton.cdiv(d, block_d)
    tile_i, tile_j = torch.triu_indices(n_t, n_t, device=x.device).to(torch.int32)
    n_pairs = tile_i.numel()
    grid = (piece_cls.numel() * n_pairs,)
    if grid[0]:
        _class_scatter_kernel[grid](
            x, perm.to(torch.int32), shift,
            piece_cls, piece_start, piece_stop,
            tile_i, tile_j,
            total, scatter,
            d, n_pairs,
            x.stride(0), x.stride(1),
            shift.stride(0), shift.stride(1),
            total.stride(0), total.stride(1),
            scatter.stride(0), scatter.stride(1), scatter.stride(2),
            BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision, num_warps=num_warps,
        )  # fmt: skip
    return counts, shift, total, scatter


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------


def choose_backend(device: torch.device, backend: str | None = None) -> str:
    """'triton' for CUDA tensors, 'torch' otherwise; `backend` or CLPT_KERNEL_BACKEND overrides."""
    choice = backend or os.environ.get("CLPT_KERNEL_BACKEND", "auto")
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"kernel backend must be auto, torch or triton, got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton is not None else "torch"
    return choice


def class_scatter(
    x: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    backend: str | None = None,
    precision: str = "ieee",
    **kwargs,
):
    """count (C,) int64, shift (C, d), sum (C, d), scatter (C, d, d) float32 (symmetric to rounding).

    `precision` applies to the Triton kernel's products ("ieee" exact float32,
    "tf32", "tf32x3"); the torch backend computes in float32 (torch's default
    float32 matmul precision). See the module docstring.
    """
    if choose_backend(x.device, backend) == "triton":
        return class_scatter_triton(x, labels, n_classes, precision=precision, **kwargs)
    return class_scatter_torch(x, labels, n_classes, **kwargs)
