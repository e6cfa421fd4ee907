"""Drift compensation maps (docs/methods/drift.md) against direct NumPy computations and exact invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clpt import drift as D


def _pairs(n=120, d=12, seed=0, drift=True):
    """Old features with a large common mean (as ViT features), and the same images under a moved backbone."""
    g = torch.Generator().manual_seed(seed)
    x_old = torch.randn(n, d, generator=g, dtype=torch.float64) + 3.0
    if not drift:
        return x_old, x_old.clone()
    w = torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(d, d, generator=g, dtype=torch.float64)
    return x_old, x_old @ w + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)


def _classes(n=120, c=4):
    return torch.arange(n) % c


def test_linear_map_is_the_formula_computed_directly():
    x_old, x_new = _pairs()
    s = D.LinearConfig(gamma1=1e-3, alpha_t=2.0)
    a = x_old.numpy() / np.linalg.norm(x_old.numpy(), axis=1, keepdims=True)
    b = x_new.numpy() / np.linalg.norm(x_new.numpy(), axis=1, keepdims=True)
    n, d = a.shape
    w_ls = np.linalg.inv(a.T @ a + 1e-3 * np.eye(d)) @ a.T @ b
    shrink = math.exp(-n / (2.0 * d))
    expected = (1 - shrink) * w_ls + shrink * np.eye(d)
    np.testing.assert_allclose(D.linear_map(x_old, x_new, s).numpy(), expected, rtol=1e-9, atol=1e-10)
    raw = D.linear_map(x_old, x_new, D.LinearConfig(normalize=False, gamma1=1e-3, alpha_t=2.0)).numpy()
    w_raw = (
        np.linalg.inv(x_old.numpy().T @ x_old.numpy() + 1e-3 * np.eye(d)) @ x_old.numpy().T @ x_new.numpy()
    )
    np.testing.assert_allclose(raw, (1 - shrink) * w_raw + shrink * np.eye(d), rtol=1e-9, atol=1e-10)


def test_the_statistics_of_xw_are_the_mapped_statistics():
    """mu W and W^T M2 W are exact: the moments of the mapped features equal the mapped moments."""
    x, y = _pairs()
    labels = _classes()
    m = D.fit_linear(x, y, None, None, D.LinearConfig())
    before = D.moments_of(x, labels, 4)
    mapped = m.apply(before, torch.arange(4))
    direct = D.moments_of(m.apply_features(x, labels), labels, 4)
    torch.testing.assert_close(mapped.mean, direct.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mapped.m2, direct.m2, rtol=1e-9, atol=1e-9)
    assert torch.equal(mapped.count, before.count)
    assert torch.equal(mapped.m2, mapped.m2.transpose(1, 2))  # exactly symmetric


def test_dpcr_maps_the_gram_exactly_and_features_alike():
    x, y = _pairs()
    labels = _classes()
    before = D.moments_of(x, labels, 4)
    m = D.fit_dpcr(x, y, before, torch.arange(4), D.DPCRConfig())
    mapped = m.apply(before, torch.arange(4))
    direct = D.moments_of(m.apply_features(x, labels), labels, 4)
    torch.testing.assert_close(mapped.mean, direct.mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mapped.gram(), direct.gram(), rtol=1e-9, atol=1e-8)


def test_dpcr_is_its_formula_computed_directly():
    x, y = _pairs(n=9, d=12)  # N < d: each class's Gram spans few directions
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    stats = D.moments_of(x, labels, 3)
    s = D.DPCRConfig(rho=1e-3, tolerance=1e-8)
    m = D.fit_dpcr(x, y, stats, torch.arange(3), s)
    a, b = x.numpy(), y.numpy()
    p = np.linalg.inv(a.T @ a + 1e-3 * np.eye(12)) @ a.T @ b
    for c in range(3):
        u, sv, _ = np.linalg.svd(stats.gram()[c].numpy())
        v = u[:, sv > 1e-8 * sv[0]]
        assert v.shape[1] == 3  # three rows of the class: rank 3
        np.testing.assert_allclose(m.w[c].numpy(), p @ (v @ v.T), rtol=1e-7, atol=1e-9)


def test_sdc_is_its_formula_computed_directly():
    x, y = _pairs()
    means = D.moments_of(x, _classes(), 4).mean
    s = D.SDCConfig(sigma=2.0, floor=1e-5)
    got = D.fit_sdc(x, y, D.Moments(torch.ones(4), means, torch.zeros(4, 12, 12)), torch.arange(4), s).delta
    a, b, mu = x.numpy(), y.numpy(), means.numpy()
    for c in range(4):
        w = np.exp(-((a - mu[c]) ** 2).sum(1) / (2 * 2.0**2)) + 1e-5
        np.testing.assert_allclose(
            got[c].numpy(), (w[:, None] * (b - a)).sum(0) / w.sum(), rtol=1e-9, atol=1e-12
        )


def test_sdc_with_an_underflowing_kernel_is_the_global_translation():
    x, y = _pairs()
    means = D.moments_of(x, _classes(), 4).mean + 1e3  # far from every pair: every weight underflows
    delta = D.sdc_shift(x, y, means, sigma=0.1, floor=1e-5)
    torch.testing.assert_close(delta, (y - x).mean(0).expand(4, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["linear", "sdc", "dpcr"])
def test_on_a_frozen_backbone_every_compensation_leaves_the_statistics_unchanged(method):
    """theta_{t-1} = theta_t: the pairs are equal, and the statistics stay as they are within the shrinkage."""
    x, y = _pairs(drift=False)
    labels = _classes()
    stats = D.moments_of(x, labels, 4)
    spec = D.DRIFT_METHODS.get(method)
    m = spec.fit(x, y, stats, torch.arange(4), spec.config_cls())
    after = m.apply(stats, torch.arange(4))
    if method == "sdc":  # a mean shift of exactly zero
        assert torch.equal(after.mean, stats.mean) and torch.equal(after.m2, stats.m2)
        return
    # linear: (A^T A + gamma I)^-1 A^T A, shrunk toward I: I up to gamma / eigenvalue; dpcr: up to rho
    torch.testing.assert_close(after.mean, stats.mean, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(after.m2, stats.m2, rtol=2e-3, atol=2e-2)


def test_composition_over_three_tasks_is_the_product_map():
    maps, ws = [], []
    for seed in (1, 2, 3):
        x, y = _pairs(seed=seed)
        m = D.fit_linear(x, y, None, None, D.LinearConfig())
        maps.append(m)
        ws.append(m.w)
    x, _ = _pairs(seed=9)
    labels = _classes()
    stats = D.moments_of(x, labels, 4)
    composed = D.compose(stats, torch.arange(4), maps)
    product = D.LinearMap(ws[0] @ ws[1] @ ws[2]).apply(stats, torch.arange(4))
    torch.testing.assert_close(composed.mean, product.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(composed.m2, product.m2, rtol=1e-9, atol=1e-8)
    torch.testing.assert_close(
        D.compose_features(x, labels, maps), x @ ws[0] @ ws[1] @ ws[2], rtol=1e-10, atol=1e-10
    )


def test_weak_nonlinear_learns_the_drift_and_the_option_regularises_the_mlp():
    x, y = _pairs(n=200, d=8)
    labels = _classes(200)
    stats = D.moments_of(x, labels, 4)
    s = D.WeakNonlinearConfig(steps=300, samples_per_dim=50)
    gen = torch.Generator().manual_seed(0)
    m = D.fit_weak_nonlinear(x, y, stats, torch.arange(4), s, gen)
    mapped = m.apply_features(x, labels)
    assert ((mapped - y).norm(dim=1) < (x - y).norm(dim=1)).float().mean() > 0.8  # closer to the new features
    # direction mapped, input norm restored: y(s x) = s y(x)
    torch.testing.assert_close(m.apply_features(3.0 * x, labels), 3.0 * mapped, rtol=1e-5, atol=1e-5)
    after = m.apply(stats, torch.arange(4))
    assert torch.equal(after.count, stats.count) and after.m2.shape == stats.m2.shape
    target = D.moments_of(y, labels, 4).mean  # the new backbone's class means
    assert (after.mean - target).norm() < (
        stats.mean - target
    ).norm()  # the re-estimated means moved toward them
    reg = D.fit_weak_nonlinear(x, y, stats, torch.arange(4), D.WeakNonlinearConfig(steps=300, regularize=True, gamma2=50.0),
                               torch.Generator().manual_seed(0))  # fmt: skip
    assert reg.info["mix"][2] < m.info["mix"][2]  # the regulariser shrinks the MLP branch


def test_the_registry_names_the_methods():
    assert D.DRIFT_METHODS.names() == ["linear", "weak_nonlinear", "sdc", "dpcr"]
    with pytest.raises(ValueError, match="unknown drift method 'nope'; valid: linear"):
        D.DRIFT_METHODS.get("nope")
    assert all(spec.config_cls().problems() == [] for _, spec in D.DRIFT_METHODS.items())
