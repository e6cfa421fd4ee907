"""Compact statistics (stats.covariance: full | diagonal | lowrank, issue 20): each form against an
independent computation, and every consumer (CA's sampler, LDA, FeCAM) accepting each form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clpt.align import GaussianSampler
from clpt.errors import ConfigError
from clpt.heads import HEADS, InMemoryCache
from clpt.heads.fecam import (
    FeCAMConfig,
    correlation,
    mahalanobis,
    precisions,
    shrink,
    structured_mahalanobis,
    structured_precision,
)
from clpt.stages import resolve as R
from clpt.stats import Scatter, compress, top_eigen


def scatters(c=3, d=24, n=120, seed=0) -> torch.Tensor:
    """(C, d, d) scatter matrices with a few strong directions and a floor, as features have."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(c):
        x = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.3
        x += torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.randn(3, d, generator=g, dtype=torch.float64)
        x -= x.mean(0)
        out.append(x.T @ x)
    return torch.stack(out)


def test_top_eigen_finds_numpys_largest_eigenpairs():
    """The three strong directions exactly; past them, in the flat floor where no eigengap separates the
    eigenvalues, randomized iteration gives Ritz values: lower bounds, within 0.5 %."""
    m2 = scatters()
    e, v = top_eigen(m2, 4)
    for c in range(len(m2)):
        ref_e, ref_v = np.linalg.eigh(m2[c].numpy())
        ref_e, ref_v = ref_e[::-1][:4], ref_v[:, ::-1][:, :4]
        np.testing.assert_allclose(e[c, :3].numpy(), ref_e[:3], rtol=1e-8)
        np.testing.assert_allclose(np.abs((v[c, :, :3].numpy() * ref_v[:, :3]).sum(0)), 1.0, atol=1e-8)  # up to sign
        assert (e[c].numpy() <= ref_e * (1 + 1e-12)).all() and (e[c].numpy() >= ref_e * 0.995).all()


def test_each_form_keeps_what_it_promises():
    m2 = scatters()
    d = m2.shape[-1]
    diag = compress(m2, "diagonal")
    assert torch.equal(diag.diagonal(), torch.diagonal(m2, dim1=1, dim2=2))
    assert torch.equal(compress(m2, "full").full(), m2)
    low = compress(m2, "lowrank", rank=4)
    assert low.basis is not None and low.basis.shape == (3, d, 4)
    approx = low.full()
    # the trace is kept, and the approximation is exact on the kept directions
    torch.testing.assert_close(torch.diagonal(approx, dim1=1, dim2=2).sum(1), torch.diagonal(m2, dim1=1, dim2=2).sum(1))
    torch.testing.assert_close(low.basis.transpose(1, 2) @ approx @ low.basis,
                               low.basis.transpose(1, 2) @ m2 @ low.basis, rtol=1e-6, atol=1e-6)  # fmt: skip
    torch.testing.assert_close(low.diagonal(), torch.diagonal(approx, dim1=1, dim2=2))
    # rank d is the matrix itself; and a lowrank form is much smaller than the full one at rank << d
    torch.testing.assert_close(compress(m2, "lowrank", rank=d).full(), m2, rtol=1e-9, atol=1e-9)
    assert low.nbytes() < compress(m2, "full").nbytes() / 4


@pytest.mark.parametrize("form", ["diagonal", "lowrank"])
def test_the_sampler_draws_each_forms_covariance(form):
    m2 = scatters(c=2, d=10)
    n, ridge = torch.tensor([120.0, 120.0], dtype=torch.float64), 1e-3
    sc = compress(m2, form, rank=3)
    s = GaussianSampler.from_stats(n, torch.zeros(2, 10, dtype=torch.float64), sc, ridge, torch.device("cpu"))
    x, y = s.sample(40_000, torch.Generator().manual_seed(0))
    target = sc.full() / 119 + ridge * torch.eye(10, dtype=torch.float64)
    for c in range(2):
        emp = torch.cov(x[y == c].T.double())
        assert float((emp - target[c]).norm() / target[c].norm()) < 0.03  # sampling noise at 40k draws


@pytest.mark.parametrize("form", ["diagonal", "lowrank"])
@pytest.mark.parametrize("a1,a2", [(1.0, 0.0), (10.0, 10.0)])
def test_fecam_compact_precision_equals_the_full_formula_on_the_compact_covariance(form, a1, a2):
    """FeCAM's Woodbury form scores exactly what shrink + correlation + inverse give on the same S."""
    cov = compress(scatters() / 119, form, rank=5)
    settings = FeCAMConfig(shrink1=a1, shrink2=a2)
    prec = precisions(correlation(shrink(cov.full(), a1, a2)))
    q = torch.randn(9, cov.full().shape[-1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mu = torch.zeros(3, q.shape[1], dtype=torch.float64)
    ref = mahalanobis(q, mu, prec)
    got = structured_mahalanobis(q, mu, *structured_precision(cov, settings))
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def blobs(n_per_class=60, d=16, n_classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(n_classes):
        a = torch.randn(d, d, generator=g) * 0.3
        xs.append(torch.randn(n_per_class, d, generator=g) @ a.T + torch.randn(d, generator=g) * 2)
        ys.append(torch.full((n_per_class,), c))
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("form", ["diagonal", "lowrank"])
def test_every_head_fits_and_scores_from_each_form(form):
    xa, ya = blobs(n_per_class=70)
    held = (torch.arange(len(ya)) % 70) >= 60  # the last 10 of each class are the queries
    x, y, q, qy = xa[~held], ya[~held], xa[held], ya[held]
    tasks = [[0, 3], [3, 6]]
    cfgs = {f: R.resolve(overrides=["method=seqft", f"stats.covariance={f}", "stats.rank=4", "align.epochs=5",
                                    "align.samples_per_class=32"]) for f in ("full", form)}  # fmt: skip
    from clpt.model import Heads

    for head in ("ncm", "lda", "fecam", "ranpac", "ca"):
        scores = {}
        for f, cfg in cfgs.items():
            cache = InMemoryCache(x, y, tasks, 1, cfg, heads=Heads(16, [3, 3]))
            state = HEADS.get(head).fit(cache, cfg.heads.of(head))
            scores[f] = state(q)
            assert bool(torch.isfinite(scores[f]).all()) and scores[f].shape == (len(q), 6)
        if head in ("ncm", "lda", "ranpac"):  # means, the pooled scatter, features: the form changes nothing
            torch.testing.assert_close(scores[form], scores["full"])
        assert float((scores[form].argmax(1) == qy).float().mean()) > 0.5  # far above chance (1/6)


def test_the_lowrank_fecam_state_is_restored_to_the_same_scores():
    from clpt.heads import restore_state

    x, y = blobs()
    cfg = R.resolve(overrides=["stats.covariance=lowrank", "stats.rank=4"])
    state = HEADS.get("fecam").fit(InMemoryCache(x, y, [[0, 6]], 0, cfg), cfg.heads.of("fecam"))
    back = restore_state("fecam", state.tensors(), state.meta())
    assert torch.equal(back(x[:20]), state(x[:20]))
    assert not {"prec", "chol"} & set(state.tensors()) and state.tensors()["w"].shape == (6, 16, 5)


def test_drift_compensation_needs_full_statistics_said_when_the_config_is_built():
    with pytest.raises(ConfigError) as e:
        R.resolve(overrides=["stats.covariance=lowrank", "drift.method=linear"])
    assert "stats.covariance=full" in str(e.value)
    with pytest.raises(ConfigError):
        R.resolve(overrides=["stats.covariance=banded"])


def test_scatter_cat_refuses_mixed_forms():
    m2 = scatters(c=2, d=6)
    with pytest.raises(ValueError):
        Scatter.cat([compress(m2, "full"), compress(m2, "diagonal")])


def test_a_run_in_each_form_end_to_end_and_switching_forms_refits_from_the_cache(tmp_path, tiny, clpt_cache,
                                                                                 monkeypatch):
    """A run with lowrank statistics; switching it to diagonal redoes fit-stats and what reads it, never
    an image; every classifier scores far above chance in both forms."""
    import json

    from typer.testing import CliRunner

    from clpt import artifacts
    from clpt.run import Run, open_run
    from clpt_cli.main import app

    root = tmp_path / "low"
    args = ["run", str(root), "--json", *sum((["--set", o] for o in tiny), []), "--set", "stats.covariance=lowrank",
            "--set", "stats.rank=8"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    low = json.loads(res.stdout)
    p = artifacts.load_stats(root, 4)
    assert p["covariance"] == "lowrank" and p["basis"].shape == (10, 128, 8) and "m2" not in p
    assert all(h["last_acc"] > 0.3 for h in low["heads"].values()) and low["last_acc"] > 0.3
    res = CliRunner().invoke(app, ["config", str(root), "--set", "stats.covariance=diagonal"])
    assert res.exit_code == 0, res.output
    run = open_run(root)
    assert run.state("stats", 0) == "stale" and run.state("train", 0) == "done"

    def no_images(self):
        raise AssertionError("switching the covariance form read the benchmark's images")

    monkeypatch.setattr(Run, "benchmark", no_images)
    res = CliRunner().invoke(app, ["run", str(root), "--json"])
    assert res.exit_code == 0, res.output
    diag = json.loads(res.stdout)
    assert artifacts.load_stats(root, 4)["covariance"] == "diagonal"
    assert all(h["last_acc"] > 0.3 for h in diag["heads"].values())
    # means and pooled scatter are the same in every form: NCM and LDA do not move
    for head in ("ncm", "lda"):
        assert diag["heads"][head]["acc_matrix"] == low["heads"][head]["acc_matrix"]
