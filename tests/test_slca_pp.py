"""SLCA++: hybrid slow learner (LoRA), symmetric cross-entropy, feature-scaled alignment."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from clpt import config as C
from clpt.align import head_input_scales, sample_scale_slca_pp
from clpt.backbone import create_backbone
from clpt.checkpoint import load_model, save_model
from clpt.errors import Redo
from clpt.lora import LoRALinear, apply_lora
from clpt.losses import sce_loss
from clpt.model import CLModel, Heads
from clpt.stages import resolve as R
from clpt.train import initial_model, make_scheduler, param_groups


@pytest.fixture(scope="module")
def vit_b16():
    return create_backbone(C.BackboneConfig(name="vit_base_patch16_224", pretrained=False))


def test_vit_b16_trainable_set_matches_the_paper(vit_b16):
    bb = vit_b16
    n_lora = apply_lora(bb, ["qkv"], rank=4, scale=0.8, svd_init=False)
    assert n_lora == 147_456
    cfg = R.resolve(overrides=["method=slca_pp"])
    model = CLModel(bb, Heads(768, [10]))
    groups = {g["name"]: g for g in param_groups(model, cfg, task=0)}
    n = {k: sum(p.numel() for p in g["params"]) for k, g in groups.items()}
    assert n["lora"] == 147_456 and n["backbone"] == 122_880 and n["head"] == 768 * 10 + 10
    trainable = {name for name, p in bb.named_parameters() if p.requires_grad}
    assert all(any(k in name for k in ("norm", "bias", "cls_token", "lora")) for name in trainable)
    assert "pos_embed" not in trainable and "blocks.0.attn.qkv.base.weight" not in trainable
    # the fixed variant also trains the MLP LoRA (which the reference code created but never trained)
    extra = apply_lora(bb, ["qkv", "mlp"], rank=4, scale=0.8, svd_init=False)
    assert extra == 12 * 4 * ((768 + 3072) + (3072 + 768))
    groups = {g["name"]: g for g in param_groups(model, cfg, task=0)}
    assert sum(p.numel() for p in groups["lora"]["params"]) == 147_456 + extra
    assert all(p.requires_grad for p in groups["lora"]["params"])


def test_lora_svd_initialisation():
    base = torch.nn.Linear(24, 40)
    lora = LoRALinear(base, rank=4, scale=0.8)
    lora.init_from_svd()
    _, _, vh = torch.linalg.svd(base.weight.detach().double(), full_matrices=False)
    torch.testing.assert_close(lora.lora_A.double(), vh[:4], rtol=1e-6, atol=1e-6)
    assert not lora.lora_B.any()
    x = torch.randn(5, 24)
    torch.testing.assert_close(lora(x), base(x))  # B = 0: the pre-trained function is unchanged
    with torch.no_grad():
        lora.lora_B.normal_()
    torch.testing.assert_close(
        lora(x), base(x) + 0.8 * x @ (lora.lora_B @ lora.lora_A).T, rtol=1e-5, atol=1e-5
    )


def test_learning_rate_groups_at_task_0_and_task_1():
    cfg = R.resolve(overrides=["method=slca_pp", "backbone.pretrained=false"])
    model, _ = initial_model(cfg, torch.device("cpu"))
    model.heads.add(10)
    g0 = {g["name"]: g["lr"] for g in param_groups(model, cfg, task=0)}
    assert g0 == {"head": 0.01, "backbone": pytest.approx(1e-3), "lora": 5e-3}
    model.heads.add(10)
    g1 = {g["name"]: g["lr"] for g in param_groups(model, cfg, task=1)}
    assert g1 == {"head": 0.01, "backbone": pytest.approx(1e-3), "lora": 1e-3}


def test_cosine_schedule_floor():
    cfg = R.resolve(overrides=["method=slca_pp", "train.epochs=4", "train.milestones=[3]"])
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.01}], lr=0.01)
    sched = make_scheduler(opt, cfg)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    floor = 1e-3 * 0.1
    assert lrs[0] == 0.01
    for e, lr in enumerate(lrs):
        assert lr == pytest.approx(floor + (0.01 - floor) * (1 + math.cos(math.pi * e / 4)) / 2)


def test_sce_loss_matches_the_formula_by_hand():
    z = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    a, b = 0.5, 0.5
    total = 0.0
    for i in range(2):
        e = [math.exp(v) for v in z[i].tolist()]
        p = [max(min(v / sum(e), 1.0), 1e-7) for v in e]
        ce = -math.log(e[y[i]] / sum(e))
        q = [1.0 if k == y[i] else 1e-4 for k in range(3)]
        rce = -sum(pk * math.log(qk) for pk, qk in zip(p, q, strict=True))
        total += a * ce + b * rce
    assert sce_loss(z, y, a, b).item() == pytest.approx(total / 2, rel=1e-12)
    assert sce_loss(z, y, 1.0, 0.0).item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-12)


def test_scaling_factors():
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 2, 2] * 5000)
    s = sample_scale_slca_pp(t, current_task=2, generator=g)
    assert torch.equal(s[t == 2], torch.ones(10000))
    for tc in (0, 1):
        f = s[t == tc]
        lo, hi = 1 / (1 + 0.03 * (2 - tc)), 1 / (1 + 0.01 * (2 - tc))
        assert f.min() >= lo and f.max() <= hi and f.std() > 0  # s drawn per sample
        assert f.min() < lo + 0.1 * (hi - lo) and f.max() > hi - 0.1 * (hi - lo)
    torch.testing.assert_close(head_input_scales(4, 3), torch.tensor([1.06, 1.04, 1.02, 1.0]))


def test_lora_checkpoint_round_trip(tmp_path):
    cfg = R.resolve(overrides=["method=slca_pp", "backbone.pretrained=false"])
    model, _ = initial_model(cfg, torch.device("cpu"))
    model.heads.add(10)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_()
    save_model(tmp_path / "m.pt", model.backbone, model.heads, cfg.backbone, task=0)
    loaded = load_model(tmp_path / "m.pt", cfg, torch.device("cpu"), Redo("train", 0, str(tmp_path)))
    a, b = model.backbone.state_dict(), loaded.backbone.state_dict()
    assert a.keys() == b.keys() and sum("lora" in k for k in a) == 8
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(loaded(x), model(x))


def test_slca_pp_end_to_end_through_the_cli(tmp_path, tiny, clpt_cache):
    from clpt_cli.main import app

    root = tmp_path / "pp"
    # tasks of unequal size (20, 15, 15), as Cars-196's last task: every class keeps its true task
    args = [
        "run",
        str(root),
        "--set",
        "method=slca_pp",
        "--set",
        "benchmark.init_classes=20",
        "--set",
        "benchmark.increment=15",
        "--json",
    ]
    for o in tiny:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["method"] == "slca_pp" and rep["task"] == 2 and rep["last_acc"] > 0.3
    ckpt = torch.load(root / "tasks" / "002" / "model.pt", weights_only=True)
    assert sum("lora_A" in k for k in ckpt["backbone"]) == 4  # one per block of the micro ViT
    assert ckpt["head_sizes"] == [20, 15, 15]
    heads = torch.load(root / "tasks" / "002" / "heads_aligned.pt", weights_only=True)
    torch.testing.assert_close(heads["heads"]["input_scale"], torch.tensor([1.04, 1.02, 1.0]))
    assert torch.equal(
        ckpt["heads"]["input_scale"], torch.ones(3)
    )  # the next task trains from unscaled heads
    # LoRA keeps training through the tasks: task 1 starts from task 0's LoRA, not a fresh one
    m0 = torch.load(root / "tasks" / "000" / "model.pt", weights_only=True)["backbone"]
    m1 = torch.load(root / "tasks" / "001" / "model.pt", weights_only=True)["backbone"]
    key = "blocks.0.attn.qkv.lora_B"
    assert m0[key].any() and not torch.equal(m0[key], m1[key])
