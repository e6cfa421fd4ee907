"""Methods and learners, registered by name (timm style).

A method is a learner (how the backbone and the task heads are trained on each
task) plus the settings that make it the published method: config presets, and
presets that depend on the benchmark. Adding a method is one `register_method`
call; an unknown `method:` is a config error listing the registered names. A
method whose settings leave a required key unset is rejected when the config is
built (it would otherwise, say, train a frozen backbone with no alignment).

This module is pure data (no torch): the config imports it to validate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clpt.learners import LEARNERS
from clpt.registry import Registry

# Keys whose None default means "the method decides": every method must set them.
REQUIRED_KEYS = ("train.backbone_lr_scale", "align.enabled")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    learner: str = "slow_learner"  # a registered learner (clpt.learners)
    # the method's own classifier: None -> the (aligned) task heads; else a head name (clpt.heads),
    # NAME+drift for the head on compensated statistics (NAME in a run without a drift method)
    classifier: str | None = None
    preset: dict[str, Any] = field(default_factory=dict)  # config sections it sets
    benchmark_presets: dict[str, dict[str, Any]] = field(default_factory=dict)  # benchmark name -> sections


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(spec: MethodSpec) -> MethodSpec:
    LEARNERS.get(spec.learner)  # an unknown learner is an error at registration, listing the valid ones
    return METHODS.register(spec.name, spec)


_SLCA_ALIGN = {"mean_shrink": True, "sample_scale": False, "head_scale": False}
_FULL_FT = {"trainable": "all", "schedule": "multistep", "loss": "ce"}

register_method(
    MethodSpec(
        "slca",
        "slow learner (backbone LR x 0.01) + classifier alignment",
        preset={"train": {"backbone_lr_scale": 0.01, **_FULL_FT}, "align": {"enabled": True, **_SLCA_ALIGN}},
    )
)
register_method(
    MethodSpec(
        "seqft",
        "sequential fine-tuning, backbone at the head's LR, no alignment",
        preset={"train": {"backbone_lr_scale": 1.0, **_FULL_FT}, "align": {"enabled": False, **_SLCA_ALIGN}},
    )
)
register_method(
    MethodSpec(
        "seqft_sl",
        "slow learner without alignment",
        preset={"train": {"backbone_lr_scale": 0.01, **_FULL_FT}, "align": {"enabled": False, **_SLCA_ALIGN}},
    )
)
register_method(
    MethodSpec(
        "frozen_ca",
        "frozen backbone (LR scale 0) + classifier alignment",
        preset={"train": {"backbone_lr_scale": 0.0, **_FULL_FT}, "align": {"enabled": True, **_SLCA_ALIGN}},
    )
)
_PP_SMALL = {"train": {"weight_decay": 5e-4, "sce_alpha": 1.0, "sce_beta": 0.1}}  # CIFAR-100, CUB-200
_PP_LARGE = {"train": {"weight_decay": 0.0, "sce_alpha": 0.5, "sce_beta": 0.5}}  # ImageNet-R, Cars-196
register_method(
    MethodSpec(
        "slca_pp",
        "SLCA++: LoRA hybrid slow learner, symmetric CE, feature-scaled alignment",
        # non-LoRA trainable backbone parameters at 1e-3 = 1e-2 x 0.1; LoRA on attn.qkv
        preset={
            "train": {"backbone_lr_scale": 0.1, "trainable": "peft", "schedule": "cosine", "loss": "sce"},
            "lora": {"targets": ["qkv"]},
            "align": {"enabled": True, "mean_shrink": False, "sample_scale": True, "head_scale": True},
        },
        benchmark_presets={
            "cifar100": _PP_SMALL,
            "cub200": _PP_SMALL,
            "imagenet-r": _PP_LARGE,
            "cars196": _PP_LARGE,
        },
    )
)

# --- MIST and the statistics-head baselines (docs/methods/heads.md) ----------------------------
# Their protocol: the pre-trained final norm is kept, no input mean/std for CIFAR-100, ImageNet-R,
# ImageNet-A and CUB (ImageNet mean/std and SLCA's transforms for Cars), RandomResizedCrop scale
# (0.05, 1) bilinear for training. No alignment; the classifier is the statistics head.
_PROTOCOL = {
    "backbone": {"reset_final_norm": False},
    "benchmark": {
        "normalization": "none",
        "train_crop_scale": [0.05, 1.0],
        "train_interpolation": "bilinear",
    },
    "train": {"backbone_lr_scale": 0.0},
    "align": {"enabled": False},
    # their task heads are never trained: `linear` would score chance, so it is left out
    "heads": {"enabled": ["ca", "ncm", "lda", "fecam", "ranpac"]},
}
_CARS = {
    "benchmark": {"normalization": "imagenet", "train_crop_scale": None, "train_interpolation": "bicubic"}
}
# MIST's code uses ImageNet mean/std and SLCA's transforms on Cars; RanPAC's (the rows SimpleCIL and
# ranpac_frozen are compared with) uses no normalisation there either, with the same transforms
_NO_NORM: dict[str, dict[str, Any]] = {
    "builtin": {"benchmark": {"normalization": "dataset"}},
    "cars196": _CARS,
}


def _merge(*dicts: dict) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_RANPAC_ROWS: dict[str, dict[str, Any]] = {  # RanPAC's Cars: no normalisation, 16 classes first (cars_publish.csv);
    # its CIFAR test transform is Resize(224) + CenterCrop(224): the whole upsampled image
    **_NO_NORM, "cars196": _merge(_CARS, {"benchmark": {"normalization": "none", "init_classes": 16}}),
    "cifar100": _merge(_NO_NORM.get("cifar100", {}), {"benchmark": {"test_resize": "full"}}),
}


register_method(
    MethodSpec("simplecil", "SimpleCIL: frozen backbone, cosine class means", learner="none", classifier="ncm",
               preset=_PROTOCOL, benchmark_presets=_RANPAC_ROWS)
)  # fmt: skip
register_method(
    MethodSpec("ranpac_frozen", "RanPAC's head on the frozen PTM ('No Phase 1')", learner="none",
               classifier="ranpac", preset=_PROTOCOL, benchmark_presets=_RANPAC_ROWS)
)  # fmt: skip
register_method(
    MethodSpec("simplecil_mist", "MIST sparse tuning every task + SimpleCIL class means", learner="mist",
               classifier="ncm", preset=_merge(_PROTOCOL, {"mist": {"batch_size": 32, "frozen_quantile": 1.0}}),
               benchmark_presets=_NO_NORM)
)  # fmt: skip
register_method(
    MethodSpec("ranpac_mist", "MIST sparse tuning every task + RanPAC's ridge head", learner="mist",
               classifier="ranpac", preset=_merge(_PROTOCOL, {"mist": {"batch_size": 56, "frozen_quantile": 0.9995}}),
               benchmark_presets=_NO_NORM)
)  # fmt: skip

# --- SLDC (docs/methods/drift.md, SLDC's recipe): LoRA-only sequential fine-tuning, drift-compensated
# statistics, and its own classifier refinement, all as options of the pieces above. The alpha
# variants are `sldc` (drift.method weak_nonlinear, its default; linear with --set drift.method=linear),
# the beta variants `sldc_kd` (feature distillation to the previous backbone).
_SLDC = {
    "train": {
        "backbone_lr_scale": 0.0,  # only LoRA trains (`only_lora`); the fresh final LayerNorm stays frozen
        "optimizer": "adamw",
        "lr": 1e-3,  # the head: lr 1e-4 x head_scale 10
        "weight_decay": 3e-5,
        "schedule": "cosine",
        "cosine_floor": 1 / 3,  # cosine down to lr / 3
        "milestones": [],
        "batch_size": 16,
        "loss": "sce",
        "sce_alpha": 0.5,
        "sce_beta": 0.5,  # commit fe0f492; 97c076f: loss ce, label_smoothing 0.1
        "trainable": "all",
    },
    "lora": {"targets": ["qkv", "mlp"], "rank": 4, "scale": 0.8, "lr_first": 1e-4, "lr": 1e-4},
    "align": {
        "enabled": True,
        "optimizer": "adam",
        "loss": "sce",
        "sce_alpha": 0.5,
        "sce_beta": 0.5,
        "lr": 5e-4,
        "lr_min": 5e-5,
        "weight_decay": 1e-4,
        "epochs": 6,
        "samples_per_class": 1024,
        "batch_per_class": 3.2,  # floor(32 * classes / 10)
        "resample": False,  # drawn once per refinement
        "first_task": True,
        "mean_shrink": False,
        "sample_scale": False,
        "head_scale": False,
    },
    "drift": {"method": "weak_nonlinear"},
}
# --smart_defaults: backbone epochs per task (splits are the readers' presets: 10 x 10, then 10 x 20)
_SLDC_BENCH = {
    "cifar100": {"train": {"epochs": 5}},
    "imagenet-r": {"train": {"epochs": 10}},
    "cub200": {"train": {"epochs": 15}},
    "cars196": {"train": {"epochs": 15}},
}
_SLDC_KD = {"train": {"kd_feat": 1.0, "kd_norm": 0.1, "kd_first_task": False}}  # fe0f492: t > 0 only
register_method(
    MethodSpec("sldc", "SLDC (alpha): LoRA-only sequential fine-tuning, compensated statistics, SCE refinement",
               classifier="ca+drift", preset=_SLDC, benchmark_presets=_SLDC_BENCH)
)  # fmt: skip
register_method(
    MethodSpec("sldc_kd", "SLDC (beta): sldc plus feature distillation to the previous backbone",
               classifier="ca+drift", preset=_merge(_SLDC, _SLDC_KD), benchmark_presets=_SLDC_BENCH)
)  # fmt: skip
