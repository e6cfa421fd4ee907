"""Backbones: timm ViTs, the built-in micro ViT, weight loading and the feature.

The feature of METHOD.md is the class token after the final LayerNorm, which a
timm ViT built with `num_classes=0` and `global_pool='token'` returns from
`forward`. With `reset_final_norm` (the reference code's quirk, on by default)
the pre-trained final norm is replaced by a fresh `LayerNorm(d)` (weight 1,
bias 0, eps 1e-5) that trains with the backbone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from clpt.config import BackboneConfig
from clpt.errors import DataError

BUILTIN_NAME = "clpt_vit_micro"
BUILTIN_TAG = "builtin"

# The built-in backbone is an ordinary timm model: registered here, created with
# `timm.create_model`, its pre-trained weights loaded by timm from a local file.
default_cfgs = generate_default_cfgs(
    {
        f"{BUILTIN_NAME}.{BUILTIN_TAG}": {
            "num_classes": 0,
            "input_size": (3, 32, 32),
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        }
    }
)


@register_model
def clpt_vit_micro(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT with 32x32 input, 8x8 patches, width 128, depth 4, 4 heads (0.8M parameters)."""
    args = dict(img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=4)
    return build_model_with_cfg(
        VisionTransformer,
        BUILTIN_NAME,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **dict(args, **kwargs),
    )


def cache_dir() -> Path:
    """Where clpt keeps the built-in backbone's weights (`CLPT_CACHE_DIR` overrides)."""
    root = os.environ.get("CLPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "clpt"
    )
    return Path(root)


def builtin_weights_path() -> Path:
    return cache_dir() / f"{BUILTIN_NAME}.{BUILTIN_TAG}.pth"


def _architecture(name: str, reset_final_norm: bool, pretrained: bool, file: str | None) -> nn.Module:
    overlay = {"file": file} if file else None
    try:
        model = timm.create_model(
            name, pretrained=pretrained, num_classes=0, global_pool="token", pretrained_cfg_overlay=overlay
        )
    except RuntimeError as e:  # timm raises RuntimeError for unknown names
        if "Unknown model" in str(e):
            raise DataError(
                f"backbone.name {name!r} is not a timm model",
                hint="pick a name from `timm.list_models('vit_*')`, e.g. vit_base_patch16_224.augreg_in21k",
            ) from None
        raise
    if not isinstance(model, VisionTransformer):
        raise DataError(f"backbone.name {name!r} is not a ViT", hint="use a timm VisionTransformer")
    if reset_final_norm:
        model.norm = nn.LayerNorm(model.embed_dim, eps=1e-5)
    return model


def create_backbone(cfg: BackboneConfig, pretrained: bool | None = None) -> nn.Module:
    """The backbone of `cfg`, with pre-trained weights unless `pretrained=False`.

    `pretrained=False` builds the bare architecture, for loading a run's own
    checkpoint into it.
    """
    load = cfg.pretrained if pretrained is None else pretrained
    file = cfg.checkpoint
    if load and file is None and cfg.name.split(".")[0] == BUILTIN_NAME:
        from clpt.pretrain import ensure_builtin_weights

        file = str(ensure_builtin_weights())
    if load and file is not None and not Path(file).is_file():
        raise DataError(
            f"backbone.checkpoint {file!r} does not exist", hint="point backbone.checkpoint at a weights file"
        )
    name = cfg.name
    if name.split(".")[0] == BUILTIN_NAME and "." not in name:
        name = f"{BUILTIN_NAME}.{BUILTIN_TAG}"
    return _architecture(name, cfg.reset_final_norm, load, file)


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over the module's state dict (names, shapes, bytes): which weights a run started from."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
