"""The built-in backbone `clpt_vit_micro`, registered with timm (a leaf module: timm and torch only).

Importing this module registers `clpt_vit_micro` (tag `builtin`) with timm. Its
pre-trained weights are a local file in clpt's cache, which timm loads itself:

    import timm, clpt.vit_micro
    model = timm.create_model("clpt_vit_micro", pretrained=True)   # reads the cached weights

The file is made once by an explicit pre-training step (`clpt pretrain-builtin`,
or `clpt run` / `clpt train-task` on the built-in benchmark, which run that step
first on rank 0 while other ranks wait). `pretrained=True` without the file is a
`FileNotFoundError` that names the command.
"""

from __future__ import annotations

import os
from pathlib import Path

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

BUILTIN_NAME = "clpt_vit_micro"
BUILTIN_TAG = "builtin"

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


def cache_dir() -> Path:
    """Where clpt keeps the built-in backbone's weights (`CLPT_CACHE_DIR` overrides)."""
    root = os.environ.get("CLPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "clpt"
    )
    return Path(root)


def builtin_weights_path() -> Path:
    return cache_dir() / f"{BUILTIN_NAME}.{BUILTIN_TAG}.pth"


@register_model
def clpt_vit_micro(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT with 32x32 input, 8x8 patches, width 128, depth 4, 4 heads (0.8M parameters)."""
    args = dict(img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=4)
    if pretrained and kwargs.get("pretrained_cfg_overlay") is None:
        path = builtin_weights_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"no pre-trained weights for {BUILTIN_NAME} at {path}: run `clpt pretrain-builtin` first"
            )
        kwargs["pretrained_cfg_overlay"] = dict(file=str(path))
    return build_model_with_cfg(
        VisionTransformer,
        BUILTIN_NAME,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **dict(args, **kwargs),
    )
