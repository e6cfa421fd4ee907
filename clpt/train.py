"""Stage 1: the Slow Learner (docs/methods/slca.md), one task at a time.

Task t starts from the pre-alignment model of task t-1 (or the pre-trained
backbone at t = 0), adds a head for its classes, freezes the older heads, and
minimises cross-entropy over the *current* head's logits only
(`CE(logits[:, seen_before:], y - seen_before)`). SGD with momentum and two
learning-rate groups: the head at `lr`, the backbone at `lr * backbone_lr_scale`
(0 freezes it), MultiStepLR at the milestones. SLDC's recipe (docs/methods/drift.md)
is options of the same pieces: AdamW (`train.optimizer`), a cosine schedule to a
share of each group's LR (`train.cosine_floor`), label smoothing, and feature
distillation to the previous backbone (`train.kd_feat`, `train.kd_norm`).
"""

from __future__ import annotations

import copy
import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from clpt import distributed as dist
from clpt import precision as P
from clpt import progress
from clpt.backbone import create_backbone, weights_record
from clpt.config import Loss, RunConfig, Schedule, Trainable
from clpt.data.benchmark import Benchmark
from clpt.data.loader import batches
from clpt.errors import ClptError
from clpt.lora import apply_lora, is_peft_trainable
from clpt.losses import distillation_loss, sce_loss
from clpt.model import CLModel, Heads
from clpt.seeding import LOADER, task_seed

log = logging.getLogger("clpt")


def initial_model(cfg: RunConfig, device: torch.device) -> tuple[CLModel, dict]:
    """The pre-trained backbone (with LoRA if configured) and no heads; the record of its weights."""
    backbone = create_backbone(cfg.backbone, image_size=cfg.benchmark.image_size)
    record = weights_record(cfg.backbone, backbone)
    if cfg.lora.targets:  # task 0: A from the SVD of the pre-trained weights, B = 0
        apply_lora(backbone, cfg.lora.targets, cfg.lora.rank, cfg.lora.scale, svd_init=True)
    return CLModel(backbone, Heads(int(backbone.embed_dim))).to(device), record


# --- optimisation -------------------------------------------------------------


def param_groups(model: CLModel, cfg: RunConfig, task: int) -> list[dict]:
    """SGD groups for task `task`: the newest head; the backbone's trainable parameters; LoRA.

    - head: `train.lr`;
    - backbone: `train.lr * train.backbone_lr_scale` over all parameters
      (`trainable: all`) or only those named norm, bias or cls_token
      (`trainable: peft`); a scale of 0 freezes them;
    - lora: `lora.lr_first` at task 0, `lora.lr` later.
    Sets `requires_grad` to match (older heads and everything else get False).
    """
    t = cfg.train
    scale = float(t.backbone_lr_scale or 0.0)
    for h in model.heads.heads[:-1]:
        h.requires_grad_(False)
    head = model.heads.heads[-1]
    head.requires_grad_(True)
    model.backbone.requires_grad_(False)
    backbone, lora = [], []
    for name, p in model.backbone.named_parameters():
        if "lora" in name:
            lora.append(p)
        elif scale > 0 and (t.trainable == Trainable.all or is_peft_trainable(name)):
            backbone.append(p)
    groups: list[dict] = [{"name": "head", "params": list(head.parameters()), "lr": t.lr}]
    if backbone:
        groups.append({"name": "backbone", "params": backbone, "lr": t.lr * scale})
    if lora:
        groups.append({"name": "lora", "params": lora, "lr": cfg.lora.lr_first if task == 0 else cfg.lora.lr})
    for g in groups[1:]:
        for p in g["params"]:
            p.requires_grad_(True)
    return groups


def task_loss(logits: torch.Tensor, labels: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    if cfg.train.loss == Loss.sce:
        return sce_loss(logits, labels, cfg.train.sce_alpha, cfg.train.sce_beta)
    return F.cross_entropy(logits, labels, label_smoothing=cfg.train.label_smoothing)


def make_optimizer(groups: list[dict], cfg: RunConfig) -> torch.optim.Optimizer:
    """SGD with momentum (SLCA), or AdamW with torch's default betas (SLDC), over the LR groups."""
    t = cfg.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def cosine_to_share(epochs: int, floor: float):
    """LambdaLR factor: cosine from 1 to `floor` over `epochs` (each group's own LR times the factor)."""
    return lambda e: floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(e, epochs) / epochs))


def make_scheduler(opt: torch.optim.Optimizer, cfg: RunConfig):
    t = cfg.train
    if t.schedule == Schedule.cosine and t.cosine_floor is not None:  # SLDC: down to lr / 3 per group
        return torch.optim.lr_scheduler.LambdaLR(opt, cosine_to_share(t.epochs, t.cosine_floor))
    if t.schedule == Schedule.cosine:  # floor of the reference code: 1e-3 * gamma ** len(milestones)
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=t.epochs, eta_min=1e-3 * t.gamma ** len(t.milestones)
        )
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=t.milestones, gamma=t.gamma)


class _TaskNet(nn.Module):
    """Backbone + the current head: what one SL step differentiates (wrapped in DDP when distributed).

    Returns (logits, features): the features feed the distillation term when it is on."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, train_backbone: bool):
        super().__init__()
        self.backbone, self.head, self.train_backbone = backbone, head, train_backbone

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.train_backbone:
            feats = self.backbone(x)
        else:
            with torch.no_grad():
                feats = self.backbone(x)
        return self.head(feats), feats


def train_task(model: CLModel, bench: Benchmark, cfg: RunConfig, t: int, device: torch.device) -> dict:
    """Slow Learner on task t: adds its head and trains in place. Returns a summary."""
    classes = bench.tasks[t]
    torch.manual_seed(task_seed(cfg.seed, t))
    model.heads.add(len(classes))
    model.to(device)
    groups = param_groups(model, cfg, t)
    train_backbone = any(g["name"] in ("backbone", "lora") for g in groups)
    opt = make_optimizer(groups, cfg)
    sched = make_scheduler(opt, cfg)
    tc = cfg.train
    teacher = None  # the backbone as the task starts: theta_{t-1} (the pre-trained one at t = 0)
    if train_backbone and (tc.kd_feat > 0 or tc.kd_norm > 0) and (t > 0 or tc.kd_first_task):
        teacher = copy.deepcopy(model.backbone).eval().requires_grad_(False)
    net: nn.Module = _TaskNet(model.backbone, model.heads.heads[-1], train_backbone)  # type: ignore[arg-type]
    world = dist.world_size()
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    per_rank_batch = -(-cfg.train.batch_size // world)
    gen = torch.Generator().manual_seed(task_seed(cfg.seed, t, LOADER))
    loader = batches(
        bench,
        bench.train,
        bench.train.indices_of(classes),
        per_rank_batch,
        device,
        train=True,
        generator=gen,
        rank=dist.rank(),
        world_size=world,
        num_workers=cfg.system.num_workers,
    )
    prec = P.resolve(cfg.system.precision, device)
    model.train()
    losses = []
    t0 = time.perf_counter()
    n_images = -(-len(loader.indices) // world)  # this rank's share
    during: list[dict] = []
    for epoch in range(cfg.train.epochs):
        total, correct, loss_sum = 0, 0, 0.0
        with progress.bar(f"task {t} train, epoch {epoch + 1}/{cfg.train.epochs}", n_images) as shown:
            for x, y in loader:
                shown.advance(len(y))
                y_local = y - classes.start  # labels within the current task
                with P.autocast(prec, device):  # the forward pass only; the loss in float32
                    logits, feats = net(x)  # (B, |task|): the current task's logits only
                    if teacher is not None:
                        with torch.no_grad():
                            prev = teacher(x)
                logits = logits.float()
                loss = task_loss(logits, y_local, cfg)
                if teacher is not None:
                    loss = loss + distillation_loss(feats, prev, tc.kd_feat, tc.kd_norm)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                value = loss.item()
                if not math.isfinite(value):  # stop before a NaN model is written
                    raise ClptError(
                        f"training of task {t} diverged: the loss became {value} in epoch {epoch + 1}",
                        hint="lower train.lr (or train.backbone_lr_scale) and re-run the task with --force",
                    )
                loss_sum += value * len(y)
                total += len(y)
                correct += (logits.argmax(1) == y_local).sum().item()
        sched.step()
        every = cfg.system.eval_every
        if every and (epoch + 1) % every == 0:
            acc = test_accuracy(model, bench, classes.stop, cfg, device, prec)
            during.append({"epoch": epoch + 1, "test_acc": round(acc, 6)})
            log.info(
                "task %d epoch %d: test accuracy on classes 0-%d: %.4f", t, epoch + 1, classes.stop - 1, acc
            )
            model.train()
        losses.append(loss_sum / max(total, 1))
        log.info(
            "task %d epoch %d/%d: loss %.4f, train acc %.3f (%.0f s)",
            t,
            epoch + 1,
            cfg.train.epochs,
            losses[-1],
            correct / max(total, 1),
            time.perf_counter() - t0,
        )
    model.eval()
    return {
        "epoch_loss": [round(v, 6) for v in losses],
        "train_images": int(len(loader.indices)),
        "images_seen": int(len(loader.indices)) * cfg.train.epochs,
        **({"test_acc_during_training": during} if during else {}),
        "precision": prec,
        **({"distillation": {"kd_feat": tc.kd_feat, "kd_norm": tc.kd_norm}} if teacher is not None else {}),
    }


def test_accuracy(model: CLModel, bench: Benchmark, n_seen: int, cfg: RunConfig, device, prec: str) -> float:
    """Accuracy of the model's current heads on the test images of classes 0..n_seen-1 (argmax over all).

    Monitoring only: the random number generators are restored afterwards, so a run trains the same
    with and without it. Every rank evaluates the whole test set (no collective needed).
    """
    rows = bench.test.indices_of(range(0, n_seen))
    correct = 0
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        for x, y in batches(bench, bench.test, rows, cfg.system.extract_batch_size, device, train=False,
                            num_workers=cfg.system.num_workers):  # fmt: skip
            with P.autocast(prec, device):
                logits = model(x).float()
            correct += int((logits.argmax(1) == y).sum())
    return correct / max(len(rows), 1)


def train_task_sl(model, bench, cfg, t: int, device: torch.device, learner_state: dict) -> dict:
    """The Slow Learner as a registered learner (it keeps no state across tasks)."""
    return train_task(model, bench, cfg, t, device)


def no_training(model, bench, cfg, t: int, device: torch.device, learner_state: dict) -> dict:
    """The frozen-backbone learner of SimpleCIL and RanPAC without phase 1: only a (untrained) task head."""
    model.heads.add(len(bench.tasks[t]))
    return {"train_images": 0}
