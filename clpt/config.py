"""Typed run configuration: dataclasses, presets, file loading, overrides, validation.

Precedence, lowest first: dataclass defaults < benchmark preset < method preset
< config file (YAML or TOML) < command-line overrides (`section.key=value`).
Every problem (unknown key, wrong type, bad value) is collected and reported at
once in a `ConfigError`. The resolved configuration is saved in the run folder
(`config.yaml`) and every later stage reads it from there.
"""

from __future__ import annotations

import dataclasses
import enum
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clpt.errors import ConfigError


class Trainable(enum.StrEnum):
    all = "all"  # every backbone parameter
    peft = "peft"  # only names containing norm, bias, cls_token or lora (SLCA++)


class Schedule(enum.StrEnum):
    multistep = "multistep"  # MultiStepLR(milestones, gamma)
    cosine = "cosine"  # CosineAnnealingLR over the epochs, floor 1e-3 * gamma ** len(milestones)


class Loss(enum.StrEnum):
    ce = "ce"  # cross-entropy on the current task's logits
    sce = "sce"  # symmetric cross-entropy: a * CE + b * reverse CE (SLCA++)


@dataclass
class BenchmarkConfig:
    name: str = "builtin"  # builtin (no download) | cifar100 | imagenet-r | imagenet-a | cub200 | cars196 | imagefolder
    root: str | None = None  # dataset folder; unused by `builtin`
    init_classes: int = 10  # classes in the first task
    increment: int = 10  # classes in each later task (a remainder forms a last, smaller task)
    seed: int = 1993  # class order: np.random.seed(seed); np.random.permutation(n_classes)
    image_size: int | None = (
        None  # model input size; None -> the backbone's own (timm data config), recorded at creation
    )
    download: bool = True  # CIFAR-100: download when missing and the network allows
    split_seed: int = 0  # ImageNet-R, ImageNet-A: seed of the deterministic 80/20 per-class split
    normalization: str = "dataset"  # dataset (METHOD.md's table) | imagenet | none (pixels in [0, 1])
    train_crop_scale: list[float] | None = None  # RandomResizedCrop scale; None -> (0.08, 1)
    train_interpolation: str = "bicubic"  # RandomResizedCrop interpolation: bicubic | bilinear


@dataclass
class BackboneConfig:
    name: str = "vit_base_patch16_224.augreg_in21k"  # any timm ViT; `clpt_vit_micro` is the built-in one
    pretrained: bool = True  # load pre-trained weights (timm hub/cache, or `checkpoint`)
    checkpoint: str | None = None  # local weights file, used instead of the hub
    reset_final_norm: bool = True  # reference-code quirk: fresh LayerNorm(d) replaces the final norm


@dataclass
class TrainConfig:
    """Stage 1, the Slow Learner (METHOD.md)."""

    epochs: int = 20
    milestones: list[int] = field(default_factory=lambda: [18])  # MultiStepLR, gamma 0.1
    batch_size: int = 128
    lr: float = 0.01  # head learning rate
    backbone_lr_scale: float | None = None  # backbone LR = lr * scale; None -> method preset; 0 freezes
    momentum: float = 0.9
    weight_decay: float = 5e-4
    gamma: float = 0.1
    trainable: Trainable = Trainable.all  # all | peft (SLCA++: norm, bias, cls_token, lora)
    schedule: Schedule = Schedule.multistep  # multistep | cosine (SLCA++)
    loss: Loss = Loss.ce  # ce | sce (SLCA++)
    sce_alpha: float = 1.0  # SCE weight of CE (1.0 CIFAR/CUB, 0.5 ImageNet-R/Cars)
    sce_beta: float = 0.1  # SCE weight of reverse CE (0.1 CIFAR/CUB, 0.5 ImageNet-R/Cars)


@dataclass
class LoraConfig:
    """SLCA++'s LoRA: W + scale * B @ A on the target layers of every block."""

    targets: list[str] = field(
        default_factory=list
    )  # [] none; [qkv] published SLCA++; [qkv, mlp] fixed variant
    rank: int = 4
    scale: float = 0.8
    lr_first: float = 5e-3  # LoRA learning rate at task 0
    lr: float = 1e-3  # LoRA learning rate at later tasks


@dataclass
class StatsConfig:
    """Stage 2, class Gaussians."""

    ridge: float = 1e-4  # added to every covariance's diagonal
    chunk_rows: int = 65536  # feature rows per accumulation step (one kernel launch; 200 MB at d = 768)
    kernel_precision: str = "ieee"  # Triton (GPU) products: ieee (exact float32) | tf32 | tf32x3 (faster)


@dataclass
class AlignConfig:
    """Stage 3, Classifier Alignment on sampled features."""

    enabled: bool | None = None  # None -> method preset
    epochs: int = 5
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float | None = None  # None -> train.weight_decay
    samples_per_class: int = 256
    batch_size: int = 256
    tau: float = 0.1  # logit-normalisation temperature (0.05 for Cars-196)
    mean_shrink: bool = True  # SLCA: mu' = mu * (0.9 + 0.1 (t_c + 1) / (T + 1))
    sample_scale: bool = False  # SLCA++: samples of task t_c times 1 / (1 + s (T - t_c)), s ~ U(0.01, 0.03)
    head_scale: bool = False  # SLCA++: after alignment, old head t_c gets input scale 1 + 0.02 (T - t_c)
    task_of_class: str = "true"  # true | authors: class // size of the current task, as the authors' code
    # (differs only when the current task's size differs: Cars-196's last task of 16 classes)


@dataclass
class MistConfig:
    """MIST, the sparse-tuning learner (METHOD_HEADS.md 3); used by methods whose learner is `mist`."""

    epochs: int = 20  # per task, the first of which is the sensitivity pass
    batch_size: int = 56  # 56 with RanPAC, 32 with SimpleCIL (method presets)
    backbone_lr: float = 1e-4
    proj_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    tau: float = 0.07  # NT-Xent temperature
    proj_dim: int = 128
    select: float = 0.10  # top share of each eligible tensor selected (the paper's "< 5 %": 0.05)
    keep: float = (
        0.1  # per-step Bernoulli keep probability of selected entries (select x keep: share per step)
    )
    decay: float = 0.9  # gradient factor decay ** overlap
    frozen_quantile: float = 0.9995  # after a task: frozen |= S >= quantile(S, q); 1.0 = each tensor's max
    mask_update: bool = False  # true: unselected entries stay bit-identical (the paper's words)
    first_task_only: bool = False  # MIST on task 0 only (the paper's "before freeze-based methods")


@dataclass
class SystemConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 4  # data-loading worker processes (file datasets)
    extract_batch_size: int = 256
    feature_chunk_rows: int = 2048  # zarr chunk height of feature stores
    deterministic: bool = True  # torch deterministic algorithms (CPU runs repeat bit for bit)
    precision: str = "fp32"  # fp32 | bf16 | auto (bf16 on a GPU that supports it): forward passes only
    eval_every: int = (
        0  # test accuracy on the seen classes every N training epochs (logged; 0: never; authors: 5)
    )


# Heads evaluated by `clpt run` by default (README: "Classifier heads"). Every one is
# fitted from the run's cache in seconds on the built-in benchmark.
DEFAULT_HEADS = ["ca", "linear", "ncm", "lda", "fecam", "ranpac"]


@dataclass
class HeadsConfig:
    """Classifier heads fitted from the cache: which ones `clpt run` evaluates, and each one's settings."""

    enabled: list[str] = field(default_factory=lambda: list(DEFAULT_HEADS))
    settings: dict[str, Any] = field(default_factory=dict)  # head name -> its config dataclass

    def __post_init__(self) -> None:
        from clpt.heads import HEADS

        for name, spec in HEADS.items():
            self.settings.setdefault(name, spec.config_cls())

    def of(self, name: str) -> Any:
        return self.settings[name]


@dataclass
class RunConfig:
    method: str = "slca"  # a registered method (clpt.methods): slca | slca_pp | seqft | seqft_sl | frozen_ca
    seed: int = 1993  # training seed (weights init, shuffling, sampling)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    mist: MistConfig = field(default_factory=MistConfig)
    system: SystemConfig = field(default_factory=SystemConfig)

    @property
    def align_enabled(self) -> bool:
        return bool(self.align.enabled)

    @property
    def align_weight_decay(self) -> float:
        return self.train.weight_decay if self.align.weight_decay is None else self.align.weight_decay


# Published settings per benchmark (METHOD.md). The built-in one is sized for a CPU.
BENCHMARK_PRESETS: dict[str, dict[str, Any]] = {
    "builtin": {
        "benchmark": {"init_classes": 10, "increment": 10},
        "backbone": {"name": "clpt_vit_micro"},
        "train": {"epochs": 6, "milestones": [5], "batch_size": 64},
        "system": {"num_workers": 0},
        # d = 128: a 2048-wide random projection keeps the demo's RanPAC fits to about a second
        "heads": {"ranpac": {"dim": 2048}},
        "mist": {"epochs": 6},  # as train.epochs: sized for a 2-core CPU
    },
    "cifar100": {
        "benchmark": {"init_classes": 10, "increment": 10},
        "train": {"epochs": 20, "milestones": [18], "weight_decay": 5e-4},
    },
    "imagenet-r": {
        "benchmark": {"init_classes": 20, "increment": 20},
        "train": {"epochs": 50, "milestones": [40], "weight_decay": 5e-4},
        "heads": {"fecam": {"shrink1": 10.0, "shrink2": 10.0}},  # FeCAM's ImageNet-R setting
    },
    "imagenet-a": {  # PILOT / RanPAC / MIST: 10 tasks of 20
        "benchmark": {"init_classes": 20, "increment": 20},
        "train": {"epochs": 50, "milestones": [40], "weight_decay": 5e-4},
    },
    "cub200": {
        "benchmark": {"init_classes": 20, "increment": 20},
        "train": {"epochs": 50, "milestones": [40], "weight_decay": 5e-4},
    },
    "cars196": {
        "benchmark": {"init_classes": 20, "increment": 20},
        "train": {"epochs": 50, "milestones": [40], "weight_decay": 5e-4},
        "align": {"tau": 0.05},
    },
    "imagefolder": {},
}

SECTIONS = ("benchmark", "backbone", "train", "lora", "stats", "align", "heads", "mist", "system")


# ---------------------------------------------------------------------------
# Merging raw dictionaries
# ---------------------------------------------------------------------------


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=0.001` -> (["train", "lr"], 0.001). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError([f"override {text!r} is not of the form section.key=value"], source="overrides")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError([f"override {text!r} has an empty key"], source="overrides")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def overrides_to_dict(overrides: list[str]) -> dict:
    out: dict = {}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override {text!r} conflicts with another override"], source="overrides")
        node[path[-1]] = value
    return out


def load_file(path: str | Path) -> dict:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config file into a dictionary."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file {str(p)!r} does not exist"], source=str(p))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"not UTF-8 text (byte {e.start}): save it as UTF-8"], source=str(p)) from None
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(
                [f"unknown config format {p.suffix!r}: use .yaml, .yml or .toml"], source=str(p)
            )
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError([f"cannot parse: {first}"], source=str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError(["top level must be a mapping of sections"], source=str(p))
    return data


# ---------------------------------------------------------------------------
# Typed construction with all problems collected
# ---------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if value is None:
            problems.append(f"{where}: must not be empty")
            return None
        return _coerce(value, inner[0], where, problems)
    if origin is list:
        if not isinstance(value, list | tuple):
            problems.append(f"{where}: expected a list, got {value!r}")
            return []
        return [_coerce(v, args[0], f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value.value if isinstance(value, enum.Enum) else value)
        except ValueError:
            choices = ", ".join(m.value for m in tp)
            problems.append(f"{where}: {value!r} is not one of: {choices}")
            return None
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{where}: expected true or false, got {value!r}")
        return None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{where}: expected an integer, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{where}: expected a number, got {value!r}")
        return None
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{where}: expected a string, got {value!r}")
        return None
    problems.append(f"{where}: unsupported type {_type_name(tp)}")
    return None


def _build_heads(raw: Any, problems: list[str]) -> HeadsConfig:
    """`heads: {enabled: [...], <head>: {...}}`: each head's settings are its registered dataclass."""
    from clpt.heads import HEADS

    heads = HeadsConfig()
    if not isinstance(raw, dict):
        problems.append(f"heads: expected a mapping, got {raw!r}")
        return heads
    for key, value in raw.items():
        if key == "enabled":
            heads.enabled = _coerce(value, list[str], "heads.enabled", problems) or []
            bad = [h for h in heads.enabled if h not in HEADS]
            if bad:
                problems.append(f"heads.enabled: {bad} not among: {', '.join(HEADS.names())}")
        elif key in HEADS:
            heads.settings[key] = _build_section(HEADS.get(key).config_cls, value, f"heads.{key}", problems)
        else:
            problems.append(f"heads.{key}: unknown key (valid: enabled, {', '.join(HEADS.names())})")
    return heads


def _build_section(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    if cls is HeadsConfig:
        return _build_heads(raw, problems)
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            problems.append(f"{where}.{key}: unknown key (valid: {', '.join(sorted(names))})")
    obj = cls()
    for f in dataclasses.fields(cls):
        if f.name in raw:
            setattr(obj, f.name, _coerce(raw[f.name], hints[f.name], f"{where}.{f.name}", problems))
    return obj


def _validate(cfg: RunConfig, problems: list[str]) -> None:
    def check(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    from clpt.methods import METHODS, REQUIRED_KEYS

    b, t, a, s = cfg.benchmark, cfg.train, cfg.align, cfg.stats
    if isinstance(cfg.method, str):
        if cfg.method not in METHODS:
            problems.append(f"method: {cfg.method!r} is not one of: {', '.join(METHODS.names())}")
        else:
            for key in REQUIRED_KEYS:
                section, name = key.split(".")
                check(
                    getattr(getattr(cfg, section), name) is not None,
                    f"{key}: method {cfg.method!r} leaves it unset; its registration must set it "
                    f"(or give {key} in the config)",
                )
    for name, settings in cfg.heads.settings.items():
        validate = getattr(settings, "problems", None)
        if validate is not None:
            problems.extend(f"heads.{name}.{p}" for p in validate())
    check(
        b.name in BENCHMARK_PRESETS,
        f"benchmark.name: {b.name!r} is not one of: {', '.join(BENCHMARK_PRESETS)}",
    )
    if b.name not in ("builtin",):
        check(b.root is not None, f"benchmark.root: required for benchmark {b.name!r} (the dataset folder)")
    if isinstance(b.init_classes, int):
        check(b.init_classes >= 1, "benchmark.init_classes: must be >= 1")
    if isinstance(b.image_size, int):
        check(b.image_size >= 8, "benchmark.image_size: must be >= 8")
    if isinstance(b.increment, int):
        check(b.increment >= 1, "benchmark.increment: must be >= 1")
    if isinstance(t.epochs, int):
        check(t.epochs >= 1, "train.epochs: must be >= 1")
        if isinstance(t.milestones, list) and all(isinstance(m, int) for m in t.milestones):
            check(
                all(0 < m <= t.epochs for m in t.milestones) and t.milestones == sorted(t.milestones),
                f"train.milestones: {t.milestones} must be increasing epochs in 1..{t.epochs}",
            )
    for name, val in (("train.lr", t.lr), ("align.lr", a.lr)):
        if isinstance(val, float):
            check(val > 0, f"{name}: must be > 0")
    if isinstance(t.backbone_lr_scale, float):
        check(t.backbone_lr_scale >= 0, "train.backbone_lr_scale: must be >= 0 (0 freezes the backbone)")
    for name, val in (("train.momentum", t.momentum), ("align.momentum", a.momentum)):
        if isinstance(val, float):
            check(0 <= val < 1, f"{name}: must be in [0, 1)")
    if isinstance(t.weight_decay, float):
        check(t.weight_decay >= 0, "train.weight_decay: must be >= 0")
    for name, val in (
        ("train.batch_size", t.batch_size),
        ("align.epochs", a.epochs),
        ("align.samples_per_class", a.samples_per_class),
        ("align.batch_size", a.batch_size),
        ("stats.chunk_rows", s.chunk_rows),
        ("system.extract_batch_size", cfg.system.extract_batch_size),
        ("system.feature_chunk_rows", cfg.system.feature_chunk_rows),
    ):
        if isinstance(val, int):
            check(val >= 1, f"{name}: must be >= 1")
    if isinstance(cfg.system.eval_every, int):
        check(cfg.system.eval_every >= 0, "system.eval_every: must be >= 0 (0: never)")
    if isinstance(cfg.system.num_workers, int):
        check(cfg.system.num_workers >= 0, "system.num_workers: must be >= 0")
    if isinstance(a.task_of_class, str):
        check(a.task_of_class in ("true", "authors"),
              f"align.task_of_class: {a.task_of_class!r} is not one of true, authors")  # fmt: skip
    if isinstance(a.tau, float):
        check(a.tau > 0, "align.tau: must be > 0")
    lo = cfg.lora
    if isinstance(lo.targets, list):
        bad = [x for x in lo.targets if x not in ("qkv", "mlp")]
        check(not bad, f"lora.targets: {bad} not among: qkv, mlp")
    if isinstance(lo.rank, int):
        check(lo.rank >= 1, "lora.rank: must be >= 1")
    for name, val in (("lora.lr_first", lo.lr_first), ("lora.lr", lo.lr)):
        if isinstance(val, float):
            check(val > 0, f"{name}: must be > 0")
    m = cfg.mist
    for name, val in (
        ("mist.select", m.select),
        ("mist.keep", m.keep),
        ("mist.frozen_quantile", m.frozen_quantile),
    ):
        if isinstance(val, float):
            check(0 < val <= 1, f"{name}: must be in (0, 1]")
    for name, val in (
        ("mist.epochs", m.epochs),
        ("mist.batch_size", m.batch_size),
        ("mist.proj_dim", m.proj_dim),
    ):
        if isinstance(val, int):
            check(
                val >= (2 if name == "mist.epochs" else 1),
                f"{name}: must be >= {2 if name == 'mist.epochs' else 1}",
            )
    if isinstance(b.normalization, str):
        check(b.normalization in ("dataset", "imagenet", "none"),
              f"benchmark.normalization: {b.normalization!r} is not one of dataset, imagenet, none")  # fmt: skip
    if isinstance(b.train_interpolation, str):
        check(b.train_interpolation in ("bicubic", "bilinear"),
              f"benchmark.train_interpolation: {b.train_interpolation!r} is not one of bicubic, bilinear")  # fmt: skip
    if isinstance(b.train_crop_scale, list) and all(isinstance(v, float) for v in b.train_crop_scale):
        check(len(b.train_crop_scale) == 2 and 0 < b.train_crop_scale[0] <= b.train_crop_scale[1] <= 1,
              "benchmark.train_crop_scale: must be [low, high] with 0 < low <= high <= 1")  # fmt: skip
    if isinstance(s.kernel_precision, str):
        check(s.kernel_precision in ("ieee", "tf32", "tf32x3"),
              f"stats.kernel_precision: {s.kernel_precision!r} is not one of ieee, tf32, tf32x3")  # fmt: skip
    if isinstance(cfg.system.precision, str):
        check(cfg.system.precision in ("fp32", "bf16", "auto"),
              f"system.precision: {cfg.system.precision!r} is not one of fp32, bf16, auto")  # fmt: skip
    if isinstance(s.ridge, float):
        check(s.ridge >= 0, "stats.ridge: must be >= 0")
    dev = cfg.system.device
    if isinstance(dev, str):
        check(
            dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:"),
            f"system.device: {dev!r} is not one of auto, cpu, cuda, cuda:N",
        )


def build_config(raw: dict, source: str = "config") -> RunConfig:
    """Typed, validated RunConfig from a raw (already merged) dictionary."""
    problems: list[str] = []
    cfg = RunConfig()
    hints = typing.get_type_hints(RunConfig)
    valid = {f.name for f in dataclasses.fields(RunConfig)}
    for key in raw:
        if key not in valid:
            problems.append(f"{key}: unknown key (valid: {', '.join(sorted(valid))})")
    for f in dataclasses.fields(RunConfig):
        if f.name not in raw:
            continue
        if f.name in SECTIONS:
            setattr(cfg, f.name, _build_section(hints[f.name], raw[f.name], f.name, problems))
        else:
            setattr(cfg, f.name, _coerce(raw[f.name], hints[f.name], f.name, problems))
    _validate(cfg, problems)  # value checks skip fields whose type was already wrong
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def resolve(file: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults < benchmark preset < method preset < file < overrides, validated."""
    user: dict = {}
    source = "config"
    if file is not None:
        user = load_file(file)
        source = str(file)
    user = deep_merge(user, overrides_to_dict(overrides or []))
    section = user.get("benchmark")
    bench = section.get("name", BenchmarkConfig.name) if isinstance(section, dict) else BenchmarkConfig.name
    from clpt.methods import METHODS

    method = user.get("method", RunConfig.method)
    base: dict = {}
    if isinstance(bench, str) and bench in BENCHMARK_PRESETS:
        base = deep_merge(base, BENCHMARK_PRESETS[bench])
    if isinstance(method, str) and method in METHODS:
        spec = METHODS.get(method)
        base = deep_merge(base, spec.preset)
        base = deep_merge(base, spec.benchmark_presets.get(bench, {}))
    return build_config(deep_merge(base, user), source=source)


def to_dict(cfg: RunConfig) -> dict:
    def conv(v: Any) -> Any:
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, HeadsConfig):
            return {"enabled": list(v.enabled), **{k: conv(x) for k, x in v.settings.items()}}
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: a config dictionary by dotted key."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def load_resolved(path: str | Path) -> RunConfig:
    """Read a saved, resolved config (as written by `dump_yaml`) back, validated.

    Read with the same precedence as a new run's config: every key the file has
    wins, so a fully resolved file reads back unchanged, and a key it lacks (added
    by a newer clpt) takes its benchmark's and method's preset, not the bare default.
    """
    return resolve(path)
