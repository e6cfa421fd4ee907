"""SLDC's recipe (docs/methods/drift.md, SLDC sections 1.7-1.10) as options of the existing pieces."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from clpt import align as A
from clpt import config as C
from clpt.model import Heads
from clpt.stages import graph as G
from clpt.stages import resolve as R
from clpt.train import initial_model, make_optimizer, make_scheduler, param_groups, task_loss


def _sldc(*overrides: str, method: str = "sldc") -> C.RunConfig:
    return R.resolve(overrides=[f"method={method}", *overrides])


@pytest.mark.parametrize(
    "bench,epochs,split",
    [("cifar100", 5, 10), ("imagenet-r", 10, 20), ("cub200", 15, 20), ("cars196", 15, 20)],
)
def test_the_presets_are_sldcs_smart_defaults(bench, epochs, split):
    for method in ("sldc", "sldc_kd"):
        cfg = _sldc(f"benchmark.name={bench}", "benchmark.root=/d", method=method)
        t, a = cfg.train, cfg.align
        assert (t.epochs, cfg.benchmark.init_classes, cfg.benchmark.increment) == (epochs, split, split)
        assert (t.optimizer, t.lr, t.weight_decay, t.batch_size) == ("adamw", 1e-3, 3e-5, 16)
        assert t.schedule == C.Schedule.cosine and t.cosine_floor == pytest.approx(1 / 3)
        assert t.loss == C.Loss.sce and (t.sce_alpha, t.sce_beta) == (0.5, 0.5) and t.backbone_lr_scale == 0
        assert cfg.lora.targets == ["qkv", "mlp"] and (cfg.lora.rank, cfg.lora.scale) == (4, 0.8)
        assert (cfg.lora.lr_first, cfg.lora.lr) == (1e-4, 1e-4)
        assert (a.optimizer, a.loss, a.lr, a.lr_min, a.weight_decay, a.epochs) == (
            "adam",
            "sce",
            5e-4,
            5e-5,
            1e-4,
            6,
        )
        assert (a.samples_per_class, a.batch_per_class, a.resample, a.first_task) == (1024, 3.2, False, True)
        assert not (a.mean_shrink or a.sample_scale or a.head_scale) and cfg.drift.method == "weak_nonlinear"
        kd = (t.kd_feat, t.kd_norm, t.kd_first_task)
        assert kd == ((1.0, 0.1, False) if method == "sldc_kd" else (0.0, 0.0, False))


def test_only_lora_and_the_head_train_with_adamw():
    cfg = _sldc("backbone.pretrained=false")
    model, _ = initial_model(cfg, torch.device("cpu"))
    model.heads.add(10)
    groups = param_groups(model, cfg, task=0)
    assert {g["name"]: g["lr"] for g in groups} == {"head": 1e-3, "lora": 1e-4}
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".mlp.fc1." in n for n in trainable) and any(".mlp.fc2." in n for n in trainable)
    assert not any("norm" in n for n in trainable)  # the fresh final LayerNorm stays frozen
    opt = make_optimizer(groups, cfg)
    assert isinstance(opt, torch.optim.AdamW) and all(g["weight_decay"] == 3e-5 for g in opt.param_groups)
    assert isinstance(make_optimizer(groups, R.resolve(overrides=["method=slca"])), torch.optim.SGD)


def test_cosine_to_a_third_of_each_groups_learning_rate():
    cfg = _sldc("train.epochs=6")
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-4}])
    sched = make_scheduler(opt, cfg)
    for e in range(7):
        for g, lr in zip(opt.param_groups, (1e-3, 1e-4), strict=True):
            want = lr / 3 + (lr - lr / 3) * (1 + math.cos(math.pi * e / 6)) / 2
            assert g["lr"] == pytest.approx(want, rel=1e-12)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 3)  # stays at the floor past the last epoch


def test_label_smoothing_is_the_smoothed_cross_entropy():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(16, 7, generator=g, dtype=torch.float64), torch.randint(0, 7, (16,), generator=g)
    cfg = R.resolve(overrides=["method=seqft", "train.label_smoothing=0.1"])
    logp = F.log_softmax(z, dim=1)
    want = (0.9 * -logp[torch.arange(16), y] + 0.1 * -logp.mean(dim=1)).mean()
    assert task_loss(z, y, cfg).item() == pytest.approx(want.item(), rel=1e-12)
    assert task_loss(z, y, R.resolve(overrides=["method=seqft"])).item() == pytest.approx(
        F.cross_entropy(z, y).item(), rel=1e-12
    )


def _stats(c=5, d=8):
    g = torch.Generator().manual_seed(1)
    means = 3 * torch.randn(c, d, generator=g)
    covs = torch.eye(d).expand(c, d, d).clone()
    return means, covs


@pytest.mark.parametrize("resample", [True, False])
def test_sldc_refinement_draws_once_trains_with_sce_and_sizes_its_batch(monkeypatch, resample):
    """Adam, SCE over raw logits, batch floor(3.2 * classes), and one draw for all epochs (SLDC) or one per epoch."""
    cfg = _sldc("align.epochs=3", "align.samples_per_class=16", f"align.resample={str(resample).lower()}")
    draws, batches = [], []
    real_sample, real_sce = A.GaussianSampler.sample, A.sce_loss

    def sample(self, *a, **k):
        draws.append(1)
        return real_sample(self, *a, **k)

    def sce(logits, labels, alpha, beta):
        batches.append((len(labels), alpha, beta))
        return real_sce(logits, labels, alpha, beta)

    monkeypatch.setattr(A.GaussianSampler, "sample", sample)
    monkeypatch.setattr(A, "sce_loss", sce)
    monkeypatch.setattr(A, "ca_loss", lambda *a: pytest.fail("SLDC's refinement does not normalise logits"))
    heads = Heads(8, [3, 2])
    means, covs = _stats()
    sampler = A.GaussianSampler(means, covs, torch.device("cpu"))
    losses = A.align_heads(heads, sampler, torch.tensor([0, 0, 0, 1, 1]), 1, cfg, torch.device("cpu"), seed=0)
    assert len(draws) == (3 if resample else 1) and len(losses) == 3
    assert batches == [(16, 0.5, 0.5)] * (5 * 3)  # 80 samples in batches of floor(3.2 * 5) = 16, 3 epochs
    assert losses[-1] < losses[0]


def test_slcas_alignment_is_unchanged_by_the_new_options():
    """The defaults are SLCA's CA: the same losses as the options spelled out."""
    base = ["method=slca", "align.epochs=2", "align.samples_per_class=16"]
    means, covs = _stats()
    tasks = torch.tensor([0, 0, 0, 1, 1])

    def losses(*extra):
        torch.manual_seed(0)
        heads = Heads(8, [3, 2])
        cfg = R.resolve(overrides=[*base, *extra])
        sampler = A.GaussianSampler(means, covs, torch.device("cpu"))
        return A.align_heads(heads, sampler, tasks, 1, cfg, torch.device("cpu"), seed=0)

    spelled = ["align.optimizer=sgd", "align.loss=ca", "align.lr_min=0.0", "align.resample=true"]
    assert losses() == losses(*spelled)
    assert losses() != losses("align.loss=sce")


def test_the_methods_classifier_is_the_compensated_ca_and_falls_back_without_drift():
    cfg = _sldc()
    assert G.classifier(cfg) == "ca+drift"
    order = G.run_order(cfg)
    assert order[: order.index("eval") + 1] == ["train", "extract", "stats", "pairs", "drift", "align",
                                                "head:ca+drift", "eval"]  # fmt: skip
    assert order.count("head:ca+drift") == 1 and "head:ca" in order
    off = _sldc("drift.method=none")
    assert G.classifier(off) == "ca"
    order = G.run_order(off)
    assert order[order.index("eval") - 1] == "head:ca" and not any(s.endswith("+drift") for s in order)
    assert G.get_stage("eval").inputs(cfg, 2) == [("head:ca+drift", 2)]
    assert ("stats", 0) in G.get_stage("head:ca+drift").inputs(cfg, 0)  # SLDC refines at task 0 as well


@pytest.mark.slow
def test_sldc_end_to_end_refines_at_task_0_and_reports_the_compensated_classifier(tmp_path, tiny, clpt_cache):
    from typer.testing import CliRunner

    from clpt_cli.main import app

    root = tmp_path / "sldc"
    sets = [*tiny, "method=sldc_kd", "drift.weak_nonlinear.steps=50", "align.samples_per_class=32",
            "benchmark.init_classes=20", "benchmark.increment=15", "train.milestones=[]"]  # fmt: skip
    args = ["run", str(root), "--json"]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.stderr + res.stdout
    report = json.loads(res.stdout)
    heads = report["heads"]
    assert report["acc_matrix"][-1] == heads["ca+drift"]["acc_matrix"][-1]  # the method's row is ca+drift
    assert heads["ca"]["acc_matrix"][-1] != heads["ca+drift"]["acc_matrix"][-1]
    align0 = json.loads((root / "tasks" / "000" / "align.done.json").read_text())
    assert align0["summary"]["aligned"] is True  # first_task: refined at task 0
    train1 = json.loads((root / "tasks" / "001" / "train.done.json").read_text())
    assert train1["summary"]["distillation"] == {"kd_feat": 1.0, "kd_norm": 0.1}
    train0 = json.loads((root / "tasks" / "000" / "train.done.json").read_text())
    assert "distillation" not in train0["summary"]  # fe0f492: t > 0 only
