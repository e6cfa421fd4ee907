"""Does the loading path keep the model fed? Images/s through clpt's real loaders vs the model alone.

    python bench/bench_loading.py                                   # ViT-B/16 at 224 (meant for a GPU)
    python bench/bench_loading.py --model clpt_vit_micro --image-size 32 --n-images 512   # CPU smoke run

For two synthetic datasets, CIFAR-sized (32x32 uint8 in memory, transformed on
the device) and ImageNet-R-sized (JPEG files of about 400x300, decoded and
augmented by DataLoader workers), it measures in one run:

  extract  model forward (eval, no grad) on batches already on the device, vs
           the same through `clpt.data.loader.batches` (test transform)
  train    forward + backward + SGD step on batches already on the device, vs
           the same through `batches` (train transform)

and prints images/s of both and the ratio loading / model-only (1.0 = the
loader costs nothing; the target is >= 0.9).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import clpt.backbone  # noqa: F401  (registers clpt_vit_micro)
from clpt.data.benchmark import Benchmark, Split, task_ranges
from clpt.data.loader import batches
from clpt.data.registry import READERS


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_cifar_like(n: int, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    return Split(labels=rng.integers(0, 100, n), images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


def make_imagenet_r_like(n: int, folder: Path, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(300, 500)), int(rng.integers(250, 400))
        arr = (
            rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        )  # JPEG-friendly
        p = folder / f"{i:06d}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        paths.append(str(p))
    return Split(labels=rng.integers(0, 200, n), paths=paths)


def bench_for(name: str, split: Split, size: int) -> Benchmark:
    spec = READERS.get(name)
    family, mean, std = spec.family, spec.mean, spec.std
    n_cls = int(split.labels.max()) + 1
    return Benchmark(
        name,
        [str(i) for i in range(n_cls)],
        np.arange(n_cls),
        task_ranges(n_cls, n_cls, n_cls),
        split,
        split,
        size,
        mean,
        std,
        family,
    )


def model_only(model, n_batches: int, batch: int, size: int, device, train: bool) -> float:
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step(model, opt, x, y, train)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        step(model, opt, x, y, train)
    sync(device)
    return n_batches * batch / (time.perf_counter() - t0)


def step(model, opt, x, y, train: bool) -> None:
    if train:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    else:
        with torch.no_grad():
            model(x)


def through_loader(
    model, bench: Benchmark, batch: int, device, train: bool, workers: int, limit: int
) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    idx = np.arange(len(bench.train))
    gen = torch.Generator().manual_seed(0)
    it = iter(batches(bench, bench.train, idx, batch, device, train, gen, num_workers=workers))
    x, y = next(it)  # warm-up: workers started, first batch decoded
    step(model, opt, x, y % 10, train)
    sync(device)
    n, t0 = 0, time.perf_counter()
    for i, (x, y) in enumerate(it):
        if i >= limit:
            break
        step(model, opt, x, y % 10, train)
        n += len(y)
    sync(device)
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n-images", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = timm.create_model(args.model, num_classes=10, img_size=args.image_size).to(device)
    where = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(f"{args.model} at {args.image_size}px, batch {args.batch}, {args.workers} workers, on {where}")
    n_batches = max(2, args.n_images // args.batch - 2)
    with tempfile.TemporaryDirectory(prefix="clpt-bench-load-") as tmp:
        datasets = {
            "cifar100 (32px, in memory)": bench_for(
                "cifar100", make_cifar_like(args.n_images), args.image_size
            ),
            "imagenet-r (~400px JPEG)": bench_for(
                "imagenet-r", make_imagenet_r_like(args.n_images, Path(tmp)), args.image_size
            ),
        }
        print(f"{'dataset':<28} {'stage':<8} {'model-only img/s':>17} {'loader img/s':>13} {'ratio':>6}")
        for label, bench in datasets.items():
            for stage, train in (("extract", False), ("train", True)):
                model.train(train)
                ref = model_only(model, n_batches, args.batch, args.image_size, device, train)
                real = through_loader(model, bench, args.batch, device, train, args.workers, n_batches)
                print(f"{label:<28} {stage:<8} {ref:>17.1f} {real:>13.1f} {real / ref:>6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
