"""Mini-batches of a split's rows, on the compute device, with the right transform.

- In-memory uint8 splits (built-in, CIFAR-100) are indexed and augmented a whole
  batch at a time on the device: no worker process decodes or crops one image.
- File splits (ImageNet-R, CUB-200, Cars-196, image folders) are decoded and
  augmented by `system.num_workers` DataLoader workers into uint8 batches
  (pinned when the device is a GPU), then normalised on the device.

Both follow the same epoch order: a seeded permutation when training, sharded
across ranks the way `DistributedSampler` does it (padded by wrapping, so every
rank runs the same number of steps).

Randomness comes from the loader's own `torch.Generator` only, never the global
RNG: in-memory batches draw from it directly; file batches derive one seed per
image of the epoch from it, and each image's augmentation runs under that seed
with the global RNG saved and restored around it, in this process or a worker.
So an epoch's augmentation is the same with any number of workers, and
iterating a loader leaves the global RNG as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from clpt.data import manifest as M
from clpt.data import transforms as T
from clpt.data.benchmark import Benchmark, Split

CIFAR_BRIGHTNESS = 63 / 255


def epoch_order(
    indices: np.ndarray, train: bool, generator: torch.Generator, rank: int, world_size: int
) -> torch.Tensor:
    idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
    if train:
        idx = idx[torch.randperm(len(idx), generator=generator)]
    if world_size > 1:
        per_rank = -(-len(idx) // world_size)
        idx = torch.cat([idx, idx[: per_rank * world_size - len(idx)]])
        idx = idx[rank::world_size]
    return idx


class _Batches:
    def __init__(
        self, bench, split, indices, batch_size, device, train, generator=None, rank=0, world_size=1
    ):
        self.bench, self.split = bench, split
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size, self.device, self.train = batch_size, device, train
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        per_rank = -(-len(self.indices) // self.world_size)  # ceil
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def _finish(self, x_uint8_nchw: torch.Tensor) -> torch.Tensor:
        return T.normalize(
            x_uint8_nchw.to(self.device, non_blocking=True).float().div_(255.0),
            self.bench.mean,
            self.bench.std,
        )


class ArrayBatches(_Batches):
    """Batches of an in-memory uint8 split, transformed on the device."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = torch.from_numpy(self.split.images), torch.from_numpy(self.split.labels)
        order = epoch_order(self.indices, self.train, self.generator, self.rank, self.world_size)
        size, fam = self.bench.image_size, self.bench.family
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            x = T.to_float(images[rows].to(self.device, non_blocking=True))  # (B, 3, H, W) in [0, 1]
            if fam == "builtin":
                if self.train:
                    x = T.pad_crop_flip(x, pad=x.shape[-1] // 8, generator=self.generator)
                if x.shape[-1] != size:
                    x = T.resize_center_crop(x, size, size)
            elif self.train and self.bench.train_crop_scale is not None:  # a method's protocol (MIST)
                x = T.random_resized_crop_flip(
                    x, size, self.generator, self.bench.train_crop_scale, self.bench.train_interpolation
                )
            elif self.train:  # CIFAR-100
                x = T.random_resized_crop_flip(x, size, self.generator)
                x = T.brightness_jitter(x, CIFAR_BRIGHTNESS, self.generator)
            else:
                x = T.resize_center_crop(x, T.test_resize(size, self.bench.test_resize), size)
            yield (
                T.normalize(x, self.bench.mean, self.bench.std),
                labels[rows].to(self.device, non_blocking=True),
            )


class _FileDataset(torch.utils.data.Dataset):
    """Items are (row, seed): the image of `row`, transformed under `seed` (None: a deterministic transform)."""

    def __init__(self, paths: list[str], labels: np.ndarray, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int | None]):
        i, seed = key
        with Image.open(self.paths[i]) as im:
            rgb = T.to_rgb(im)
        if seed is None:
            return self.transform(rgb), int(self.labels[i])
        with torch.random.fork_rng(devices=[]):  # the global RNG is restored afterwards
            torch.manual_seed(seed)
            return self.transform(rgb), int(self.labels[i])


class FileBatches(_Batches):
    """Batches of image files, decoded and augmented by DataLoader workers."""

    def __init__(self, *args, num_workers: int = 0):
        super().__init__(*args)
        # no more workers than CPUs this process may use (PyTorch warns above that, and they only contend);
        # each image's transform is seeded by its position, so the batches do not depend on the count
        self.num_workers = min(num_workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                               else (os.cpu_count() or 1))  # fmt: skip
        tf = T.file_transform(
            self.bench.family,
            self.train,
            self.bench.image_size,
            self.bench.train_crop_scale,
            self.bench.train_interpolation,
            self.bench.test_resize,
        )
        self.dataset = _FileDataset(self.split.paths, self.split.labels, tf)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(self.indices, self.train, self.generator, self.rank, self.world_size)
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        # one seed per position of the epoch (a test transform draws nothing: no seed)
        keys = [(int(i), (seed + 1_000_003 * k) % 2**63 if self.train else None) for k, i in enumerate(order)]
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=keys,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(seed),  # the workers' base seed: not the global RNG
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None,
        )
        stamps = self.split.stamps
        done = 0
        for x, y in loader:
            if stamps:  # the files this batch was read from are the files the run checked
                M.changed_since([self.split.paths[i] for i, _ in keys[done : done + len(y)]], stamps)
            done += len(y)
            yield self._finish(x), y.to(self.device, non_blocking=True)


def batches(
    bench: Benchmark,
    split: Split,
    indices: np.ndarray,
    batch_size: int,
    device: torch.device,
    train: bool,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> _Batches:
    """The batch iterator for a split: in memory -> on-device transforms; files -> worker processes."""
    args = (bench, split, indices, batch_size, device, train, generator, rank, world_size)
    if split.images is not None:
        return ArrayBatches(*args)
    return FileBatches(*args, num_workers=num_workers)
