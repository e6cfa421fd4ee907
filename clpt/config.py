"""Typed run configuration: the dataclasses, their value checks, file loading, overrides.

Each section is a dataclass with commented defaults and a `problems()` method
that checks its own values; the sections know nothing of the registries
(methods, heads, benchmark readers), and importing this module imports no
torch. Composition with the registries (presets, each head's settings, the
checks that need a registry) is `clpt.stages.resolve`: precedence, lowest
first, dataclass defaults < benchmark preset < method preset < config file
(YAML or TOML) < command-line overrides (`section.key=value`). Every problem
(unknown key, wrong type, bad value) is collected and reported at once in a
`ConfigError`. The resolved configuration is saved in the run folder
(`config.yaml`) and every later stage reads it from there.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import tomllib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clpt.errors import ConfigError

# --- value checks, shared by the sections' problems() ------------------------------------------


def checks(obj: Any, rules: Iterable[tuple[str, Callable[[Any], bool], Any]]) -> list[str]:
    """`key: message` for every (key, test, message) whose test fails on a value of the right type
    (`message` a string, or a function of the value).

    A value whose type was already wrong (None after coercion) is skipped: its
    type problem is reported once, by the parser.
    """
    out = []
    for key, test, message in rules:
        value = getattr(obj, key)
        if value is not None and not test(value):
            out.append(f"{key}: {message(value) if callable(message) else message}")
    return out


def one_of(*choices: str) -> tuple[Callable[[Any], bool], Callable[[Any], str]]:
    """A rule for `checks`: the value is one of `choices`; the message names the value given."""
    return (lambda v: v in choices), (lambda v: f"{v!r} is not one of {', '.join(choices)}")


SEED_RANGE = "must be in [0, 2**32 - 1] (NumPy's seed range)"


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
    name: str = "builtin"  # builtin (no download) | cifar100 | imagenet-r | imagenet-a | cub200 | cars196 | imagefolder | stream (grown by clpt add-task)
    root: str | None = None  # dataset folder; unused by `builtin`
    init_classes: int = 10  # classes in the first task
    increment: int = 10  # classes in each later task (a remainder forms a last, smaller task)
    seed: int = 1993  # class order: np.random.seed(seed); np.random.permutation(n_classes)
    image_size: int | None = (
        None  # model input size; None -> the backbone's own (timm data config), recorded at creation
    )
    download: bool = True  # CIFAR-100: download when missing and the network allows
    split_seed: int = 0  # ImageNet-R, ImageNet-A: seed of the deterministic 80/20 per-class split
    normalization: str = (
        "dataset"  # dataset (docs/methods/slca.md's table) | imagenet | none (pixels in [0, 1])
    )
    train_crop_scale: list[float] | None = None  # RandomResizedCrop scale; None -> (0.08, 1)
    train_interpolation: str = "bicubic"  # RandomResizedCrop interpolation: bicubic | bilinear
    max_image_pixels: int = 178_956_970  # an image with more pixels is refused at creation (PIL's bomb limit)
    test_resize: str = "crop"  # test transform: crop: Resize(size * 256/224) + CenterCrop(size) | full: Resize(size) + CenterCrop(size) (RanPAC's CIFAR)

    def problems(self) -> list[str]:
        out = checks(self, [
            ("init_classes", lambda v: v >= 1, "must be >= 1"),
            ("max_image_pixels", lambda v: v >= 1, "must be >= 1"),
            ("increment", lambda v: v >= 1, "must be >= 1"),
            ("image_size", lambda v: v >= 8, "must be >= 8"),
            ("normalization", *one_of("dataset", "imagenet", "none")),
            ("train_interpolation", *one_of("bicubic", "bilinear")),
            ("test_resize", *one_of("crop", "full")),
            ("seed", lambda v: 0 <= v < 2**32, SEED_RANGE),
            ("split_seed", lambda v: 0 <= v < 2**32, SEED_RANGE),
        ])  # fmt: skip
        if self.name != "builtin" and self.name is not None and self.root is None:
            out.append(f"root: required for benchmark {self.name!r} (the dataset folder)")
        crop = self.train_crop_scale
        if isinstance(crop, list) and all(isinstance(v, float) for v in crop):
            if not (len(crop) == 2 and 0 < crop[0] <= crop[1] <= 1):
                out.append("train_crop_scale: must be [low, high] with 0 < low <= high <= 1")
        return out


@dataclass
class BackboneConfig:
    name: str = "vit_base_patch16_224.augreg_in21k"  # any timm ViT; `clpt_vit_micro` is the built-in one
    pretrained: bool = True  # load pre-trained weights (timm hub/cache, or `checkpoint`)
    checkpoint: str | None = None  # local weights file, used instead of the hub
    reset_final_norm: bool = True  # reference-code quirk: fresh LayerNorm(d) replaces the final norm

    def problems(self) -> list[str]:
        return []  # the name is checked against timm when the run is created (clpt.backbone)


@dataclass
class TrainConfig:
    """Stage 1, the Slow Learner (docs/methods/slca.md)."""

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
    label_smoothing: float = 0.0  # loss ce: label smoothing (SLDC 97c076f: 0.1)
    optimizer: str = "sgd"  # sgd (SLCA, with momentum) | adamw (SLDC; momentum unused)
    cosine_floor: float | None = None  # schedule cosine: floor as a share of each group's LR (SLDC: 1/3);
    # None -> the SLCA++ reference code's absolute floor 1e-3 * gamma ** len(milestones)
    # feature distillation to the previous backbone (SLDC's beta variants, docs/methods/drift.md), for the
    # slow learner and MIST (on both views); 0: off
    kd_feat: float = 0.0  # weight of mean((f_prev(x) - f(x))^2) (SLDC: 1.0)
    kd_norm: float = 0.0  # weight of mean((||f_prev(x)|| - ||f(x)||)^2) (SLDC: 0.1)
    kd_first_task: bool = False  # also at task 0, the pre-trained backbone as the teacher (SLDC 97c076f)

    def problems(self) -> list[str]:
        out = checks(self, [
            ("epochs", lambda v: v >= 1, "must be >= 1"),
            ("batch_size", lambda v: v >= 1, "must be >= 1"),
            ("lr", lambda v: v > 0, "must be > 0"),
            ("backbone_lr_scale", lambda v: v >= 0, "must be >= 0 (0 freezes the backbone)"),
            ("momentum", lambda v: 0 <= v < 1, "must be in [0, 1)"),
            ("weight_decay", lambda v: v >= 0, "must be >= 0"),
            ("kd_feat", lambda v: v >= 0, "must be >= 0"),
            ("kd_norm", lambda v: v >= 0, "must be >= 0"),
            ("label_smoothing", lambda v: 0 <= v < 1, "must be in [0, 1)"),
            ("optimizer", *one_of("sgd", "adamw")),
            ("cosine_floor", lambda v: 0 <= v <= 1, "must be in [0, 1] (a share of the LR)"),
        ])  # fmt: skip
        m = self.milestones
        if isinstance(self.epochs, int) and isinstance(m, list) and all(isinstance(x, int) for x in m):
            if not (all(0 < x <= self.epochs for x in m) and m == sorted(m)):
                out.append(f"milestones: {m} must be increasing epochs in 1..{self.epochs}")
        return out


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

    def problems(self) -> list[str]:
        out = checks(self, [
            ("rank", lambda v: v >= 1, "must be >= 1"),
            ("lr_first", lambda v: v > 0, "must be > 0"),
            ("lr", lambda v: v > 0, "must be > 0"),
        ])  # fmt: skip
        if isinstance(self.targets, list):
            bad = [x for x in self.targets if x not in ("qkv", "mlp")]
            if bad:
                out.append(f"targets: {bad} not among: qkv, mlp")
        return out


@dataclass
class StatsConfig:
    """Stage 2, class Gaussians."""

    ridge: float = 1e-4  # added to every covariance's diagonal
    chunk_rows: int = 65536  # feature rows per accumulation step (one kernel launch; 200 MB at d = 768)
    kernel_precision: str = "ieee"  # Triton (GPU) products: ieee (exact float32) | tf32 | tf32x3 (faster)
    # per-class scatter kept: full (d x d) | diagonal | lowrank (top `rank` eigenpairs + the mean of the
    # rest); each task's pooled scatter is kept exactly in every form
    covariance: str = "full"
    rank: int = 16  # r of the lowrank form

    def problems(self) -> list[str]:
        return checks(self, [
            ("ridge", lambda v: v >= 0, "must be >= 0"),
            ("chunk_rows", lambda v: v >= 1, "must be >= 1"),
            ("kernel_precision", *one_of("ieee", "tf32", "tf32x3")),
            ("covariance", *one_of("full", "diagonal", "lowrank")),
            ("rank", lambda v: v >= 1, "must be >= 1"),
        ])  # fmt: skip


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
    # SLDC's classifier refinement (docs/methods/drift.md) as options; the defaults are SLCA's CA
    optimizer: str = "sgd"  # sgd (SLCA, with momentum) | adam (SLDC)
    loss: str = "ca"  # ca: CE of tau-normalised logits (SLCA) | sce: symmetric CE of raw logits (SLDC)
    sce_alpha: float = 0.5  # loss sce: weight of CE (SLDC: 0.5)
    sce_beta: float = 0.5  # loss sce: weight of reverse CE (SLDC: 0.5)
    lr_min: float = 0.0  # floor of the cosine schedule (SLDC: 5e-5)
    batch_per_class: float | None = None  # None -> batch_size; else floor(x * seen classes) (SLDC: 3.2)
    resample: bool = True  # new samples every epoch (SLCA) | false: one draw per alignment (SLDC)
    first_task: bool = False  # also align at task 0 (SLDC refines its classifier after every task)

    def problems(self) -> list[str]:
        return checks(self, [
            ("epochs", lambda v: v >= 1, "must be >= 1"),
            ("lr", lambda v: v > 0, "must be > 0"),
            ("momentum", lambda v: 0 <= v < 1, "must be in [0, 1)"),
            ("samples_per_class", lambda v: v >= 1, "must be >= 1"),
            ("batch_size", lambda v: v >= 1, "must be >= 1"),
            ("tau", lambda v: v > 0, "must be > 0"),
            ("task_of_class", *one_of("true", "authors")),
            ("optimizer", *one_of("sgd", "adam")),
            ("loss", *one_of("ca", "sce")),
            ("sce_alpha", lambda v: v >= 0, "must be >= 0"),
            ("sce_beta", lambda v: v >= 0, "must be >= 0"),
            ("lr_min", lambda v: v >= 0, "must be >= 0"),
            ("batch_per_class", lambda v: v > 0, "must be > 0"),
        ])  # fmt: skip


@dataclass
class MistConfig:
    """MIST, the sparse-tuning learner (docs/methods/mist.md); used by methods whose learner is `mist`."""

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
    view_crop: str = "authors"  # second view's crop: authors (whole pixels, first valid of 10 draws) | continuous

    def problems(self) -> list[str]:
        return checks(self, [
            ("epochs", lambda v: v >= 2, "must be >= 2"),
            ("batch_size", lambda v: v >= 1, "must be >= 1"),
            ("proj_dim", lambda v: v >= 1, "must be >= 1"),
            ("select", lambda v: 0 < v <= 1, "must be in (0, 1]"),
            ("keep", lambda v: 0 < v <= 1, "must be in (0, 1]"),
            ("frozen_quantile", lambda v: 0 < v <= 1, "must be in (0, 1]"),
            ("view_crop", *one_of("authors", "continuous")),
        ])  # fmt: skip


@dataclass
class SystemConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 4  # data-loading worker processes (file datasets); at most the CPUs available
    extract_batch_size: int = 256
    feature_chunk_rows: int = 2048  # zarr chunk height of feature stores
    deterministic: bool = True  # torch deterministic algorithms (CPU runs repeat bit for bit)
    precision: str = "fp32"  # fp32 | bf16 | auto (bf16 on a GPU that supports it): forward passes only
    eval_every: int = (
        0  # test accuracy on the seen classes every N training epochs (logged; 0: never; authors: 5)
    )

    def problems(self) -> list[str]:
        out = checks(self, [
            ("num_workers", lambda v: v >= 0, "must be >= 0"),
            ("extract_batch_size", lambda v: v >= 1, "must be >= 1"),
            ("feature_chunk_rows", lambda v: v >= 1, "must be >= 1"),
            ("eval_every", lambda v: v >= 0, "must be >= 0 (0: never)"),
            ("precision", *one_of("fp32", "bf16", "auto")),
        ])  # fmt: skip
        dev = self.device
        if isinstance(dev, str) and not (dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:")):
            out.append(f"device: {dev!r} is not one of auto, cpu, cuda, cuda:N")
        return out


# Heads evaluated by `clpt run` by default (README: "Classifier heads"). Every one is
# fitted from the run's cache in seconds on the built-in benchmark.
DEFAULT_HEADS = ["ca", "linear", "ncm", "lda", "fecam", "ranpac"]


def settings_of(settings: dict[str, Any], kind: str, name: str) -> Any:
    """The settings dataclass of registered `name` (a head, a drift method), filled by the resolver."""
    try:
        return settings[name]
    except KeyError:
        raise KeyError(
            f"no settings for {kind} {name!r}: build the config with clpt.stages.resolve "
            "(resolve, default_config), which fills every registered one's settings"
        ) from None


def settings_problems(settings: dict[str, Any]) -> list[str]:
    """`name.key: message` for every problem of each registered settings dataclass (its `problems()`)."""
    out: list[str] = []
    for name, value in settings.items():
        check = getattr(value, "problems", None)
        out.extend(f"{name}.{p}" for p in (check() if check is not None else []))
    return out


@dataclass
class HeadsConfig:
    """Classifier heads fitted from the cache: which ones `clpt run` evaluates, and each one's settings.

    `settings` holds one dataclass per registered head (`clpt.heads`); the
    resolver (`clpt.stages.resolve`) fills it, so this module needs no registry.
    """

    enabled: list[str] = field(default_factory=lambda: list(DEFAULT_HEADS))
    settings: dict[str, Any] = field(default_factory=dict)  # head name -> its config dataclass

    def of(self, name: str) -> Any:
        return settings_of(self.settings, "head", name)

    def problems(self) -> list[str]:
        return settings_problems(self.settings)


DRIFT_METHODS = ("linear", "weak_nonlinear", "sdc", "dpcr", "ldc")  # clpt.drift_methods registers exactly these


@dataclass
class DriftConfig:
    """Drift compensation of stored class statistics (docs/methods/drift.md); `none` leaves them stale.

    With a method, every run also fits each statistics classifier on the compensated
    statistics (`NAME+drift` beside `NAME`). `settings` holds one dataclass per method
    (`clpt.drift_methods`); the resolver fills it.
    """

    method: str = "none"  # none | linear (SLDC alpha-1) | weak_nonlinear (SLDC alpha-2) | sdc | dpcr | ldc
    settings: dict[str, Any] = field(default_factory=dict)  # method name -> its settings dataclass

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def of(self, name: str) -> Any:
        return settings_of(self.settings, "drift method", name)

    def problems(self) -> list[str]:
        out = (
            []
            if self.method == "none" or self.method in DRIFT_METHODS
            else [f"method: {self.method!r} is not one of none, {', '.join(DRIFT_METHODS)}"]
        )
        return out + settings_problems(self.settings)


@dataclass
class RunConfig:
    method: str = "slca"  # a registered method (clpt.methods): slca | slca_pp | seqft | sldc | ...
    seed: int = 1993  # training seed (weights init, shuffling, sampling)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    mist: MistConfig = field(default_factory=MistConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    system: SystemConfig = field(default_factory=SystemConfig)

    def problems(self) -> list[str]:
        """Every value problem of every section, `section.key: message` (the registries' checks: resolve)."""
        out: list[str] = checks(self, [("seed", lambda v: 0 <= v < 2**32, SEED_RANGE)])
        for name in SECTIONS:
            out.extend(f"{name}.{p}" for p in getattr(self, name).problems())
        if self.drift.enabled and self.stats.covariance not in (None, "full"):
            out.append(f"drift.method: {self.drift.method} maps full scatter matrices, and stats.covariance is "
                       f"{self.stats.covariance}: set stats.covariance=full or drift.method=none")  # fmt: skip
        return out

    @property
    def align_enabled(self) -> bool:
        return bool(self.align.enabled)

    @property
    def align_weight_decay(self) -> float:
        return self.train.weight_decay if self.align.weight_decay is None else self.align.weight_decay


SECTIONS = ("benchmark", "backbone", "train", "lora", "stats", "align", "heads", "mist", "drift", "system")


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


# libyaml's safe loader where PyYAML was built with it (the same safe constructor, a C parser: reading a
# run's config.yaml is then a small part of `clpt status`); PyYAML's pure-Python one otherwise
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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
            data = yaml.load(text, Loader=_SAFE_LOADER) or {}
        else:
            raise ConfigError(
                [f"unknown config format {p.suffix!r}: use .yaml, .yml or .toml"], source=str(p)
            )
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
        if problem and mark is not None:  # YAML: what is wrong, and where
            first = f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
        raise ConfigError([f"cannot parse: {first}"], source=str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError(["top level must be a mapping of sections"], source=str(p))
    return data


# ---------------------------------------------------------------------------
# Typed construction with all problems collected
# ---------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if value is None:
            problems.append(f"{where}: must not be empty")
            return None
        return coerce(value, inner[0], where, problems)
    if origin is list:
        if not isinstance(value, list | tuple):
            problems.append(f"{where}: expected a list, got {value!r}")
            return []
        return [coerce(v, args[0], f"{where}[{i}]", problems) for i, v in enumerate(value)]
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
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            problems.append(f"{where}: expected a number, got {value!r}")
        elif not math.isfinite(number):  # inf, nan (1e400 reads as inf): never a setting
            problems.append(f"{where}: must be a finite number, got {value!r}")
            number = None
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{where}: expected a string, got {value!r}")
        return None
    problems.append(f"{where}: unsupported type {_type_name(tp)}")
    return None


def build_section(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    """An instance of dataclass `cls` from a raw mapping; type problems are appended to `problems`."""
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
            setattr(obj, f.name, coerce(raw[f.name], hints[f.name], f"{where}.{f.name}", problems))
    return obj


def to_dict(cfg: RunConfig) -> dict:
    def conv(v: Any) -> Any:
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, HeadsConfig):
            return {"enabled": list(v.enabled), **{k: conv(x) for k, x in v.settings.items()}}
        if isinstance(v, DriftConfig):
            return {"method": v.method, **{k: conv(x) for k, x in v.settings.items()}}
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
