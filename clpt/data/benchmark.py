"""Benchmarks: class order, task splits and the images behind them.

A `Benchmark` holds a train and a test `Split` whose labels are already
remapped to positions in the run's class order (docs/methods/slca.md: `np.random.seed(seed)`
then `np.random.permutation(n_classes)`), so task t owns the label range
`task_ranges[t]`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from clpt.config import BenchmarkConfig
from clpt.data.registry import HALF, IMAGENET_MEAN, IMAGENET_STD, READERS, RawDataset
from clpt.errors import ConfigError

if TYPE_CHECKING:  # imported where used: reading a run's records (`clpt status`) needs neither numpy nor the readers
    import numpy as np

# the constants readers register with; re-exported for library users
__all__ = ["HALF", "IMAGENET_MEAN", "IMAGENET_STD", "Benchmark", "Split", "load_benchmark", "task_ranges"]


def class_order(n_classes: int, seed: int) -> np.ndarray:
    """The class order of the reference code: legacy global NumPy RNG, seeded."""
    import numpy as np

    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return np.random.permutation(n_classes)
    finally:
        np.random.set_state(state)  # do not disturb anyone else's global stream


def task_ranges(n_classes: int, init_classes: int, increment: int) -> list[range]:
    """Label ranges of each task; a remainder smaller than `increment` is a last task."""
    if init_classes > n_classes:
        raise ConfigError(
            [f"benchmark.init_classes: {init_classes} exceeds the benchmark's {n_classes} classes"]
        )
    ranges = [range(0, init_classes)]
    start = init_classes
    while start < n_classes:
        stop = min(start + increment, n_classes)
        ranges.append(range(start, stop))
        start = stop
    return ranges


@dataclass
class Split:
    """Images of one split. Either in memory (`images`, uint8 NHWC) or on disk (`paths`)."""

    labels: np.ndarray  # (N,) int64, remapped to class-order positions
    images: np.ndarray | None = None  # (N, H, W, 3) uint8
    paths: list[str] | None = None
    # (size, mtime_ns) of each file as the run's manifest records it (`clpt.data.manifest.stamps`):
    # the loader checks each file it read against it, so a file replaced mid-run is not used
    stamps: dict[str, tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def indices_of(self, classes: range) -> np.ndarray:
        """Row indices whose label lies in `classes`, in stored order."""
        import numpy as np

        return np.flatnonzero((self.labels >= classes.start) & (self.labels < classes.stop))


@dataclass
class Benchmark:
    name: str
    class_names: list[str]  # indexed by remapped label
    order: np.ndarray  # order[i] = original class id at position i
    tasks: list[range]
    train: Split
    test: Split
    image_size: int  # model input resolution
    mean: tuple[float, float, float] = HALF
    std: tuple[float, float, float] = HALF
    family: str = "builtin"  # transform family (clpt.data.registry)
    train_crop_scale: tuple[float, float] | None = None  # a method's protocol: RRC scale for training
    train_interpolation: str = "bicubic"
    test_resize: str = "crop"  # crop: Resize(size * 256/224) + CenterCrop | full: Resize(size) + CenterCrop
    info: dict = field(default_factory=dict)  # recorded in the run (split, sources)
    raw: RawDataset | None = None  # the dataset read from disk (None for a generated benchmark)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)


def remap_labels(labels: np.ndarray, order: np.ndarray) -> np.ndarray:
    import numpy as np

    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    return position[labels]


def load_benchmark(cfg: BenchmarkConfig) -> Benchmark:
    """Build the benchmark named in the config (a registered reader, `clpt.data.registry.READERS`).

    Memoised per process: the stages of one `clpt run` share the loaded images.
    """
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels  # the creation check and the loader's workers
    bench = _load_benchmark(
        cfg.name,
        cfg.root,
        cfg.init_classes,
        cfg.increment,
        cfg.seed,
        cfg.image_size,
        cfg.download,
        cfg.split_seed,
    )
    # normalisation and training crop are a method's protocol (recorded in the run's config)
    mean, std = {"dataset": (bench.mean, bench.std), "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                 "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}[cfg.normalization]  # fmt: skip
    crop = cfg.train_crop_scale
    scale = (float(crop[0]), float(crop[1])) if crop is not None else None
    return dataclasses.replace(
        bench, mean=mean, std=std, train_crop_scale=scale, train_interpolation=cfg.train_interpolation,
        test_resize=cfg.test_resize,
    )


@functools.lru_cache(maxsize=2)
def _load_benchmark(
    name: str,
    root: str | None,
    init_classes: int,
    increment: int,
    seed: int,
    image_size: int | None,
    download: bool,
    split_seed: int,
) -> Benchmark:
    import numpy as np

    from clpt.data.readers import read_dataset

    spec = READERS.get(name)
    raw = read_dataset(name, root, download, split_seed)
    names = raw.class_names
    train = Split(labels=raw.train.labels, images=raw.train.images, paths=raw.train.paths)
    test = Split(labels=raw.test.labels, images=raw.test.images, paths=raw.test.paths)
    kept: RawDataset | None = raw
    if spec.generated:  # nothing read from disk: no manifest
        assert raw.train.images is not None
        size, info, kept = image_size or int(raw.train.images.shape[1]), dict(raw.info), None
    else:
        size, info = image_size or 224, {"source": str(raw.root), **raw.info}
    order = class_order(len(names), seed) if spec.shuffle_classes else np.arange(len(names))
    train.labels = remap_labels(train.labels, order)
    test.labels = remap_labels(test.labels, order)
    return Benchmark(
        name=name,
        class_names=[names[i] for i in order],
        order=order,
        tasks=task_ranges(len(names), init_classes, increment),
        train=train,
        test=test,
        image_size=size,
        mean=spec.mean,
        std=spec.std,
        family=spec.family,
        info=info,
        raw=kept,
    )
