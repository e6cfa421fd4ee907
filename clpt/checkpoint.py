"""Model checkpoints: what a `model.pt` or `heads_aligned.pt` holds, and the modules rebuilt from it.

A model checkpoint carries what is needed to rebuild the model without the run's
code path: the timm backbone name, whether the final norm was reset, the feature
dimension, the task heads' sizes, both state dicts, and any learner state
(MIST's projection head and masks). `clpt.artifacts` stores and reads the files;
this module turns modules into payloads and payloads back into modules.

Errors name the stage that rebuilds the file (`Redo`); the stage wiring formats
its command.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clpt import artifacts
from clpt.backbone import create_backbone
from clpt.config import BackboneConfig, RunConfig
from clpt.errors import DataError, Redo, load_error_detail
from clpt.lora import apply_lora
from clpt.model import CLModel, Heads


def save_model(
    path: Path, backbone: torch.nn.Module, heads: Heads, backbone_cfg: BackboneConfig, task: int,
    extra: dict | None = None,
) -> None:  # fmt: skip
    """Backbone + heads after task `task` (and `extra`, e.g. the learner's state), format clpt-model."""
    artifacts.write_torch(path, "clpt-model", {
        "task": task,
        "backbone_name": backbone_cfg.name,
        "reset_final_norm": backbone_cfg.reset_final_norm,
        "dim": heads.dim,
        "head_sizes": heads.sizes,
        "backbone": backbone.state_dict(),
        "heads": heads.state_dict(),
        **(extra or {}),
    })  # fmt: skip


def save_heads(path: Path, heads: Heads, task: int) -> None:
    """The task heads alone (after alignment), format clpt-heads."""
    artifacts.write_torch(
        path,
        "clpt-heads",
        {"task": task, "dim": heads.dim, "head_sizes": heads.sizes, "heads": heads.state_dict()},
    )


def read_model(path: Path, redo: Redo) -> dict:
    """The payload of a model checkpoint (state dicts on the CPU)."""
    return artifacts.read_torch(path, "clpt-model", redo)


def _wrong_content(path: Path, e: Exception, redo: Redo) -> DataError:
    """A checkpoint that reads but does not fit: missing entries, wrong shapes, sizes that disagree."""
    return DataError(
        f"{path} does not fit this run ({type(e).__name__}: {load_error_detail(e)[:160]})", redo=redo
    )


def heads_from(obj: dict, path: Path, redo: Redo) -> Heads:
    """The task heads of a checkpoint payload."""
    try:
        heads = Heads(int(obj["dim"]), [int(s) for s in obj["head_sizes"]])
        heads.load_state_dict(obj["heads"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise _wrong_content(path, e, redo) from None
    return heads


def load_trained_heads(path: Path, redo: Redo) -> Heads:
    """The heads of a model checkpoint (as after the learner, before alignment)."""
    return heads_from(read_model(path, redo), path, redo)


def load_aligned_heads(path: Path, redo: Redo) -> Heads:
    return heads_from(artifacts.read_torch(path, "clpt-heads", redo), path, redo)


def load_model(path: Path, cfg: RunConfig, device: torch.device, redo: Redo) -> CLModel:
    """Backbone (with LoRA when configured) and heads of a model checkpoint, on `device`."""
    return model_from(read_model(path, redo), path, cfg, device, redo)


def model_from(ckpt: dict, path: Path, cfg: RunConfig, device: torch.device, redo: Redo) -> CLModel:
    """The model of a checkpoint payload (as `read_model` returns it), on `device`."""
    backbone = create_backbone(cfg.backbone, pretrained=False, image_size=cfg.benchmark.image_size)
    if cfg.lora.targets:  # the LoRA weights come from the checkpoint
        apply_lora(backbone, cfg.lora.targets, cfg.lora.rank, cfg.lora.scale, svd_init=False)
    try:
        backbone.load_state_dict(ckpt["backbone"], strict=True)
    except (KeyError, TypeError, RuntimeError) as e:
        raise _wrong_content(path, e, redo) from None
    return CLModel(backbone, heads_from(ckpt, path, redo)).to(device)
