"""Backbone weights: local checkpoints in every supported format, timm's hub cache, offline errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from clpt.backbone import create_backbone, weights_record
from clpt.config import BackboneConfig
from clpt.errors import DataError

NAME = "clpt_vit_micro"


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    model = timm.create_model(NAME, num_classes=0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def to_augreg_npz(model, path):
    """Write a timm ViT in the Google AugReg .npz naming (the inverse of timm's _load_weights)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w[p + f"MultiHeadDotProductAttention_1/{n}/kernel"] = qkv_w[j * d : (j + 1) * d].T.reshape(
                d, heads, -1
            )
            w[p + f"MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * d : (j + 1) * d].reshape(heads, -1)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = (
            sd[b + "attn.proj.weight"].reshape(d, heads, -1).transpose(1, 2, 0)
        )
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def write(fmt: str, model, path):
    sd = model.state_dict()
    if fmt == "pth":
        torch.save(sd, path)
    elif fmt == "moco":  # MoCo v3 converted: weights under `model`, DDP prefix, with a classifier
        torch.save(
            {
                "model": {
                    **{f"module.{k}": v for k, v in sd.items()},
                    "module.head.weight": torch.zeros(5, 128),
                    "module.head.bias": torch.zeros(5),
                },
                "epoch": 300,
            },
            path,
        )
    elif fmt == "safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "npz":
        to_augreg_npz(model, path)


@pytest.mark.parametrize(
    "fmt,suffix", [("pth", ".pth"), ("moco", ".pth.tar"), ("safetensors", ".safetensors"), ("npz", ".npz")]
)
def test_checkpoint_formats_load_every_weight(tmp_path, source, fmt, suffix):
    path = tmp_path / f"w{suffix}"
    write(fmt, source, path)
    model = create_backbone(BackboneConfig(name=NAME, checkpoint=str(path), reset_final_norm=False))
    ref = source.state_dict()
    got = model.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)
    reset = create_backbone(BackboneConfig(name=NAME, checkpoint=str(path), reset_final_norm=True))
    assert torch.equal(reset.norm.weight, torch.ones(128)) and reset.norm.eps == 1e-5
    torch.testing.assert_close(reset.blocks[0].attn.qkv.weight, ref["blocks.0.attn.qkv.weight"])


def test_incomplete_or_foreign_checkpoints_are_rejected(tmp_path, source):
    sd = dict(source.state_dict())
    del sd["blocks.2.mlp.fc1.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(
        DataError, match=r"lacks 1 of the backbone's weights \(e.g. blocks.2.mlp.fc1.weight\)"
    ):
        create_backbone(BackboneConfig(name=NAME, checkpoint=str(tmp_path / "partial.pth")))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot read"):
        create_backbone(BackboneConfig(name=NAME, checkpoint=str(tmp_path / "junk.pth")))
    with pytest.raises(DataError, match="does not exist"):
        create_backbone(BackboneConfig(name=NAME, checkpoint=str(tmp_path / "nope.npz")))
    np.savez(tmp_path / "wrong.npz", **{"embedding/kernel": np.zeros((8, 8, 3, 128), np.float32)})
    with pytest.raises(DataError, match="does not fit"):
        create_backbone(BackboneConfig(name=NAME, checkpoint=str(tmp_path / "wrong.npz")))
    with pytest.raises(DataError, match="not a timm model"):
        create_backbone(BackboneConfig(name="vit_nonexistent_patch16", pretrained=False))


def test_hub_weights_come_from_the_local_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    name = "vit_tiny_patch16_224.augreg_in21k"
    torch.manual_seed(1)
    src = timm.create_model(name, pretrained=False, num_classes=0)
    snap = tmp_path / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    (snap / "snapshots" / "0123456789abcdef0123456789abcdef01234567").mkdir(parents=True)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in src.state_dict().items()},
        str(snap / "snapshots" / "0123456789abcdef0123456789abcdef01234567" / "model.safetensors"),
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = BackboneConfig(name=name, reset_final_norm=False)
    model = create_backbone(cfg)
    torch.testing.assert_close(model.blocks[3].mlp.fc2.weight, src.blocks[3].mlp.fc2.weight)
    rec = weights_record(cfg, model)
    assert rec["resolved"] == name and "timm/vit_tiny_patch16_224.augreg_in21k" in rec["source"]


def test_offline_without_weights_is_one_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as e:
        create_backbone(BackboneConfig(name="vit_tiny_patch16_224.augreg_in21k"))
    assert "not in the local cache" in e.value.message
    assert "timm/vit_tiny_patch16_224.augreg_in21k" in e.value.hint and "backbone.checkpoint" in e.value.hint


def test_untagged_names_are_resolved_and_warned_about(caplog, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(logging.getLogger("clpt"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="clpt"), pytest.raises(DataError):
        create_backbone(BackboneConfig(name="vit_base_patch16_224"))
    assert "vit_base_patch16_224.augreg2_in21k_ft_in1k" in caplog.text
    bare = create_backbone(BackboneConfig(name="vit_base_patch16_224", pretrained=False))
    rec = weights_record(BackboneConfig(name="vit_base_patch16_224", pretrained=False), bare)
    assert (
        rec["resolved"] == "vit_base_patch16_224.augreg2_in21k_ft_in1k"
        and rec["source"] == "random initialisation"
    )
