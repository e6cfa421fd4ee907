"""Benchmark readers, registered by name (timm style): `benchmark.name` is a name in `READERS`.

A reader turns a dataset folder into a `RawDataset` (class names, and per split
either uint8 images in memory or file paths, with the dataset's own labels). Its
registration says, besides the function, how its images are augmented (the
transform family), its normalisation, and the benchmark preset (the published
settings: task split, epochs, heads' settings) that config resolution applies
under the method's preset.

Adding a benchmark reader: a module with its read function and one
`register_reader(ReaderSpec(...))` call. The built-in readers are registered at
the end of this module with their functions named lazily (`clpt.data.readers`),
so that resolving a run's config imports neither numpy nor the readers.

Transform families (docs/methods/slca.md, Transforms):
    builtin       pad-crop-flip at native size (in memory)
    cifar         RandomResizedCrop + flip + brightness 63/255, on the device (in memory)
    rrc           RandomResizedCrop + flip (files)
    fixed_resize  Resize((300, 300)) + RandomCrop + flip (files)
Test images: Resize(256) + CenterCrop(224) (scaled with image_size), except builtin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clpt.registry import Registry, by_name

if TYPE_CHECKING:
    import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR_STD = (0.2675, 0.2565, 0.2761)
HALF = (0.5, 0.5, 0.5)


@dataclass
class RawSplit:
    labels: np.ndarray  # (N,) int64, the dataset's own class ids
    images: np.ndarray | None = None  # (N, H, W, 3) uint8, in memory
    paths: list[str] | None = None  # absolute file paths


@dataclass
class RawDataset:
    name: str
    root: Path | None  # the folder the files are relative to (None: generated, nothing read)
    class_names: list[str]
    train: RawSplit
    test: RawSplit
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ReaderSpec:
    name: str
    read: Callable[[Path | None, bool, int], RawDataset]  # (root, download, split_seed) -> RawDataset
    family: str  # transform family (above)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # normalisation: benchmark.normalization=dataset
    std: tuple[float, float, float] = IMAGENET_STD
    preset: dict[str, Any] = field(
        default_factory=dict
    )  # config sections: the benchmark's published settings
    needs_root: bool = True  # False: generated or downloaded when benchmark.root is absent
    generated: bool = False  # True: images are made, not read: no manifest of files
    shuffle_classes: bool = True  # False: classes keep the reader's order (benchmark.seed is unused)


READERS: Registry[ReaderSpec] = Registry("benchmark")


def register_reader(spec: ReaderSpec) -> ReaderSpec:
    return READERS.register(spec.name, spec)


def _read(name: str) -> Callable[[Path | None, bool, int], RawDataset]:
    """The reader `name` of `clpt.data.readers` (its `READ` table), imported on first call: resolving a
    config reads these entries without loading numpy or the readers."""

    def call(root: Path | None, download: bool, split_seed: int) -> RawDataset:
        return by_name("clpt.data.readers", "READ")[name](root, download, split_seed)  # they import this module

    call.__qualname__ = f"clpt.data.readers.READ[{name!r}]"
    return call


# --- the built-in readers (their code: clpt.data.readers) -------------------------------------

_SLOW = {"train": {"epochs": 50, "milestones": [40], "weight_decay": 5e-4}}  # the 50-epoch protocols
register_reader(ReaderSpec(
    "builtin", _read("builtin"), "builtin", HALF, HALF, needs_root=False, generated=True,
    preset={  # sized for a CPU
        "benchmark": {"init_classes": 10, "increment": 10},
        "backbone": {"name": "clpt_vit_micro"},
        "train": {"epochs": 6, "milestones": [5], "batch_size": 64},
        "system": {"num_workers": 0},
        # d = 128: a 2048-wide random projection keeps the demo's RanPAC fits to about a second
        "heads": {"ranpac": {"dim": 2048}},
        "mist": {"epochs": 6},  # as train.epochs: sized for a 2-core CPU
    },
))  # fmt: skip
register_reader(ReaderSpec(
    "cifar100", _read("cifar100"), "cifar", CIFAR_MEAN, CIFAR_STD,
    needs_root=False,  # downloaded into benchmark.root when missing (and the network allows)
    preset={"benchmark": {"init_classes": 10, "increment": 10},
            "train": {"epochs": 20, "milestones": [18], "weight_decay": 5e-4}},
))  # fmt: skip
register_reader(ReaderSpec(
    "imagenet-r", _read("imagenet-r"), "rrc",
    preset={"benchmark": {"init_classes": 20, "increment": 20}, **_SLOW,
            "heads": {"fecam": {"shrink1": 10.0, "shrink2": 10.0}}},  # FeCAM's ImageNet-R setting
))  # fmt: skip
register_reader(ReaderSpec(
    "imagenet-a", _read("imagenet-a"), "rrc",
    preset={"benchmark": {"init_classes": 20, "increment": 20}, **_SLOW},  # PILOT / RanPAC / MIST: 10 x 20
))  # fmt: skip
register_reader(ReaderSpec(
    "cub200", _read("cub200"), "fixed_resize",
    preset={"benchmark": {"init_classes": 20, "increment": 20}, **_SLOW},
))  # fmt: skip
register_reader(ReaderSpec(
    "cars196", _read("cars196"), "fixed_resize",
    preset={"benchmark": {"init_classes": 20, "increment": 20}, **_SLOW, "align": {"tau": 0.05}},
))  # fmt: skip
register_reader(ReaderSpec("imagefolder", _read("imagefolder"), "rrc"))
# A stream of image folders: the first folder creates the run (classes in folder order, not shuffled),
# `clpt add-task RUN FOLDER` appends each later one as a task.
register_reader(ReaderSpec("stream", _read("stream"), "rrc",
                           shuffle_classes=False))  # fmt: skip
