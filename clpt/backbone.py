"""Backbones: timm ViTs, the built-in micro ViT, weight loading and the feature.

The feature of docs/methods/slca.md is the class token after the final LayerNorm, which a
timm ViT built with `num_classes=0` and `global_pool='token'` returns from
`forward`. With `reset_final_norm` (the reference code's quirk, on by default)
the pre-trained final norm is replaced by a fresh `LayerNorm(d)` (weight 1,
bias 0, eps 1e-5) that trains with the backbone.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from clpt.config import BackboneConfig
from clpt.errors import ConfigError, DataError, MissingInputError, load_error_detail

# The built-in backbone is a timm model registered in a leaf module; importing it registers it.
from clpt.vit_micro import BUILTIN_NAME, BUILTIN_TAG, builtin_weights_path, cache_dir  # noqa: F401

log = logging.getLogger("clpt")


def _size_kw(image_size: int | None) -> dict:
    return {} if image_size is None else {"img_size": image_size}


def _architecture(name: str, image_size: int | None = None) -> VisionTransformer:
    try:
        model = timm.create_model(
            name, pretrained=False, num_classes=0, global_pool="token", **_size_kw(image_size)
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
    return model


def name_of(model: nn.Module) -> str:
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    return pcfg.get("architecture") or type(model).__name__


# Classifier and distillation-head weights a backbone checkpoint may carry and we drop.
_NOT_BACKBONE = ("head.", "head_dist.", "fc_norm.", "pre_logits.")


def load_weights_file(model: VisionTransformer, path: Path) -> dict:
    """Load a local checkpoint into `model`, checking that every backbone weight was loaded.

    Formats: `.npz` (Google AugReg / JAX, through timm's loader), `.safetensors`,
    and torch files (`.pth`, `.pt`, `.bin`, `.tar`): a plain state dict, or one
    under `state_dict` or `model` (MoCo v3 converted checkpoints), in timm or
    DeiT naming, with or without a `module.` prefix.
    """
    from timm.models import load_state_dict

    if not path.is_file():
        raise DataError(
            f"backbone.checkpoint {str(path)!r} does not exist",
            hint="point backbone.checkpoint at a weights file",
        )
    if path.suffix.lower() == ".npz":
        from timm.models.vision_transformer import _load_weights

        try:
            _load_weights(model, str(path))
        except (KeyError, ValueError, RuntimeError) as e:
            raise DataError(
                f"{path} does not fit {type(model).__name__}: {str(e).splitlines()[0][:200]}",
                hint="use the .npz that matches backbone.name",
            ) from None
        return {"format": "npz"}
    try:
        sd = load_state_dict(str(path), use_ema=False)
    except Exception as e:  # pickle, zip and safetensors errors all mean an unreadable file
        raise DataError(
            f"cannot read {path} as a checkpoint ({type(e).__name__})",
            hint="give a .safetensors, .pth/.pt state dict or an AugReg .npz",
        ) from None
    try:
        sd = {k: v for k, v in checkpoint_filter_fn(sd, model).items() if not k.startswith(_NOT_BACKBONE)}
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except (RuntimeError, ValueError, KeyError, AttributeError) as e:  # wrong shapes, foreign layouts
        raise DataError(
            f"{path} does not fit {name_of(model)}: {load_error_detail(e)[:200]}",
            hint="check that the checkpoint was made for backbone.name",
        ) from None
    missing = [k for k in missing if not k.startswith(_NOT_BACKBONE)]
    if missing:
        raise DataError(
            f"{path} lacks {len(missing)} of the backbone's weights (e.g. {', '.join(missing[:3])})",
            hint="check that the checkpoint was made for backbone.name",
        )
    if unexpected:
        log.warning(
            "%s: %d entries are not backbone weights and were ignored (e.g. %s)",
            path,
            len(unexpected),
            unexpected[0],
        )
    return {"format": path.suffix.lower().lstrip("."), "ignored": len(unexpected)}


@contextlib.contextmanager
def _local_cache_only_unless_reachable(timeout: float = 3.0):
    """Without a route to the hub, use the local cache only: one quick probe, not minutes of retries."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    reachable = constants.HF_HUB_OFFLINE is False
    if reachable:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
        except OSError:
            reachable = False
            log.info("%s is not reachable: looking for the weights in the local cache only", host)
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or not reachable
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _vit(model: nn.Module) -> VisionTransformer:
    """A timm model as the ViT it is (clpt's backbones are timm VisionTransformers)."""
    if not isinstance(model, VisionTransformer):
        raise ConfigError([f"backbone.name: {type(model).__name__} is not a timm VisionTransformer"])
    return model


def _from_hub(name: str, image_size: int | None = None) -> VisionTransformer:
    """timm's pre-trained weights: from the local Hugging Face cache, or downloaded when the network allows."""
    try:
        with _local_cache_only_unless_reachable():
            return _vit(
                timm.create_model(
                    name, pretrained=True, num_classes=0, global_pool="token", **_size_kw(image_size)
                )
            )
    except Exception as e:  # offline, missing in the cache, HTTP errors: no weights for us
        if isinstance(e, DataError | ConfigError):
            raise
        hub = (
            getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None) if timm.is_model(name) else None
        )
        where = f"the Hugging Face repo {hub} (model.safetensors)" if hub else "its weights file"
        raise DataError(
            f"pre-trained weights for {name} are not in the local cache and could not be downloaded ({type(e).__name__})",
            hint=f"download {where} where there is network and copy ~/.cache/huggingface here, "
            "or set backbone.checkpoint=/path/to/weights (.safetensors, .pth, .npz)",
        ) from None


def _is_builtin(name: str) -> bool:
    return name.split(".")[0] == BUILTIN_NAME


def _builtin_name(name: str) -> str:
    return f"{BUILTIN_NAME}.{BUILTIN_TAG}" if name == BUILTIN_NAME else name


def input_size(cfg: BackboneConfig, requested: int | None) -> int:
    """The model input size of a run: the backbone's own (timm's data config) unless `requested`.

    A requested size must be a multiple of the backbone's patch size; the
    backbone is then built for it and timm resamples the pre-trained position
    embeddings. Anything else is a ConfigError, raised when the run is created.
    """
    name = _builtin_name(cfg.name)
    with torch.device("meta"):  # the architecture only: no memory, no weights
        model = _architecture(name)
    native = int(timm.data.resolve_model_data_config(model)["input_size"][-1])
    if requested is None:
        return native
    patch = int(model.patch_embed.patch_size[0])
    if requested % patch or requested < patch:
        raise ConfigError(
            [
                f"benchmark.image_size: {requested} does not fit backbone {name} (patches of {patch} pixels): "
                f"use a multiple of {patch}, or leave it unset for the backbone's own size {native}"
            ]
        )
    return requested


def create_backbone(
    cfg: BackboneConfig, pretrained: bool | None = None, image_size: int | None = None
) -> VisionTransformer:
    """The backbone of `cfg`, with pre-trained weights unless `pretrained=False`.

    Order: architecture (for `image_size` input; None: the backbone's own), then
    weights (backbone.checkpoint, the built-in cache, or timm's hub), then
    (reset_final_norm) a fresh final LayerNorm. `pretrained=False` builds the
    bare architecture for loading a run's own checkpoint into it.
    """
    load = cfg.pretrained if pretrained is None else pretrained
    name = _builtin_name(cfg.name)
    if not load:
        model = _architecture(name, image_size)
    elif cfg.checkpoint is not None:
        model = _architecture(name, image_size)
        load_weights_file(model, Path(cfg.checkpoint).expanduser())
    elif _is_builtin(name):  # timm loads the cached file (clpt.vit_micro); pre-training is a step of its own
        path = builtin_weights_path()
        if not path.is_file():
            raise MissingInputError(
                f"the built-in backbone has no pre-trained weights at {path}",
                hint="run `clpt pretrain-builtin` (or `clpt run`, which pre-trains it first)",
            )
        _check_cached(path)
        try:
            model = _vit(
                timm.create_model(
                    name, pretrained=True, num_classes=0, global_pool="token", **_size_kw(image_size)
                )
            )
        except (RuntimeError, ValueError, EOFError) as e:
            raise DataError(
                f"cannot load the built-in backbone's weights {path} ({type(e).__name__})",
                hint="redo them with `clpt pretrain-builtin --force`",
            ) from None
    else:
        if "." not in name:
            resolved = timm.models.get_pretrained_cfg(name)
            tag = getattr(resolved, "tag", None) if resolved is not None else None
            log.warning(
                "backbone.name %r has no pretrained tag: timm resolves it to %s.%s, which may not be the "
                "weights a paper used (SLCA: vit_base_patch16_224.augreg_in21k)",
                name,
                name,
                tag,
            )
        model = _from_hub(name, image_size)
    if cfg.reset_final_norm:
        model.norm = nn.LayerNorm(model.embed_dim, eps=1e-5)
    return model


def _check_cached(path: Path) -> None:
    """The cached built-in weights are the bytes pre-training wrote (their SHA-256 beside them); a cache
    from before the digest gets one now."""
    from clpt.io import digest_path, file_sha256, write_text

    want_at, got = digest_path(path), file_sha256(path)
    try:
        want = want_at.read_text().strip()
    except FileNotFoundError:
        write_text(want_at, got + "\n")
        return
    if got != want:
        raise DataError(
            f"the built-in backbone's cached weights {str(path)!r} are damaged (their SHA-256 is not the one "
            "pre-training recorded)",
            hint="redo them with `clpt pretrain-builtin --force`",
        )


def weights_record(cfg: BackboneConfig, model: nn.Module) -> dict:
    """Which weights a run starts from: the resolved timm tag, their source and a digest."""
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    arch, tag = pcfg.get("architecture"), pcfg.get("tag")
    if not cfg.pretrained:
        source = "random initialisation"
    elif cfg.checkpoint:
        source = f"file {Path(cfg.checkpoint).expanduser().resolve()}"
    elif _is_builtin(cfg.name):
        source = f"file {builtin_weights_path()} (built-in pre-training)"
    else:
        source = f"timm hub {pcfg.get('hf_hub_id') or pcfg.get('url') or '?'}"
    return {
        "requested": cfg.name,
        "resolved": f"{arch}.{tag}" if tag else arch,
        "source": source,
        "sha256": weights_digest(model),
        "reset_final_norm": cfg.reset_final_norm,
    }


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over the module's state dict (names, shapes, bytes): which weights a run started from."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
