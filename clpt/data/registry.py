"""Benchmark readers, registered by name (timm style): `benchmark.name` is a name in `READERS`.

A reader turns a dataset folder into a `RawDataset` (class names, and per split
either uint8 images in memory or file paths, with the dataset's own labels). Its
registration says, besides the function, how its images are augmented (the
transform family), its normalisation, and the benchmark preset (the published
settings: task split, epochs, heads' settings) that config resolution applies
under the method's preset.

Adding a benchmark reader: a module with its read function and one
`register_reader(ReaderSpec(...))` call, imported in `clpt/data/__init__.py`.

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
from typing import Any

import numpy as np

from clpt.registry import Registry

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
