"""Benchmarks: class order, task splits and the images behind them.

A `Benchmark` holds a train and a test `Split` whose labels are already
remapped to positions in the run's class order (METHOD.md: `np.random.seed(seed)`
then `np.random.permutation(n_classes)`), so task t owns the label range
`task_ranges[t]`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from clpt.config import BenchmarkConfig
from clpt.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


def class_order(n_classes: int, seed: int) -> np.ndarray:
    """The class order of the reference code: legacy global NumPy RNG, seeded."""
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

    def __len__(self) -> int:
        return len(self.labels)

    def indices_of(self, classes: range) -> np.ndarray:
        """Row indices whose label lies in `classes`, in stored order."""
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
    info: dict = field(default_factory=dict)  # recorded in the run (split, sources)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    def task_of_class(self) -> np.ndarray:
        """(n_classes,) true task index of each remapped class."""
        out = np.empty(self.n_classes, dtype=np.int64)
        for t, r in enumerate(self.tasks):
            out[r.start : r.stop] = t
        return out


def remap_labels(labels: np.ndarray, order: np.ndarray) -> np.ndarray:
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    return position[labels]


def load_benchmark(cfg: BenchmarkConfig) -> Benchmark:
    """Build the benchmark named in the config (see BENCHMARK_PRESETS for the names).

    Memoised per process: the stages of one `clpt run` share the loaded images.
    """
    return _load_benchmark(cfg.name, cfg.root, cfg.init_classes, cfg.increment, cfg.seed)


@functools.lru_cache(maxsize=2)
def _load_benchmark(name: str, root: str | None, init_classes: int, increment: int, seed: int) -> Benchmark:
    cfg = BenchmarkConfig(name=name, root=root, init_classes=init_classes, increment=increment, seed=seed)
    if cfg.name == "builtin":
        from clpt.data import builtin

        x_tr, y_tr = builtin.make_split("benchmark", "train")
        x_te, y_te = builtin.make_split("benchmark", "test")
        names = builtin.class_names("benchmark")
        order = class_order(len(names), cfg.seed)
        return Benchmark(
            name="builtin",
            class_names=[names[i] for i in order],
            order=order,
            tasks=task_ranges(len(names), cfg.init_classes, cfg.increment),
            train=Split(labels=remap_labels(y_tr, order), images=x_tr),
            test=Split(labels=remap_labels(y_te, order), images=x_te),
            image_size=builtin.IMAGE_SIZE,
            info={"source": "built-in procedural images (clpt.data.builtin)"},
        )
    raise ConfigError(
        [f"benchmark.name: {cfg.name!r} is not available in this version; use 'builtin'"],
    )
