"""The class-segmented moment kernel against its float64 reference.

Without a GPU the Triton kernel runs in Triton's interpreter (conftest sets
TRITON_INTERPRET=1 before any kernel module is imported): shapes stay tiny.
"""

from __future__ import annotations

import pytest
import torch

from clpt.stats import ScatterAccumulator, moments_from_scatter
from clpt_kernels import class_moments as K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = pytest.mark.skipif(K.triton is None, reason="triton is not installed")


def make(n, d, n_classes, dtype=torch.float32, offset=1000.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 3.0, d) + offset
    y = torch.randint(0, n_classes, (n,), generator=g)
    return x.to(dtype).to(DEVICE), y.to(DEVICE)


def check_against_reference(out, x, y, n_classes, tol):
    count, shift, total, scatter = out
    ref_count, ref_mean, ref_cov = K.reference_class_moments(x.cpu(), y.cpu(), n_classes)
    m = moments_from_scatter(count.cpu(), shift.cpu(), total.cpu(), scatter.cpu())
    assert torch.equal(count.cpu(), ref_count)
    cov = m.covariance()
    for c in range(n_classes):
        k = int(ref_count[c])
        if k:
            torch.testing.assert_close(m.mean[c], ref_mean[c], rtol=0, atol=1e-4)
        if k >= 2:
            err = float((cov[c] - ref_cov[c]).norm() / ref_cov[c].norm())
            assert err < tol, (c, k, err)
        if k == 0:
            assert not scatter[c].any() and not total[c].any()
    assert_symmetric_to_rounding(scatter)
    # what consumers read is exactly symmetric, on every machine (clpt.stats symmetrizes once)
    assert torch.equal(m.m2, m.m2.transpose(1, 2)) and torch.equal(cov, cov.transpose(1, 2))


def assert_symmetric_to_rounding(scatter: torch.Tensor) -> None:
    """The kernel's contract: each class's scatter equals its transpose to float32 rounding.

    Not exactly: a diagonal tile is one full product whose (p, q) and (q, p) sums
    run in the GEMM's own order (NumPy's BLAS in the interpreter, tensor cores on a
    GPU), and atomic adds reduce a long class's pieces in no fixed order. A kernel
    that drops the mirroring leaves lower tiles at 0: an asymmetry of order 1.
    """
    s = scatter.cpu().double()
    asym = (s - s.transpose(1, 2)).flatten(1).norm(dim=1)
    scale = s.flatten(1).norm(dim=1).clamp(min=1e-30)
    # fp32 products: per-entry relative rounding ~1e-7 x (terms summed); 1e-5 leaves room, 1 is a bug
    assert float((asym / scale).max()) < 1e-5, (asym / scale).tolist()


def awkward_labels(n, n_classes, device=DEVICE):
    """Unsorted labels with an empty class, a single-row class and a two-row class."""
    g = torch.Generator().manual_seed(1)
    y = torch.randint(3, n_classes, (n,), generator=g)  # classes 0..2 start empty
    y[7] = 1  # one row
    y[3], y[n - 1] = 2, 2  # two rows, far apart
    return y.to(device)


@TRITON
@pytest.mark.parametrize(
    "n,d,block_d,block_n",
    [(77, 96, 64, 16), (50, 40, 16, 32), (33, 17, 16, 16)],  # n % block != 0; d not a power of two
)
def test_triton_kernel_matches_reference_on_odd_shapes(n, d, block_d, block_n):
    x, _ = make(n, d, 6)
    y = awkward_labels(n, 6)
    out = K.class_scatter_triton(
        x, y, 6, block_d=block_d, block_n=block_n, rows_per_piece=16, precision="ieee"
    )
    check_against_reference(out, x, y, 6, tol=5e-6)


@TRITON
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-6), (torch.bfloat16, 5e-6), (torch.float32, 5e-6)])
def test_triton_kernel_input_dtypes(dtype, tol):
    x, y = make(64, 48, 4, dtype=dtype, offset=100.0)
    out = K.class_scatter_triton(x, y, 4, block_d=16, block_n=16, rows_per_piece=32, precision="ieee")
    check_against_reference(out, x, y, 4, tol)  # the reference sees the same rounded inputs


@TRITON
def test_one_class_holding_most_rows_is_split_and_reduced():
    x, _ = make(120, 32, 3)
    y = torch.zeros(120, dtype=torch.int64, device=DEVICE)
    y[:5] = 1
    y[-3:] = 2
    out = K.class_scatter_triton(x, y, 3, block_d=16, block_n=16, rows_per_piece=16, precision="ieee")
    check_against_reference(out, x, y, 3, tol=5e-6)


@TRITON
def test_chunked_accumulation_merges_to_one_pass():
    x, y = make(90, 24, 5, seed=3)
    whole = ScatterAccumulator(5, 24, DEVICE, backend="triton")
    whole.update(x, y)
    parts = ScatterAccumulator(5, 24, DEVICE, backend="triton")
    for s in (slice(0, 11), slice(11, 60), slice(60, 90)):
        parts.update(x[s], y[s])
    a, b = whole.result(), parts.result()
    assert torch.equal(a.count, b.count)
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=1e-5)
    assert float((a.m2 - b.m2).norm() / b.m2.norm()) < 5e-6
    torch_acc = ScatterAccumulator(5, 24, DEVICE, backend="torch")
    torch_acc.update(x, y)
    assert float((torch_acc.result().m2 - a.m2).norm() / a.m2.norm()) < 5e-6
    for m in (a, b, torch_acc.result()):  # merged over chunks, still exactly symmetric
        assert torch.equal(m.m2, m.m2.transpose(1, 2))


def test_torch_path_matches_reference():
    x, _ = make(200, 96, 7, offset=1000.0)
    y = awkward_labels(200, 7)
    check_against_reference(K.class_scatter_torch(x.cpu(), y.cpu(), 7), x, y, 7, tol=5e-6)
    out64 = K.class_scatter_torch(x.cpu(), y.cpu(), 7, accum_dtype=torch.float64)
    check_against_reference(out64, x, y, 7, tol=1e-9)


def test_dispatch(monkeypatch):
    assert K.choose_backend(torch.device("cpu")) == "torch"
    if K.triton is not None:
        assert K.choose_backend(torch.device("cuda")) == "triton"
    monkeypatch.setenv("CLPT_KERNEL_BACKEND", "triton")
    assert K.choose_backend(torch.device("cpu")) == "triton"
    monkeypatch.setenv("CLPT_KERNEL_BACKEND", "torch")
    assert K.choose_backend(torch.device("cuda")) == "torch"
    monkeypatch.setenv("CLPT_KERNEL_BACKEND", "fast")
    with pytest.raises(ValueError, match="auto, torch or triton"):
        K.choose_backend(torch.device("cpu"))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=TRITON)])
def test_launcher_checks_its_inputs(backend):
    x = torch.randn(10, 8, device=DEVICE)
    y = torch.zeros(10, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        K.class_scatter(x[0], y, 2, backend=backend)
    with pytest.raises(ValueError, match="labels must be"):
        K.class_scatter(x, y[:5], 2, backend=backend)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        K.class_scatter(x.double(), y, 2, backend=backend)
    with pytest.raises(TypeError, match="int32 or int64"):
        K.class_scatter(x, y.float(), 2, backend=backend)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        K.class_scatter(x, y + 5, 2, backend=backend)


def test_moments_from_scatter_is_the_whole_array_formula_bit_for_bit():
    """The CPU path works class by class (cache-sized blocks); every entry is the same float64 arithmetic
    as the whole-array formula ((S + S^T) / 2 - s s^T / n), so the results are equal bit for bit, and
    M2 is exactly symmetric whatever the kernel's order."""
    g = torch.Generator().manual_seed(3)
    count = torch.tensor([5, 1, 0, 7])
    shift, total = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    scatter = torch.randn(4, 6, 6, generator=g) + 3  # not symmetric: as a kernel's rounding can leave it
    m = moments_from_scatter(count, shift, total, scatter)
    n = count.double().clamp(min=1)
    sc, s = scatter.double(), total.double()
    want = (sc + sc.transpose(1, 2)) * 0.5 - (s[:, :, None] * s[:, None, :]) / n[:, None, None]
    assert torch.equal(m.m2, want) and torch.equal(m.m2, m.m2.transpose(1, 2))


def test_cpu_accumulator_reduces_each_class_in_place_as_the_chunk_formula_does():
    """The CPU accumulator takes each class's piece of a chunk straight into its float64 row (written the
    first time, merged in place after): the chunk-array formula (`chunk_moments`, then Chan's `merge`)
    over the same chunks, to float32 rounding of the GEMMs; counts exact, unseen classes zero, M2 exactly
    symmetric, and updates after a result() continue."""
    from clpt.stats import ClassMoments, chunk_moments

    x, _ = make(300, 24, 6, offset=200.0, seed=5)
    x, y = x.cpu(), awkward_labels(300, 6, "cpu")
    y[y == 5] = 4  # class 5 never appears
    pieces = (slice(0, 40), slice(40, 41), slice(41, 190), slice(190, 300))
    acc = ScatterAccumulator(6, 24, "cpu", backend="torch")
    want = ClassMoments.zeros(6, 24)
    for i, s in enumerate(pieces):
        acc.update(x[s], y[s])
        want = want.merge(chunk_moments(x[s], y[s], 6, backend="torch"))
        if i == 1:
            acc.result()  # a look in the middle changes nothing
    got = acc.result()
    assert torch.equal(got.count, want.count)
    torch.testing.assert_close(got.mean, want.mean, rtol=0, atol=1e-9)
    assert float((got.m2 - want.m2).norm() / want.m2.norm()) < 1e-6
    assert torch.equal(got.m2, got.m2.transpose(1, 2))
    assert not got.m2[5].any() and not got.mean[5].any() and not got.m2[0].any()
    check = ScatterAccumulator(6, 24, "cpu", backend="torch")
    check.update(x, y)
    ref_count, ref_mean, ref_cov = K.reference_class_moments(x, y, 6)
    for c in (1, 2, 3, 4):
        torch.testing.assert_close(got.mean[c], ref_mean[c], rtol=0, atol=1e-4)
        if ref_count[c] >= 2:
            cov = got.m2[c] / (ref_count[c] - 1)
            assert float((cov - ref_cov[c]).norm() / ref_cov[c].norm()) < 5e-6


def test_fit_class_stats_writes_m2_into_a_given_array_with_the_same_bits():
    """`m2_out` (a caller's reused float64 array, as FeCAM reuses one for every task): the result's M2 is
    that array, holding exactly what a fresh one would; whatever was in it before is overwritten (rows of
    a class absent from the chunks included)."""
    from clpt.stats import fit_class_stats

    x, _ = make(300, 24, 6, offset=20.0, seed=7)
    x, y = x.cpu(), awkward_labels(300, 6, "cpu")
    y[y == 2] = 3  # class 2 never appears
    chunks = [(x[:120], y[:120]), (x[120:], y[120:])]
    fresh = fit_class_stats(iter(chunks), range(6), 24)
    work = torch.full((6, 24, 24), float("nan"), dtype=torch.float64)
    got = fit_class_stats(iter(chunks), range(6), 24, m2_out=work)
    assert got.m2.data_ptr() == work.data_ptr()
    assert torch.equal(got.m2, fresh.m2) and torch.equal(got.mean, fresh.mean) and not got.m2[2].any()
