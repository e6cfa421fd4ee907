"""Pre-training of the built-in backbone on the built-in *pre-training* classes.

The built-in benchmark needs a backbone that is pre-trained, honestly: on data
disjoint from the benchmark's classes. This module trains `clpt_vit_micro` once
on the 40 pre-training classes of `clpt.data.builtin` (none of them is a
benchmark class), saves the backbone's weights (the classifier dropped) to the
cache, and from then on timm loads them like any pre-trained checkpoint. The
result is deterministic for a given torch build and thread count.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from clpt import distributed as dist
from clpt.data import builtin
from clpt.data.benchmark import HALF, Benchmark, Split, task_ranges
from clpt.data.loader import ArrayBatches
from clpt.io import digest_path, file_sha256, write_text
from clpt.vit_micro import BUILTIN_NAME, builtin_weights_path

PRETRAIN_EPOCHS = 12
PRETRAIN_SEED = 0


def _log(msg: str) -> None:
    print(f"[clpt pretrain] {msg}", file=sys.stderr, flush=True)


def pretrain_builtin(out: Path, epochs: int = PRETRAIN_EPOCHS, seed: int = PRETRAIN_SEED) -> dict:
    """Train the micro ViT on the pre-training classes and save its backbone weights to `out`."""
    torch.manual_seed(seed)
    x_tr, y_tr = builtin.make_split("pretrain", "train")
    x_te, y_te = builtin.make_split("pretrain", "test")
    n_cls = builtin.N_PRETRAIN_CLASSES
    bench = Benchmark(
        name="builtin-pretrain",
        class_names=builtin.class_names("pretrain"),
        order=np.arange(n_cls),
        tasks=task_ranges(n_cls, n_cls, n_cls),
        train=Split(labels=y_tr, images=x_tr),
        test=Split(labels=y_te, images=x_te),
        image_size=builtin.IMAGE_SIZE,
        mean=HALF,
        std=HALF,
    )
    device = torch.device("cpu")
    model = timm.create_model(BUILTIN_NAME, num_classes=n_cls)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    loader = ArrayBatches(bench, bench.train, np.arange(len(y_tr)), 128, device, train=True, generator=gen)
    steps = epochs * len(loader)
    warmup = min(len(loader), steps // 2)  # one epoch of linear warm-up, then cosine to 0

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        _log(f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    correct = 0
    with torch.no_grad():
        test = ArrayBatches(bench, bench.test, np.arange(len(y_te)), 512, device, train=False)
        for x, y in test:
            correct += (model(x).argmax(1) == y).sum().item()
    acc = correct / len(y_te)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)  # atomic: a half-written file is never taken for the weights
    write_text(digest_path(out), file_sha256(out) + "\n")  # checked at every load (clpt.backbone)
    info = {"path": str(out), "pretrain_test_acc": acc, "seconds": time.perf_counter() - t0, "epochs": epochs}
    _log(f"pre-training classes test accuracy {acc:.3f}; saved {out}")
    return info


def ensure_builtin_weights() -> Path:
    """Path of the built-in backbone's weights, pre-training them first if not cached.

    The explicit pre-training step. Under torchrun only rank 0 pre-trains; the
    other ranks wait at a barrier and then read the same file.
    """
    path = builtin_weights_path()
    if not path.is_file() and dist.is_main():
        _log(f"no cached built-in backbone at {path}: pre-training it once (about two minutes on 2 cores)")
        pretrain_builtin(path)
    dist.barrier()
    return path


def needs_builtin_weights(backbone_cfg) -> bool:
    """Whether a backbone config loads the built-in backbone's cached pre-trained weights."""
    return (
        backbone_cfg.pretrained
        and backbone_cfg.checkpoint is None
        and backbone_cfg.name.split(".")[0] == BUILTIN_NAME
    )
