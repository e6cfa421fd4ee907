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
    s = D.DPCRConfig(rho=1e-3, relative=False, tolerance=1e-8)
    m = D.fit_dpcr(x, y, stats, torch.arange(3), s)
    a, b = x.numpy(), y.numpy()
    p = np.linalg.inv(a.T @ a + 1e-3 * np.eye(12)) @ a.T @ b
    for c in range(3):
        u, sv, _ = np.linalg.svd(stats.gram()[c].numpy())
        v = u[:, sv > 1e-8 * sv[0]]
        assert v.shape[1] == 3  # three rows of the class: rank 3
        np.testing.assert_allclose(m.class_map(c).numpy(), p @ (v @ v.T), rtol=1e-7, atol=1e-9)


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


@pytest.mark.parametrize("method", ["linear", "weak_nonlinear", "sdc", "dpcr", "ldc"])
def test_a_saved_map_restores_to_the_same_map(method):
    x, y = _pairs(n=60, d=6)
    labels = _classes(60)
    stats = D.moments_of(x, labels, 4)
    spec = D.DRIFT_METHODS.get(method)
    settings = {
        "weak_nonlinear": lambda: spec.config_cls(steps=20),
        "ldc": lambda: spec.config_cls(epochs=2),
    }.get(method, spec.config_cls)()
    m = spec.fit(x, y, stats, torch.arange(4), settings, torch.Generator().manual_seed(0))
    again = spec.restore({k: v.clone() for k, v in m.state().items()}, stats, settings)
    a, b = m.apply(stats, torch.arange(4)), again.apply(stats, torch.arange(4))
    assert torch.equal(a.mean, b.mean) and torch.equal(a.m2, b.m2)
    assert torch.equal(m.apply_features(x, labels), again.apply_features(x, labels))


def test_the_registry_names_the_methods():
    assert D.DRIFT_METHODS.names() == ["linear", "weak_nonlinear", "sdc", "dpcr", "ldc"]
    with pytest.raises(ValueError, match="unknown drift method 'nope'; valid: linear"):
        D.DRIFT_METHODS.get("nope")
    assert all(spec.config_cls().problems() == [] for _, spec in D.DRIFT_METHODS.items())


# --- the stages: paired features, compensated statistics, every classifier beside its compensated twin ----


THREE_TASKS = ["benchmark.init_classes=20", "benchmark.increment=15"]  # 20 + 15 + 15 classes


def _cli(*args):
    from typer.testing import CliRunner

    from clpt_cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _run(root, tiny, *overrides):
    args = ["run", root, "--json"]
    for o in [*tiny, *THREE_TASKS, *overrides]:
        args += ["--set", o]
    res = _cli(*args)
    assert res.exit_code == 0, res.stderr + res.stdout
    import json

    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def frozen_sdc_run(tmp_path_factory, clpt_cache):
    """frozen_ca with SDC: the backbone never moves, so the pairs are the training features exactly."""
    from bad_inputs import TINY

    root = tmp_path_factory.mktemp("drift") / "frozen"
    return root, _run(root, TINY, "method=frozen_ca", "drift.method=sdc")


def test_on_a_frozen_backbone_the_pairs_are_the_training_features_and_nothing_moves(frozen_sdc_run):
    from clpt import artifacts

    root, rep = frozen_sdc_run
    for t in (1, 2):
        x_old, y_old = artifacts.read_features(root, t, artifacts.PAIRS)
        x_new, y_new = artifacts.read_features(root, t, "train")
        assert torch.equal(x_old, x_new) and torch.equal(
            y_old, y_new
        )  # row i is the same image, same arithmetic
        moved = artifacts.load_stats(root, t, store="drift")  # every old class, shifted by exactly 0 (SDC)
        stale = [artifacts.load_stats(root, i) for i in range(t)]
        assert np.array_equal(moved["mean"], np.concatenate([p["mean"] for p in stale]))
        assert np.array_equal(moved["m2"], np.concatenate([p["m2"] for p in stale]))
    heads = rep["heads"]
    for name in (
        "ca",
        "ncm",
        "lda",
        "fecam",
        "ranpac",
    ):  # each compensated twin scores exactly as its stale self
        assert heads[f"{name}+drift"]["acc_matrix"] == heads[name]["acc_matrix"], name
    assert "linear+drift" not in heads  # the learner's heads have no statistics to compensate


def test_switching_the_drift_method_is_a_refit_from_the_cache(frozen_sdc_run, tmp_path, monkeypatch):
    import shutil

    from clpt.run import Run, open_run
    from clpt.stages import run_order

    root = tmp_path / "run"
    shutil.copytree(frozen_sdc_run[0], root)

    def markers():
        run = open_run(root)
        return {(s, t): (run.marker(s, t) or {}).get("id") for t in range(3) for s in run_order(run.cfg)}

    before = markers()
    assert (
        _cli("config", root, "--set", "drift.method=linear", "--set", "drift.linear.alpha_t=0.5").exit_code
        == 0
    )
    run = open_run(root)
    stale = {(s, t) for t in range(3) for s in run_order(run.cfg) if run.state(s, t) != "done"}
    assert stale == {("drift", t) for t in range(3)} | {
        (f"head:{h}+drift", t) for h in ("ca", "ncm", "lda", "fecam", "ranpac") for t in range(3)
    }

    def no_images(self):
        raise AssertionError("a drift refit read the benchmark's images")

    monkeypatch.setattr(Run, "benchmark", no_images)
    res = _cli("run", root)
    assert res.exit_code == 0, res.stderr
    after = markers()
    assert {k for k in before if before[k] != after[k]} == stale
    summary = open_run(root).marker("drift", 2)["summary"]
    assert summary["method"] == "linear" and summary["pairs"] > 0 and 0 < summary["shrink"] < 1


def test_a_moving_backbone_gets_maps_that_compose_and_a_killed_pairs_extraction_resumes(
    tmp_path, tiny, clpt_cache
):
    """SLCA moves the backbone; the compensated statistics are the composition of the stored maps; a pairs
    extraction killed with SIGKILL resumes to the identical store."""
    from processes import kill_mid_write

    from clpt import artifacts
    from clpt.run import open_run
    from clpt.stages.drift import load_map

    root = tmp_path / "slca"
    rep = _run(root, tiny, "drift.method=linear", "system.feature_chunk_rows=32")
    run = open_run(root)
    # the old classes of task 0 after task 2: task 0's statistics through the maps of tasks 1 and 2
    s0 = artifacts.load_stats(root, 0)
    stats0 = D.Moments(*(torch.as_tensor(s0[k]).double() for k in ("count", "mean", "m2")))
    want = D.compose(
        stats0, torch.as_tensor(s0["classes"]), [load_map(root, run.cfg, 1), load_map(root, run.cfg, 2)]
    )
    got = artifacts.load_stats(root, 2, store="drift")
    n0 = len(s0["classes"])
    np.testing.assert_allclose(got["mean"][:n0], want.mean.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got["m2"][:n0], want.m2.numpy(), rtol=1e-9, atol=1e-8)
    assert not np.array_equal(got["mean"][:n0], s0["mean"])  # the backbone moved, so did the statistics
    assert {"lda", "lda+drift", "ca+drift"} <= set(rep["heads"])

    full = artifacts.read_features(root, 2, artifacts.PAIRS)[0]
    group = root / "features.zarr" / "task_002" / "pairs" / "feats"
    killed_at = kill_mid_write(["extract-pairs", root, "--task", "2", "--force"], group)
    assert killed_at is not None, "the paired extraction finished before it could be killed"
    assert open_run(root).state("pairs", 2) == "missing"
    assert _cli("run", root).exit_code == 0
    again = artifacts.read_features(root, 2, artifacts.PAIRS)[0]
    assert torch.equal(again, full)
    assert open_run(root).state("drift", 2) == "done"


def test_on_a_frozen_backbone_the_oracle_is_the_stored_statistics(frozen_sdc_run, tmp_path):
    """The re-extracted old images give exactly the stored statistics, and the statistics heads score alike."""
    import json
    import shutil

    root = tmp_path / "run"
    shutil.copytree(frozen_sdc_run[0], root)
    res = _cli("drift-oracle", root, "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    from clpt.units import machine

    assert doc == machine(json.loads((root / "tasks" / "002" / "oracle.json").read_text()))  # 6 digits
    assert doc["task"] == 2 and doc["old_classes"] == 35 and doc["drift_method"] == "sdc"
    s = doc["statistics"]
    assert (
        s["stale_mean_error"] == 0
        and s["stale_cov_rel_frobenius"] == 0
        and s["stale_kl"] == pytest.approx(0, abs=1e-9)
    )
    assert s["compensated_mean_error"] == 0  # SDC moved nothing on a frozen backbone
    for name in ("ncm", "lda"):  # statistics alone: the same statistics, the same classifier
        h = doc["heads"][name]
        assert h["oracle"] == h["stale"] == h["compensated"] and "recovered" not in h
    assert set(doc["heads"]) == {"ca", "ncm", "lda", "fecam", "ranpac"}


def test_the_oracle_says_what_it_needs(tmp_path, frozen_sdc_run):
    res = _cli("drift-oracle", frozen_sdc_run[0], "--task", "0")
    assert res.exit_code == 3 and "task after the first" in res.stderr
    res = _cli("drift-oracle", frozen_sdc_run[0], "--task", "7")
    assert res.exit_code == 1 and "task 7 does not exist" in res.stderr


def test_ldc_learns_the_least_squares_map_and_moves_means_only():
    """LDC and the ridge estimate the same map (x_old -> x_new); LDC's, by Adam, gets close and leaves M2 alone."""
    x, y = _pairs(n=400, d=8)
    labels = _classes(400)
    stats = D.moments_of(x, labels, 4)
    m = D.fit_ldc(x, y, stats, torch.arange(4), D.LDCConfig(epochs=200, lr=1e-2, init="identity"),
                  torch.Generator().manual_seed(0))  # fmt: skip
    ls = torch.linalg.lstsq(x, y).solution  # the least-squares map, no ridge
    assert (m.w - ls).abs().max() < 0.05
    after = m.apply(stats, torch.arange(4))
    assert torch.equal(after.m2, stats.m2) and not torch.equal(after.mean, stats.mean)
    torch.testing.assert_close(after.mean, stats.mean @ m.w)
