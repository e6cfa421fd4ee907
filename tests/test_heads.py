"""Classifier heads from the cache, each against an independent computation (docs/methods/heads.md)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clpt import config as C
from clpt.errors import ConfigError
from clpt.heads import HEADS, InMemoryCache
from clpt.heads.fecam import FeCAMConfig, transform
from clpt.heads.lda import LDAConfig
from clpt.heads.ncm import NCMConfig
from clpt.heads.ranpac import RanPACConfig, choose_lambda, ridge_solution
from clpt.stages import resolve as R

TASKS = [[0, 3], [3, 5]]  # two tasks: classes 0-2, then 3-4


def blobs(n_per_class=40, d=12, n_classes=5, seed=0, offset=5.0):
    """Gaussian classes with distinct means and covariances; labels grouped by class."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(n_classes):
        a = torch.randn(d, d, generator=g) * 0.3
        mu = torch.randn(d, generator=g) * 2 + offset
        xs.append(torch.randn(n_per_class, d, generator=g) @ a.T + mu)
        ys.append(torch.full((n_per_class,), c))
    return torch.cat(xs), torch.cat(ys)


def CacheStub(x, y, tasks=TASKS, task=1, rows=10_000, seed=1993):  # noqa: N802 (reads as a class)
    """The cached features a head's fit reads, here in memory (`clpt.heads.InMemoryCache`).

    `rows` sets the chunk size of `train_chunks` and of the statistics' accumulation, so
    the same head can be fitted from one pass and from many chunks.
    """
    return InMemoryCache(x, y, tasks, task, R.resolve(overrides=[f"seed={seed}"]), "cpu", rows)


def test_ncm_is_cosine_to_the_class_means_by_hand():
    x, y = blobs()
    scores = HEADS.get("ncm").fit(CacheStub(x, y), NCMConfig())
    q = torch.randn(7, x.shape[1]) + 5
    for i in range(7):
        for c in range(5):
            p = x[y == c].double().mean(0)
            cos = float(q[i].double() @ p / (q[i].double().norm() * p.norm()))
            assert float(scores(q)[i, c]) == pytest.approx(cos, abs=1e-5)


class _UnbiasedShrunk:
    """scikit-learn covariance estimator: (1 - e) * unbiased covariance + e * I (clpt's LDA shrinkage)."""

    def __init__(self, e):
        self.e = e

    def fit(self, X):
        self.covariance_ = (1 - self.e) * np.cov(X.T) + self.e * np.eye(X.shape[1])
        return self

    def get_params(self, deep=True):
        return {"e": self.e}


@pytest.mark.parametrize("shrinkage", [0.0, 1e-4, 0.3])
def test_lda_matches_scikit_learn_with_the_same_shrinkage(shrinkage):
    sklearn_lda = pytest.importorskip("sklearn.discriminant_analysis")
    x, y = blobs(n_per_class=30)
    scores = HEADS.get("lda").fit(CacheStub(x, y), LDAConfig(shrinkage=shrinkage))
    # equal class sizes and uniform priors: sklearn's prior-weighted class covariance is the pooled
    # (N - C) covariance, shrunk the same way, and its intercept carries log(1/C) on top of ours
    ref = sklearn_lda.LinearDiscriminantAnalysis(
        solver="lsqr", covariance_estimator=_UnbiasedShrunk(shrinkage), priors=np.full(5, 0.2)
    ).fit(x.double().numpy(), y.numpy())
    q = blobs(n_per_class=8, seed=5)[0]
    expected = ref.decision_function(q.double().numpy()) - np.log(0.2)
    np.testing.assert_allclose(scores(q).numpy(), expected, rtol=1e-4, atol=1e-3)
    assert (scores(q).argmax(1).numpy() == ref.predict(q.double().numpy())).all()


class StreamingLDAReference:
    """Hayes & Kanan's StreamingLDA (deep SLDA; Avalanche's StreamingLDA), its fit and predict transcribed
    one sample at a time: Sigma starts at ones and is scaled away by the first update, class means at 0."""

    def __init__(self, d, n_classes, shrinkage):
        self.mu = torch.zeros(n_classes, d, dtype=torch.float64)
        self.c = torch.zeros(n_classes, dtype=torch.float64)
        self.sigma = torch.ones(d, d, dtype=torch.float64)
        self.n, self.e = 0, shrinkage

    def fit(self, x, y):
        x = x.double()
        for i in range(len(y)):
            xm = x[i : i + 1] - self.mu[y[i]]
            delta = (xm.T @ xm) * self.n / (self.n + 1)
            self.sigma = (self.n * self.sigma + delta) / (self.n + 1)
            self.mu[y[i]] += xm[0] / (self.c[y[i]] + 1)
            self.c[y[i]] += 1
            self.n += 1

    def scores(self, q):
        d = self.sigma.shape[0]
        lam = torch.linalg.pinv((1 - self.e) * self.sigma + self.e * torch.eye(d, dtype=torch.float64))
        w = lam @ self.mu.T
        return q.double() @ w - 0.5 * (self.mu * w.T).sum(1)


def test_lda_streaming_estimator_is_their_per_sample_update_and_differs_from_the_exact_one():
    """issue 23, item 7: `estimator: streaming` against a transcription of Hayes & Kanan's update, over
    two tasks (the second continuing the first's carried update), the rows in stored order."""
    x, y = blobs(n_per_class=25, d=8)
    q = blobs(n_per_class=6, d=8, seed=5)[0]
    ref = StreamingLDAReference(8, 5, 1e-4)
    ref.fit(x, y)
    ctx = CacheStub(x, y, rows=7)  # chunks that cut through classes
    stream = HEADS.get("lda").fit(ctx, LDAConfig(estimator="streaming"))
    np.testing.assert_allclose(stream(q).double().numpy(), ref.scores(q).numpy(), rtol=1e-4, atol=1e-3)
    assert (stream(q).argmax(1) == ref.scores(q).argmax(1)).all()
    # task 1 continuing task 0's carried update equals the update over both tasks at once
    ctx0 = CacheStub(x, y, task=0, rows=7)
    first = HEADS.get("lda").fit(ctx0, LDAConfig(estimator="streaming"))
    ctx.previous_state = lambda head: ({}, {"n_classes": 3, "carry": first.carry})
    cont = HEADS.get("lda").fit(ctx, LDAConfig(estimator="streaming"))
    assert cont.info["incremental"]
    torch.testing.assert_close(cont.carry["u"], stream.carry["u"], rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(cont(q), stream(q))
    exact = HEADS.get("lda").fit(CacheStub(x, y), LDAConfig())
    rel = (stream.carry["u"] / 125 - exact.carry["scatter"] / (125 - 5)).norm() / (exact.carry["scatter"] / 120).norm()
    assert rel > 1e-2  # the two estimators are not the same covariance


def fecam_numpy(x_train, y_train, queries, a1, a2):
    """docs/methods/heads.md, fecam, transcribed directly with NumPy: -d_c(x) for every query and class."""
    xn = x_train / np.linalg.norm(x_train, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    out = np.zeros((len(queries), int(y_train.max()) + 1))
    for c in range(out.shape[1]):
        rows = xn[y_train == c]
        mu, s = rows.mean(0), np.cov(rows.T)
        d = s.shape[0]
        off = s - np.diag(np.diag(s))
        s = s + a1 * np.diag(s).mean() * np.eye(d) + a2 * off[off != 0].mean() * (1 - np.eye(d))
        s = s / np.sqrt(np.outer(np.diag(s), np.diag(s)))
        p = np.linalg.pinv(s)
        for i, v in enumerate(qn):
            out[i, c] = -(v - mu) @ p @ (v - mu)
    return out


@pytest.mark.parametrize("a1,a2", [(1.0, 0.0), (10.0, 10.0)])
def test_fecam_matches_a_numpy_transcription_of_the_formula(a1, a2):
    x, y = blobs(n_per_class=30)
    q = blobs(n_per_class=4, seed=7)[0]
    scores = HEADS.get("fecam").fit(CacheStub(x, y, rows=13), FeCAMConfig(shrink1=a1, shrink2=a2))
    expected = fecam_numpy(x.double().numpy(), y.numpy(), q.double().numpy(), a1, a2)
    np.testing.assert_allclose(scores(q).numpy(), expected, rtol=2e-3, atol=2e-3)
    assert (scores(q).argmax(1).numpy() == expected.argmax(1)).all()


def test_fecam_with_shrink1_zero_takes_the_pseudo_inverse_of_singular_classes():
    """8 rows per class in 12 dimensions: every S is singular. With shrink1 = 0 the formula's pinv is
    taken at the numerical rank of statistics accumulated in float32; a Cholesky factorisation, which
    rounding let through such a matrix, gave distances of 2e7 against the formula's 1."""
    x, y = blobs(n_per_class=8)
    q = blobs(n_per_class=4, seed=7)[0]
    expected = fecam_numpy(x.double().numpy(), y.numpy(), q.double().numpy(), 0.0, 0.0)
    for dtype in ("auto", "float32", "float64"):
        scores = HEADS.get("fecam").fit(CacheStub(x, y, rows=13), FeCAMConfig(shrink1=0.0, dtype=dtype))
        np.testing.assert_allclose(scores(q).numpy(), expected, rtol=2e-3, atol=2e-3)


def test_fecam_factorises_in_float32_where_shrink1_bounds_the_condition_number():
    """`heads.fecam.dtype: auto` is float32 where d / shrink1 + 1 <= 2000, float64 elsewhere; the two
    give the same scores within float32 rounding where the bound holds; other values are config errors."""
    from clpt.heads.fecam import factor_dtype

    assert factor_dtype(FeCAMConfig(), 768) == torch.float32  # bound 769
    assert factor_dtype(FeCAMConfig(shrink1=0.1), 768) == torch.float64  # bound 7681
    assert factor_dtype(FeCAMConfig(shrink1=0.1), 64) == torch.float32  # bound 641
    assert factor_dtype(FeCAMConfig(shrink1=0.0), 64) == torch.float64
    assert factor_dtype(FeCAMConfig(dtype="float64"), 768) == torch.float64
    assert factor_dtype(FeCAMConfig(shrink1=0.1, dtype="float32"), 768) == torch.float32
    x, y = blobs(n_per_class=30)
    q = blobs(n_per_class=4, seed=7)[0]
    fit = HEADS.get("fecam").fit
    s64 = fit(CacheStub(x, y, rows=13), FeCAMConfig(dtype="float64"))
    s32 = fit(CacheStub(x, y, rows=13), FeCAMConfig(dtype="float32"))
    assert s32.chol.dtype == s64.chol.dtype == torch.float32
    assert not torch.equal(s32.chol, s64.chol)  # two computations
    torch.testing.assert_close(s32.chol, s64.chol, rtol=1e-4, atol=1e-4 * float(s64.chol.abs().max()))
    torch.testing.assert_close(s32(q), s64(q), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="heads.fecam.dtype: 'float16' is not one of auto, float32, float64"):
        R.resolve(overrides=["heads.fecam.dtype=float16"])


def test_fecam_keeps_cholesky_factors_and_scores_as_the_precisions_do():
    """shrink1 > 0: the state keeps L_c (S~_c = L_c L_c^T) and scores |L_c^-1 (x - mu_c)|^2 by a triangular
    solve; the same distances as the inverse P_c = S~_c^-1 (the precisions a state holds for shrink1 = 0
    and states saved before), within float32 rounding, and L_c is S~_c's factor."""
    from clpt.heads.fecam import FeCAMScores, correlation, full_precisions, shrink
    from clpt.stats import covariance, fit_class_stats

    x, y = blobs(n_per_class=30)
    q = blobs(n_per_class=4, seed=7)[0]
    settings = FeCAMConfig(shrink1=1.0, dtype="float64")
    state = HEADS.get("fecam").fit(CacheStub(x, y, rows=13), settings)
    assert set(state.tensors()) == {"mu", "chol"}  # no class refused: no empty tensors for them
    m = fit_class_stats([(transform(x, settings), y)], range(5), 12)
    s = correlation(shrink(covariance(m.count, m.m2), 1.0, 0.0))
    torch.testing.assert_close(state.chol.double() @ state.chol.double().transpose(1, 2), s, rtol=1e-6, atol=1e-6)
    assert torch.equal(state.chol, state.chol.tril())
    prec = full_precisions(m.count, m.m2, settings)
    legacy = FeCAMScores(state.mu, {"prec": prec}, settings)
    torch.testing.assert_close(state(q), legacy(q), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("a1,a2", [(1.0, 0.0), (10.0, 10.0)])
def test_fecam_normalises_each_class_in_reused_arrays_with_the_bits_of_the_formula(a1, a2):
    """`_normalised` computes covariance -> shrink -> correlation in two arrays every class reuses: each
    S~ it yields equals `correlation(shrink(covariance(...)))` of the same moments bit for bit (a class of
    one row included), and is consumed before the next overwrites it."""
    from clpt.heads.fecam import _normalised, correlation, shrink
    from clpt.stats import covariance, fit_class_stats

    x, y = blobs(n_per_class=30)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[torch.nonzero(y == 2).flatten()[1:]] = False  # class 2: one row
    m = fit_class_stats([(transform(x[keep], FeCAMConfig()), y[keep])], range(5), 12)
    want = correlation(shrink(covariance(m.count, m.m2), a1, a2))
    got = [(k, s.clone()) for k, s in _normalised(m.count, m.m2, FeCAMConfig(shrink1=a1, shrink2=a2))]
    assert [k.start for k, _ in got] == list(range(5))  # one class a step on a CPU
    for k, s in got:
        assert torch.equal(s, want[k]), k


def test_a_class_the_cholesky_factorisation_refuses_gets_its_pseudo_inverse():
    """A class whose rows are all alike has S = 0: the factorisation refuses it, its slot holds I and its
    distance is the formula's pinv(S~) = 0 (so it scores 0 everywhere); the other classes score as without
    it; the state round-trips through its tensors, and a part fitted at a later task (its refusals counted
    from its own first class) joins the earlier task's state into the whole one."""
    from clpt.heads import restore_parts, restore_state

    x, y = blobs(n_per_class=30)
    x[y == 1] = x[y == 1][0]  # class 1: thirty copies of one row
    x[y == 3] = x[y == 3][0]  # and class 3, of the second task
    q = blobs(n_per_class=4, seed=7)[0]
    state = HEADS.get("fecam").fit(CacheStub(x, y, rows=13), FeCAMConfig())
    assert state.dense_index.tolist() == [1, 3] and torch.equal(state.chol[1], torch.eye(12))
    scores = state(q)
    assert torch.equal(scores[:, [1, 3]], torch.zeros(len(q), 2))
    keep = y != 1
    others = HEADS.get("fecam").fit(CacheStub(x[keep], torch.where(y[keep] > 1, y[keep] - 1, y[keep]),
                                              tasks=[[0, 2], [2, 4]], rows=13), FeCAMConfig())  # fmt: skip
    torch.testing.assert_close(scores[:, [0, 2, 3, 4]], others(q))
    back = restore_state("fecam", state.tensors(), state.meta())
    assert torch.equal(back(q), scores)
    portable = state.portable()  # what `clpt export --onnx` converts: precisions, one GEMM per class
    assert set(portable.tensors()) == {"mu", "prec"}
    torch.testing.assert_close(portable(q), scores, rtol=1e-5, atol=1e-5)
    ctx = CacheStub(x, y, rows=13)
    first = HEADS.get("fecam").fit(CacheStub(x, y, task=0, rows=13), FeCAMConfig())
    md = {"settings": dataclasses.asdict(FeCAMConfig()), "meta": first.meta(), "n_classes": 3}
    ctx.previous_state = lambda head: (first.tensors(), md)  # type: ignore[method-assign]
    cont = HEADS.get("fecam").fit(ctx, FeCAMConfig())
    assert cont.info["incremental"] and cont.first_class == 3 and len(cont.mu) == 2
    assert cont.dense_index.tolist() == [0]  # class 3, the part's first
    assert torch.equal(cont(q), scores[:, 3:])  # a part scores its own classes
    joined = restore_parts("fecam", [first.tensors(), cont.tensors()], cont.meta())
    assert joined.tensors().keys() == state.tensors().keys()
    assert all(torch.equal(joined.tensors()[k], v) for k, v in state.tensors().items())


def test_a_fecam_state_saved_with_precisions_scores_and_the_next_task_refits():
    """States saved before the factors were kept hold `prec`: they restore and score as before, and an
    incremental fit does not continue them (it refits from scratch, equal to the bit)."""
    from clpt.heads import restore_state
    from clpt.heads.fecam import FeCAMScores, full_precisions
    from clpt.stats import fit_class_stats

    x, y = blobs(n_per_class=30)
    q = blobs(n_per_class=4, seed=7)[0]
    settings = FeCAMConfig()
    m = fit_class_stats([(transform(x[y < 3], settings), y[y < 3])], range(3), 12)
    legacy = FeCAMScores(m.mean.float(), {"prec": full_precisions(m.count, m.m2, settings)}, settings)
    back = restore_state("fecam", legacy.tensors(), legacy.meta())
    assert set(legacy.tensors()) == {"mu", "prec"} and torch.equal(back(q), legacy(q))
    ctx = CacheStub(x, y, rows=13)
    md = {"settings": dataclasses.asdict(settings), "meta": legacy.meta(), "n_classes": 3}
    ctx.previous_state = lambda head: (legacy.tensors(), md)  # type: ignore[method-assign]
    state = HEADS.get("fecam").fit(ctx, settings)
    scratch = HEADS.get("fecam").fit(CacheStub(x, y, rows=13), settings)
    assert state.info == {"incremental": False}
    assert all(torch.equal(state.tensors()[k], v) for k, v in scratch.tensors().items())


def test_ranpac_ridge_is_the_direct_solve():
    g = torch.Generator().manual_seed(0)
    h = torch.relu(torch.randn(50, 20, generator=g, dtype=torch.float64))
    yq = F.one_hot(torch.randint(0, 4, (50,), generator=g), 4).double()
    gram, q = h.T @ h, h.T @ yq
    w = ridge_solution(gram, q, 0.5)
    ref = np.linalg.solve(gram.numpy() + 0.5 * np.eye(20), q.numpy())
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_fit,m", [(30, 60), (80, 20)])  # dual (n <= M) and primal (n > M) paths
def test_ranpac_validation_losses_equal_explicit_solves(n_fit, m):
    g = torch.Generator().manual_seed(1)
    h_a = torch.relu(torch.randn(n_fit, m, generator=g, dtype=torch.float64))
    h_v = torch.relu(torch.randn(15, m, generator=g, dtype=torch.float64))
    y_a = F.one_hot(torch.randint(0, 3, (n_fit,), generator=g), 3).double()
    y_v = F.one_hot(torch.randint(0, 3, (15,), generator=g), 3).double()
    lambdas = [1e-2, 1.0, 1e2, 1e4]
    lam, losses = choose_lambda(h_a, y_a, h_v, y_v, lambdas)
    for got, lam_ in zip(losses, lambdas, strict=True):
        w = np.linalg.solve(h_a.T.numpy() @ h_a.numpy() + lam_ * np.eye(m), h_a.T.numpy() @ y_a.numpy())
        assert got == pytest.approx(float(((h_v.numpy() @ w - y_v.numpy()) ** 2).mean()), rel=1e-8)
    assert lam == lambdas[int(np.argmin(losses))]


@pytest.mark.parametrize("n_fit,m", [(30, 60), (80, 20)])
def test_ranpac_validation_on_the_task_s_own_columns_equals_the_mse_over_all_columns(n_fit, m):
    """The fit passes task T's columns alone (`n_columns` = every seen class): the other columns are 0 in
    the targets and, since they are 0 in Y_a, in every prediction; the MSEs equal those over all the
    zero-padded columns within rounding, and the same lambda wins."""
    g = torch.Generator().manual_seed(4)
    h = torch.relu(torch.randn(n_fit + 15, m, generator=g, dtype=torch.float64))
    y = F.one_hot(torch.randint(0, 3, (n_fit + 15,), generator=g), 3).double()
    padded = torch.cat([torch.zeros(n_fit + 15, 7, dtype=torch.float64), y], dim=1)  # 7 old classes first
    lambdas = [10.0**k for k in range(-8, 9)]
    lam_all, all_cols = choose_lambda(h[:n_fit], padded[:n_fit], h[n_fit:], padded[n_fit:], lambdas)
    lam, own = choose_lambda(h[:n_fit], y[:n_fit], h[n_fit:], y[n_fit:], lambdas, n_columns=10)
    assert lam == lam_all
    np.testing.assert_allclose(own, all_cols, rtol=1e-12, atol=0)
    _, unscaled = choose_lambda(h[:n_fit], y[:n_fit], h[n_fit:], y[n_fit:], lambdas)  # over 3 columns
    np.testing.assert_allclose(np.array(unscaled) * 3 / 10, own, rtol=1e-12, atol=0)


def test_ranpac_picks_the_lambda_the_data_call_for():
    g = torch.Generator().manual_seed(2)
    lambdas = [10.0**k for k in range(-8, 9)]
    # targets an exact linear function of h, with more rows than dimensions: the least ridge wins
    h = torch.randn(200, 10, generator=g, dtype=torch.float64)
    w = torch.randn(10, 3, generator=g, dtype=torch.float64)
    lam, _ = choose_lambda(h[:150], h[:150] @ w, h[150:], h[150:] @ w, lambdas)
    assert lam == 1e-8
    # validation on the fit rows with targets 0: the MSE, sum_i (s_i^2 / (s_i^2 + l))^2 (u_i^T y)^2,
    # falls strictly as l grows, so the largest ridge wins
    y = F.one_hot(torch.randint(0, 5, (150,), generator=g), 5).double()
    lam, losses = choose_lambda(h[:150], y, h[:150], torch.zeros_like(y), lambdas)
    assert lam == 1e8 and all(a > b for a, b in zip(losses, losses[1:], strict=False))


def test_ranpac_head_equals_a_direct_computation():
    x, y = blobs(n_per_class=25)
    settings = RanPACConfig(dim=64, seed=3)
    scores = HEADS.get("ranpac").fit(CacheStub(x, y, rows=11), settings)
    w_rand = torch.randn(x.shape[1], 64, generator=torch.Generator().manual_seed(3))  # N(0, 1), unscaled
    h = torch.relu(x @ w_rand).double()
    gram, q = h.T @ h, h.T @ F.one_hot(y, 5).double()
    lam = scores.info["lambda"]
    assert lam in settings.lambdas and len(scores.info["val_mse"]) == 17
    w_o = np.linalg.solve(gram.numpy() + lam * np.eye(64), q.numpy())
    qx = blobs(n_per_class=3, seed=9)[0]
    expected = torch.relu(qx @ w_rand).double().numpy() @ w_o
    np.testing.assert_allclose(
        scores(qx).double().numpy(), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max()
    )


@pytest.mark.parametrize("name", ["ncm", "lda", "fecam", "ranpac"])
def test_heads_from_chunked_statistics_equal_one_pass(name):
    x, y = blobs()
    settings = HEADS.get(name).config_cls()
    if name == "ranpac":
        settings.dim = 48
    one = HEADS.get(name).fit(CacheStub(x, y, rows=100_000), settings)
    many = HEADS.get(name).fit(CacheStub(x, y, rows=7), settings)
    q = blobs(n_per_class=5, seed=4)[0]
    a, b = one(q), many(q)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    assert torch.equal(a.argmax(1), b.argmax(1))


# --- registries and config ------------------------------------------------------------------


def test_registries_list_their_names_on_an_unknown_one():
    from clpt.methods import METHODS
    from clpt.stages import get_stage

    with pytest.raises(ValueError, match="unknown head 'knn'; valid: ca, fecam, lda, linear, ncm, ranpac"):
        HEADS.get("knn")
    with pytest.raises(ValueError, match="valid: slca, seqft, seqft_sl, frozen_ca, slca_pp"):
        METHODS.get("ewc")
    with pytest.raises(ValueError, match="valid: train, extract, stats, align, eval"):
        get_stage("distill")
    with pytest.raises(ConfigError, match="method: 'ewc' is not one of: slca, seqft"):
        R.resolve(overrides=["method=ewc"])
    with pytest.raises(ConfigError, match=r"heads.enabled: \['knn'\] not among: ca, fecam, lda"):
        R.resolve(overrides=["heads.enabled=[ncm,knn]"])
    with pytest.raises(ConfigError, match=r"heads.lda.shrinkage: 2.0 must be in \[0, 1\]"):
        R.resolve(overrides=["heads.lda.shrinkage=2"])
    with pytest.raises(ConfigError, match="heads.svm: unknown key"):
        R.resolve(overrides=["heads.svm.c=1"])


def test_a_method_with_incomplete_settings_is_rejected_when_the_config_is_built(monkeypatch):
    from clpt.methods import METHODS, MethodSpec

    monkeypatch.setitem(METHODS._items, "bare", MethodSpec("bare", "no preset"))
    with pytest.raises(ConfigError) as e:
        R.resolve(overrides=["method=bare"])
    assert "train.backbone_lr_scale: method 'bare' leaves it unset" in str(e.value)
    assert "align.enabled: method 'bare' leaves it unset" in str(e.value)
    cfg = R.resolve(overrides=["method=bare", "train.backbone_lr_scale=0.01", "align.enabled=true"])
    assert cfg.method == "bare"


def test_head_settings_round_trip_through_the_saved_config():
    cfg = R.resolve(
        overrides=["heads.enabled=[ncm,ranpac]", "heads.ranpac.dim=512", "heads.fecam.tukey=true"]
    )
    again = R.build_config(C.to_dict(cfg))
    assert again.heads.enabled == ["ncm", "ranpac"] and again.heads.of("ranpac").dim == 512
    assert again.heads.of("fecam").tukey and C.to_dict(again) == C.to_dict(cfg)
    assert R.resolve().heads.of("ranpac").dim == 2048  # the built-in preset
    ir = R.resolve(overrides=["benchmark.name=imagenet-r", "benchmark.root=x"]).heads.of("fecam")
    assert (ir.shrink1, ir.shrink2) == (10.0, 10.0) and R.resolve().heads.of("ranpac").lambdas[0] == 1e-8


def test_builtin_backbone_loads_through_timm_create_model(clpt_cache):
    import timm

    from clpt.vit_micro import builtin_weights_path

    model = timm.create_model("clpt_vit_micro", pretrained=True)
    saved = torch.load(builtin_weights_path(), weights_only=True)
    state = model.state_dict()
    assert saved.keys() <= state.keys()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


@pytest.mark.parametrize("name", HEADS.names())
def test_a_saved_head_state_scores_exactly_as_the_fit_that_produced_it(name, tmp_path):
    """Every head's fit is a `HeadState`: saved as safetensors and rebuilt, it gives bit-identical scores
    (the same arithmetic on the same tensors), and the file says what it is."""
    from clpt import artifacts
    from clpt.heads import restore_state
    from clpt.model import Heads

    x, y = blobs()
    torch.manual_seed(0)
    heads = Heads(x.shape[1], [3, 2])
    cache = InMemoryCache(x, y, TASKS, 1, R.resolve(overrides=["seed=1993", "align.epochs=2",
                          "align.samples_per_class=16", "heads.ranpac.dim=64"]), "cpu", heads=heads)  # fmt: skip
    settings = cache.cfg.heads.of(name)
    state = HEADS.get(name).fit(cache, settings)
    path = tmp_path / f"{name}.safetensors"
    artifacts.save_head_state(path, name, 1, 5, state.tensors(), state.meta(), dataclasses.asdict(settings),
                              state.info)  # fmt: skip
    tensors, md = artifacts.read_head_state(path, name, None)
    loaded = restore_state(name, tensors, md["meta"])
    test = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(test), state(test))
    assert (md["head"], md["task"], md["n_classes"], md["settings"]) == (
        name,
        1,
        5,
        dataclasses.asdict(settings),
    )
    assert all(v.dtype in (torch.float32, torch.int64) for v in tensors.values())
    if name == "ranpac":
        assert set(tensors) == {"w_o"}  # W_rand is redrawn from its seed, not stored
    with pytest.raises(Exception, match="holds head"):
        artifacts.read_head_state(path, "other" if name != "other" else "x", None)


@pytest.mark.parametrize("name", ["ncm", "fecam"])
def test_a_per_class_head_saves_each_task_s_classes_as_a_part_of_the_state(name, tmp_path):
    """NCM's and FeCAM's incremental fit is the new task's classes alone; saved after the previous task's
    file (its sha256), the parts read back as the whole state, equal to the bit to the fit from scratch. A
    part whose earlier file is missing, was written again, or covers other classes is a one-line error
    naming the stage to run again; a whole state saved before parts existed (format 1) still reads."""
    from clpt import artifacts
    from clpt.errors import DataError, Redo
    from clpt.heads import restore_parts

    x, y = blobs()
    q = blobs(n_per_class=4, seed=7)[0]
    settings = HEADS.get(name).config_cls()
    first = HEADS.get(name).fit(CacheStub(x, y, task=0), settings)
    ctx = CacheStub(x, y)
    ctx.previous_state = lambda head: (first.tensors(), {"settings": dataclasses.asdict(settings),  # type: ignore[method-assign]
                                                         "meta": first.meta(), "n_classes": 3})  # fmt: skip
    part = HEADS.get(name).fit(ctx, settings)
    scratch = HEADS.get(name).fit(CacheStub(x, y), settings)
    assert part.first_class == 3 and part.info["incremental"]
    assert all(len(v) == 2 for k, v in part.tensors().items() if k != "dense_index")  # task 1's classes

    root = tmp_path / "run"
    p0, p1 = artifacts.head_state_path(root, name, 0), artifacts.head_state_path(root, name, 1)
    p0.parent.mkdir(parents=True)
    p1.parent.mkdir(parents=True)
    md = (first.meta(), dataclasses.asdict(settings))
    artifacts.save_head_state(p0, name, 0, 3, first.tensors(), *md)
    artifacts.save_head_state(p1, name, 1, 5, part.tensors(), *md, first_class=3, base=artifacts.file_sha256(p0))

    def redo(k: int) -> Redo:
        return Redo(f"head:{name}", k, str(root))

    parts, top = artifacts.read_head_parts(root, name, 1, redo)
    assert len(parts) == 2 and (top["task"], top["n_classes"], top["first_class"]) == (1, 5, 3)
    whole = restore_parts(name, parts, top["meta"])
    assert parts == [{}, {}]  # consumed: each piece left its part as it was copied (about one state held)
    assert whole.tensors().keys() == scratch.tensors().keys()
    assert all(torch.equal(whole.tensors()[k], v) for k, v in scratch.tensors().items())
    with torch.no_grad():
        assert torch.equal(whole(q), scratch(q))

    artifacts.save_head_state(p0, name, 0, 3, first.tensors(), *md, info={"again": True})  # written again
    with pytest.raises(DataError, match="is another one now") as e:
        artifacts.read_head_parts(root, name, 1, redo)
    assert e.value.redo == redo(1)
    artifacts.save_head_state(p0, name, 0, 4, first.tensors(), *md)  # covers other classes
    artifacts.save_head_state(p1, name, 1, 5, part.tensors(), *md, first_class=3, base=artifacts.file_sha256(p0))
    with pytest.raises(DataError, match="continues 4 classes of task 0, not 3"):
        artifacts.read_head_parts(root, name, 1, redo)
    p0.unlink()
    with pytest.raises(DataError, match="which is missing"):
        artifacts.read_head_parts(root, name, 1, redo)

    from safetensors.torch import save_file  # a whole state as clpt wrote it before parts (format 1)

    meta = {"format": "clpt-head-state", "format_version": "1", "head": name, "task": "1", "n_classes": "5",
            "meta": json.dumps(scratch.meta()), "settings": json.dumps(md[1]), "info": "{}"}  # fmt: skip
    save_file(scratch.tensors(), str(p1), metadata=meta)
    parts, top = artifacts.read_head_parts(root, name, 1, redo)
    assert len(parts) == 1 and top["first_class"] == 0
    with torch.no_grad():
        assert torch.equal(restore_parts(name, parts, top["meta"])(q), scratch(q))


def test_ca_aligns_task_0_when_the_learner_never_trains_its_heads():
    """SimpleCIL / RanPAC / MIST train no task heads: CA aligns them at task 0 too, instead of scoring random
    heads; a learner that trains them keeps SLCA's rule (no alignment at task 0)."""
    from clpt.heads.ca import aligns_first_task
    from clpt.model import Heads

    x, y = blobs()
    for method, aligned in (("simplecil", True), ("ranpac_mist", True), ("slca", False), ("seqft", False)):
        cfg = R.resolve(
            overrides=[
                f"method={method}",
                "align.epochs=5",
                "align.samples_per_class=128",
                "align.batch_size=32",
                "align.lr=0.1",
                "align.tau=1.0",
            ]
        )
        assert aligns_first_task(cfg) is aligned
        torch.manual_seed(0)
        cache = InMemoryCache(x, y, TASKS, 0, cfg, "cpu", heads=Heads(x.shape[1], [3]))
        state = HEADS.get("ca").fit(cache, cfg.heads.of("ca"))
        sel = y < 3
        acc = float((state(x[sel]).argmax(1) == y[sel]).float().mean())
        assert (
            (acc > 0.9) if aligned else torch.equal(state.heads.heads[0].weight, cache.heads.heads[0].weight)
        )


def test_ranpac_fits_lambda_on_int_of_80_percent_of_the_rows_as_the_authors(monkeypatch):
    """Issue 23, item 9: the fit part is int(0.8 N) rows (truncated), not round(0.8 N): 57 of 72 rows."""
    import clpt.heads.ranpac as ranpac

    seen = []
    real = ranpac.choose_lambda

    def spy(h_a, y_a, h_v, y_v, lambdas, dtype=torch.float64, **kw):
        seen.append((len(h_a), len(h_v)))
        return real(h_a, y_a, h_v, y_v, lambdas, dtype, **kw)

    monkeypatch.setattr(ranpac, "choose_lambda", spy)
    x, y = blobs(n_per_class=36, n_classes=5)  # task 1: classes 3-4, 72 rows; 0.8 * 72 = 57.6
    HEADS.get("ranpac").fit(CacheStub(x, y), RanPACConfig(dim=32, seed=3))
    assert seen == [(57, 15)]
