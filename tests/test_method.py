"""Reference checks of the method's pieces against docs/methods/slca.md's formulas."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clpt import config as C
from clpt.align import GaussianSampler, ca_loss, mean_scale_slca
from clpt.data.benchmark import class_order, load_benchmark, remap_labels, task_ranges
from clpt.evaluate import accuracy_row, metrics
from clpt.stages import resolve as R
from clpt.stats import ClassMoments, chunk_moments, make_accumulator


def test_class_order_is_the_reference_codes():
    for seed in (1993, 1996, 1997):
        np.random.seed(seed)
        expected = np.random.permutation(100)
        np.random.seed(123)
        before = np.random.rand()
        np.random.seed(123)
        got = class_order(100, seed)
        assert np.array_equal(got, expected)
        assert np.random.rand() == before  # the caller's global stream is left alone


def test_labels_are_remapped_to_order_positions():
    order = class_order(50, 1993)
    labels = np.arange(50)
    new = remap_labels(labels, order)
    assert np.array_equal(new[order], np.arange(50))  # class order[i] becomes label i


def test_builtin_benchmark_uses_the_run_seed():
    b = load_benchmark(C.BenchmarkConfig(name="builtin", seed=1996))
    np.random.seed(1996)
    assert np.array_equal(b.order, np.random.permutation(50))
    assert [len(r) for r in b.tasks] == [10] * 5
    assert sorted(np.unique(b.train.labels)) == list(range(50))
    assert (
        np.bincount(b.train.labels).tolist() == [120] * 50
        and np.bincount(b.test.labels).tolist() == [40] * 50
    )


@pytest.mark.parametrize(
    "n,init,inc,sizes",
    [
        (100, 10, 10, [10] * 10),
        (200, 20, 20, [20] * 10),
        (196, 20, 20, [20] * 9 + [16]),
        (50, 20, 10, [20, 10, 10, 10]),
    ],
)
def test_task_ranges(n, init, inc, sizes):
    ranges = task_ranges(n, init, inc)
    assert [len(r) for r in ranges] == sizes
    assert ranges[0].start == 0 and ranges[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:], strict=False))


# --- statistics -----------------------------------------------------------------


def _features(n, d, n_classes, offset, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    y = torch.randint(0, n_classes, (n,), generator=g)
    return (x + offset + y[:, None].double()).float(), y


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("chunk", [7, 64, 10_000])
def test_streaming_stats_equal_torch_cov(chunk):
    n, d, c = 400, 24, 5
    x, y = _features(n, d, c, offset=1000.0)  # large means, as ViT features have
    acc = make_accumulator(c, d)
    for s in range(0, n, chunk):
        acc.update(x[s : s + chunk], y[s : s + chunk])
    m = acc.result()
    cov = m.covariance(ridge=1e-4)
    for k in range(c):
        rows = x[y == k].double()
        ref = torch.cov(rows.T) + 1e-4 * torch.eye(d, dtype=torch.float64)
        assert m.count[k] == len(rows)
        # float32 accumulation about a per-class shift: float32-level agreement despite means of 1000
        torch.testing.assert_close(m.mean[k], rows.mean(0), rtol=0, atol=1e-5)
        assert rel_err(cov[k], ref) < 2e-6


def test_merge_of_partial_results_is_exact():
    x, y = _features(300, 16, 4, offset=50.0, seed=1)
    whole = chunk_moments(x, y, 4)
    parts = ClassMoments.zeros(4, 16)
    for s in (slice(0, 13), slice(13, 200), slice(200, 300)):  # uneven pieces, some classes absent
        parts = parts.merge(chunk_moments(x[s], y[s], 4))
    torch.testing.assert_close(parts.count, whole.count)
    torch.testing.assert_close(parts.mean, whole.mean, rtol=0, atol=1e-5)
    assert rel_err(parts.m2, whole.m2) < 2e-6


def test_merge_rows_is_chans_update_of_those_rows_bit_for_bit():
    """merge_rows (the GPU accumulator's step) writes classes that had nothing and merges the others: the
    same bits as the whole-array merge with the part placed at its rows."""
    x, y = _features(200, 8, 5, offset=20.0, seed=2)
    acc = chunk_moments(x[:120], y[:120], 5)
    acc.count[3], acc.mean[3], acc.m2[3] = 0, 0, 0  # class 3: nothing there yet
    rows = torch.tensor([4, 3, 1])
    part = chunk_moments(x[120:], y[120:], 5)
    part = ClassMoments(part.count[rows], part.mean[rows], part.m2[rows])
    placed = ClassMoments.zeros(5, 8)
    placed.count[rows], placed.mean[rows], placed.m2[rows] = part.count, part.mean, part.m2
    want = acc.merge(placed)
    acc.merge_rows(rows, part)
    assert torch.equal(acc.count, want.count) and torch.equal(acc.mean, want.mean) and torch.equal(acc.m2, want.m2)


def test_tiny_classes_get_the_ridge():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0], [10.0, 10.0]])
    y = torch.tensor([0, 0, 1])  # class 1: one row; class 2: none
    acc = make_accumulator(3, 2)
    acc.update(x, y)
    cov = acc.result().covariance(ridge=0.5)
    torch.testing.assert_close(
        cov[0], torch.cov(x[:2].T.double()) + 0.5 * torch.eye(2, dtype=torch.float64), rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(cov[1], 0.5 * torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(cov[2], 0.5 * torch.eye(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="labels must lie"):
        acc.update(x, torch.tensor([0, 1, 3]))


# --- classifier alignment ---------------------------------------------------------


def test_ca_loss_matches_the_formula_by_hand():
    z = torch.tensor([[1.0, -2.0, 0.5, 3.0, -1.0], [0.0, 4.0, -3.0, 1.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([3, 1])
    sizes, tau = [2, 3], 0.1
    expected = 0.0
    for i in range(2):
        # each block's L2 norm (+1e-7, as the reference code), averaged over the tasks
        n = ((math.hypot(*z[i, :2].tolist()) + 1e-7) + (math.hypot(*z[i, 2:].tolist()) + 1e-7)) / 2
        s = [v / (n * tau) for v in z[i].tolist()]
        expected += -(s[y[i]] - math.log(sum(math.exp(v) for v in s)))
    expected /= 2
    assert ca_loss(z, y, sizes, tau).item() == pytest.approx(expected, rel=1e-12)


def test_mean_shrink_of_slca():
    t_c = torch.tensor([0, 1, 2])
    torch.testing.assert_close(
        mean_scale_slca(t_c, 2), torch.tensor([0.9 + 0.1 / 3, 0.9 + 0.2 / 3, 1.0], dtype=torch.float64)
    )


def test_sampler_draws_from_the_class_gaussians():
    d = 6
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, d, d, generator=g, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) + 0.1 * torch.eye(d, dtype=torch.float64)
    means = torch.randn(2, d, generator=g, dtype=torch.float64) * 10
    s = GaussianSampler(means, covs, torch.device("cpu"))
    x, y = s.sample(20_000, torch.Generator().manual_seed(1), mean_scale=torch.tensor([1.0, 0.5]))
    assert x.shape == (40_000, d) and y.tolist()[:1] == [0] and int((y == 1).sum()) == 20_000
    for k, scale in ((0, 1.0), (1, 0.5)):
        xs = x[y == k].double()
        torch.testing.assert_close(xs.mean(0), means[k] * scale, atol=0.15, rtol=0)
        torch.testing.assert_close(torch.cov(xs.T), covs[k], atol=0.25, rtol=0.05)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_alignment_trains_the_concatenated_heads_as_each_head_s_own_parameters(optimizer):
    """`align_heads` trains one matrix, the heads' concatenation: the same logits, gradients and
    elementwise updates as training each head's own weight and bias (the loop as it was, below), so
    equal to the bit."""
    from clpt.align import align_heads
    from clpt.model import Heads

    d, sizes = 8, [3, 2, 4]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(9, d, d, generator=g, dtype=torch.float64)
    sampler = GaussianSampler(torch.randn(9, d, generator=g, dtype=torch.float64),
                              a @ a.transpose(1, 2) / d + 0.1 * torch.eye(d, dtype=torch.float64), torch.device("cpu"))  # fmt: skip
    cfg = R.resolve(overrides=["method=seqft", "align.epochs=3", "align.samples_per_class=12",
                               "align.batch_size=10", f"align.optimizer={optimizer}", "align.weight_decay=1e-3"])  # fmt: skip
    task_of_class = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    torch.manual_seed(1)
    heads = Heads(d, sizes)
    ref = Heads(d, sizes)
    ref.load_state_dict(heads.state_dict())
    losses = align_heads(heads, sampler, task_of_class, 2, cfg, torch.device("cpu"), seed=5)

    al = cfg.align  # the loop with each head's own parameters
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(ref.parameters(), lr=al.lr, weight_decay=cfg.align_weight_decay)
    else:
        opt = torch.optim.SGD(ref.parameters(), lr=al.lr, momentum=al.momentum, weight_decay=cfg.align_weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=al.epochs, eta_min=al.lr_min)
    gen = torch.Generator().manual_seed(5)
    ref_losses = []
    for _ in range(al.epochs):
        x, y = sampler.sample(al.samples_per_class, gen, mean_scale_slca(task_of_class, 2))
        perm = torch.randperm(len(y), generator=gen)
        x, y = x[perm], y[perm]
        total = 0.0
        for start in range(0, len(y), al.batch_size):
            xb, yb = x[start : start + al.batch_size], y[start : start + al.batch_size]
            logits = F.linear(xb, torch.cat([h.weight for h in ref.heads]), torch.cat([h.bias for h in ref.heads]))
            loss = ca_loss(logits, yb, sizes, al.tau)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(yb)
        sched.step()
        ref_losses.append(total / len(y))
    assert losses == ref_losses
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in heads.state_dict().items())


def test_sampler_rejects_singular_covariances():
    from clpt.errors import ClptError

    covs = torch.zeros(1, 3, 3, dtype=torch.float64)
    with pytest.raises(ClptError, match="not positive definite") as e:
        GaussianSampler(torch.zeros(1, 3), covs, torch.device("cpu"))
    assert "stats.ridge" in e.value.hint


# --- slow learner ----------------------------------------------------------------


def _tiny_model(sizes):
    from clpt.backbone import create_backbone
    from clpt.model import CLModel, Heads

    bb = create_backbone(C.BackboneConfig(name="clpt_vit_micro", pretrained=False))
    return CLModel(bb, Heads(bb.embed_dim, sizes))


@pytest.mark.parametrize("method,scale", [("slca", 0.01), ("seqft", 1.0), ("frozen_ca", 0.0)])
def test_slow_learner_groups_and_trainable_sets(method, scale):
    from clpt.train import param_groups

    cfg = R.resolve(overrides=[f"method={method}"])
    model = _tiny_model([10, 10, 10])
    groups = param_groups(model, cfg, 1)
    by_name = {g["name"]: g for g in groups}
    assert by_name["head"]["lr"] == 0.01
    assert {id(p) for p in by_name["head"]["params"]} == {id(p) for p in model.heads.heads[2].parameters()}
    assert not any(p.requires_grad for h in model.heads.heads[:2] for p in h.parameters())
    if scale > 0:
        assert by_name["backbone"]["lr"] == pytest.approx(0.01 * scale)
        assert len(by_name["backbone"]["params"]) == len(list(model.backbone.parameters()))
        assert all(p.requires_grad for p in model.backbone.parameters())
    else:
        assert "backbone" not in by_name and not any(p.requires_grad for p in model.backbone.parameters())


def test_slow_learner_trains_only_the_current_task(tmp_path):
    """Old heads stay frozen; the loss only sees the current task's logits."""
    from clpt.train import train_task

    cfg = R.resolve(overrides=["train.epochs=1", "train.milestones=[1]", "backbone.pretrained=false"])
    bench = load_benchmark(cfg.benchmark)
    model = _tiny_model([10])
    old = [p.detach().clone() for p in model.heads.heads[0].parameters()]
    bb_before = [p.detach().clone() for p in model.backbone.parameters()]
    train_task(model, bench, cfg, 1, torch.device("cpu"))
    assert model.heads.sizes == [10, 10]
    assert all(torch.equal(a, b) for a, b in zip(old, model.heads.heads[0].parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(bb_before, model.backbone.parameters(), strict=True))


def test_reset_final_norm_is_a_fresh_layernorm():
    from clpt.backbone import create_backbone

    bb = create_backbone(C.BackboneConfig(name="clpt_vit_micro", pretrained=False, reset_final_norm=True))
    assert isinstance(bb.norm, torch.nn.LayerNorm) and bb.norm.eps == 1e-5
    assert torch.equal(bb.norm.weight, torch.ones(128)) and torch.equal(bb.norm.bias, torch.zeros(128))
    x = torch.randn(2, 3, 32, 32)
    tokens = bb.forward_features(x)
    torch.testing.assert_close(bb(x), tokens[:, 0])  # the feature: class token after the final norm
    torch.testing.assert_close(
        tokens[:, 0],
        F.layer_norm(
            bb.forward_features.__self__.blocks(bb._pos_embed(bb.patch_embed(x)))[:, 0], (128,), eps=1e-5
        ),
    )


# --- metrics ---------------------------------------------------------------------


def test_metrics_by_hand():
    rows = [[0.9], [0.8, 0.95], [0.7, 0.85, 0.9]]
    accs = [0.9, 0.875, 0.8167]
    m = metrics(rows, accs)
    assert m["last_acc"] == 0.8167 and m["inc_acc"] == pytest.approx(np.mean(accs))
    assert m["forgetting"] == pytest.approx(((0.9 - 0.7) + (0.95 - 0.85)) / 2)
    assert m["old_task_acc"] == pytest.approx(0.775) and m["new_task_acc"] == 0.9
    # task-balanced (RanPAC's tables): the mean of each row's per-task accuracies
    assert m["last_acc_task_balanced"] == pytest.approx((0.7 + 0.85 + 0.9) / 3)
    assert m["inc_acc_task_balanced"] == pytest.approx((0.9 + 0.875 + (0.7 + 0.85 + 0.9) / 3) / 3)


def test_accuracy_row_uses_all_seen_classes():
    logits = torch.tensor([[5.0, 0, 0, 0], [0, 0, 5.0, 0], [0, 0, 0, 5.0], [5.0, 0, 0, 0]])
    labels = torch.tensor([0, 1, 3, 2])
    row = accuracy_row(logits, labels, [[0, 2], [2, 4]])
    assert row["accuracy"] == 0.5 and row["per_task"] == [0.5, 0.5]


def test_cars_task_of_class_option_reproduces_the_authors_index():
    """align.task_of_class=authors: class // current task size; the true task otherwise (Cars: 9 x 20 + 16)."""
    from clpt.align import class_tasks
    from clpt.data.benchmark import task_ranges

    tasks = task_ranges(196, 20, 20)
    assert [len(r) for r in tasks] == [20] * 9 + [16]
    for t in range(10):
        seen = tasks[t].stop
        true = torch.tensor([next(i for i, r in enumerate(tasks) if c in r) for c in range(seen)])
        authors = class_tasks(true, t, "authors")
        assert torch.equal(class_tasks(true, t, "true"), true)
        if t < 9:
            assert torch.equal(authors, true)  # equal while every task has 20 classes
        else:
            assert torch.equal(authors, torch.arange(196) // 16)  # the authors' last step
            assert not torch.equal(authors, true) and int(authors.max()) == 12


def test_feature_distillation_keeps_the_backbone_near_its_previous_self():
    """SLDC's beta variants: with kd_feat / kd_norm the trained backbone's features stay closer to the teacher's;
    the weights at 0 (the default) train exactly as without the term."""
    from clpt.losses import distillation_loss
    from clpt.train import train_task

    f, g = torch.randn(8, 16), torch.randn(8, 16)
    want = 0.7 * ((g - f) ** 2).mean() + 0.2 * ((g.norm(dim=1) - f.norm(dim=1)) ** 2).mean()
    torch.testing.assert_close(distillation_loss(f, g, 0.7, 0.2), want)
    base = [
        "train.epochs=1",
        "train.milestones=[1]",
        "backbone.pretrained=false",
        "train.backbone_lr_scale=0.1",
    ]
    bench = load_benchmark(R.resolve(overrides=base).benchmark)
    x = torch.from_numpy(bench.test.images[:64]).permute(0, 3, 1, 2).float() / 255

    def drift_after(*extra):
        torch.manual_seed(0)
        model = _tiny_model([10])
        with torch.no_grad():
            before = model.backbone(x)
        summary = train_task(model, bench, R.resolve(overrides=[*base, *extra]), 1, torch.device("cpu"))
        with torch.no_grad():
            return float((model.backbone(x) - before).norm(dim=1).mean()), summary

    plain, s0 = drift_after()
    zero, _ = drift_after("train.kd_feat=0.0")
    kd, s1 = drift_after("train.kd_feat=10.0", "train.kd_norm=1.0")
    assert zero == plain and "distillation" not in s0  # off by default: the same training, bit for bit
    assert kd < 0.75 * plain and s1["distillation"] == {
        "kd_feat": 10.0,
        "kd_norm": 1.0,
    }  # measured: 4.9 vs 8.0
