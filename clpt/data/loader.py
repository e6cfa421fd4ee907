"""Mini-batches of a split's rows, on the compute device, with the right transform."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from clpt.data import transforms as T
from clpt.data.benchmark import Benchmark, Split


class ArrayBatches:
    """Batches of an in-memory uint8 split, transformed on `device`.

    `train=True` shuffles (with `generator`) and augments; otherwise rows come in
    the given order with the test transform. With `world_size > 1` each rank
    sees a disjoint, equally sized shard of every epoch's permutation (the
    `DistributedSampler` recipe: the permutation is padded by wrapping).
    """

    def __init__(
        self,
        bench: Benchmark,
        split: Split,
        indices: np.ndarray,
        batch_size: int,
        device: torch.device,
        train: bool,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        if split.images is None:
            raise TypeError("ArrayBatches needs an in-memory split")
        self.bench, self.split = bench, split
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size, self.device, self.train = batch_size, device, train
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self._images = torch.from_numpy(split.images)  # (N, H, W, 3) uint8, shared, not copied
        self._labels = torch.from_numpy(split.labels)

    def _order(self) -> torch.Tensor:
        idx = torch.from_numpy(self.indices)
        if self.train:
            idx = idx[torch.randperm(len(idx), generator=self.generator)]
        if self.world_size > 1:
            per_rank = -(-len(idx) // self.world_size)
            idx = torch.cat([idx, idx[: per_rank * self.world_size - len(idx)]])
            idx = idx[self.rank :: self.world_size]
        return idx

    def __len__(self) -> int:
        n = -(-len(self.indices) // self.world_size)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            if self.drop_last and len(rows) < self.batch_size:
                break
            x = T.to_float(self._images[rows].to(self.device, non_blocking=True))
            if self.train:
                x = T.pad_crop_flip(x, pad=x.shape[-1] // 8, generator=self.generator)
            x = T.normalize(x, self.bench.mean, self.bench.std)
            yield x, self._labels[rows].to(self.device, non_blocking=True)


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
) -> ArrayBatches:
    """The batch iterator for a split (in-memory splits are augmented on the device)."""
    return ArrayBatches(bench, split, indices, batch_size, device, train, generator, rank, world_size)
