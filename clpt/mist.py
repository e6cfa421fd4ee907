"""MIST: Mutual-Information-guided Sparse Tuning as a learner (docs/methods/mist.md; arXiv 2505.19943).

At the start of every task (or the first only, `mist.first_task_only`), on that
task's data only:
1. epoch 1, the sensitivity pass: the supervised NT-Xent ("MI") loss is
   back-propagated per mini-batch, the gradient zeroed where `frozen_prev`, and
   S += g^2 / N_batches accumulated; no parameter changes;
2. per eligible tensor (cls_token, pos_embed, patch_embed.proj.weight and each
   block's attn.qkv / attn.proj / mlp.fc1 / mlp.fc2 weights) the mask
   S >= quantile(S, 1 - select); always-on tensors (names with bias or norm, and
   the projection head) are fully selected;
3. epochs 2..E: per step, gradient zeroed where `frozen_prev` (eligible tensors),
   times mask times a fresh Bernoulli(keep) per entry (no 1/p rescaling), times
   decay ** overlap, zeroed again where `frozen_prev`; one SGD step on the full
   tensors (so weight decay and momentum move every entry, as in the authors'
   code; `mist.mask_update: true` keeps unselected entries bit-identical, the
   paper's description);
4. after the task, eligible tensors: frozen |= S >= quantile(S, q); overlap += mask.

The projection head g (d -> 128) and the per-tensor `frozen` / `overlap` state
persist across tasks in the model checkpoint. The masks are applied with a few
fused tensor operations per step (no loop over elements, no host sync).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
import time

import torch
import torch.nn.functional as F
from torch import nn

from clpt import distributed as dist
from clpt import precision as P
from clpt import progress
from clpt.data.loader import batches
from clpt.errors import ClptError
from clpt.losses import distillation_loss
from clpt.seeding import LOADER, MIST_VIEW, task_seed

log = logging.getLogger("clpt")

ELIGIBLE = re.compile(
    r"^(cls_token|pos_embed|patch_embed\.proj\.weight|blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight)$"
)


# --- the MI loss -----------------------------------------------------------------------------


def mi_loss(z: torch.Tensor, labels: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """Supervised NT-Xent of docs/methods/mist.md. z (2B, k): views 1..B then their second views.

    l_ij = -log(e_ij / (D_i + 1e-8) + 1e-8) with e_ii = 0; positives include i itself,
    whose term is the constant -log(1e-8): it weights real positives by 1 / n_i.
    """
    n = z.shape[0]
    b = n // 2
    zn = z / (z.norm(dim=1, keepdim=True) + 1e-8)
    s = zn @ zn.T  # (2B, 2B)
    m = s.max(dim=1, keepdim=True).values.detach()  # diagonal included
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    e = torch.exp((s - m) / tau).masked_fill(eye, 0.0)
    d = e.sum(dim=1, keepdim=True)
    nll = -torch.log(e / (d + 1e-8) + 1e-8)  # (2B, 2B)
    y = torch.cat([labels, labels])
    pos = (y[:, None] == y[None, :]).to(z.dtype)  # includes the diagonal
    idx = torch.arange(b, device=z.device)
    pair = (nll[idx, idx + b] + nll[idx + b, idx]).sum() / (2 * b)
    sup = ((nll * pos).sum(dim=1) / pos.sum(dim=1)).sum() / b
    return pair + sup


def global_mi_loss(z: torch.Tensor, labels: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """`mi_loss` over the global batch: under torchrun every rank's projections (with their gradient)
    and labels are gathered first, as [views 1 of ranks 0..k-1, second views of ranks 0..k-1], so each
    anchor sees the whole batch's negatives, as in one process. Every rank then holds the same loss; the
    gather's backward sums each piece's gradient over the ranks (k times the global one) and DDP's mean
    divides by k, so the ranks step on exactly the one-process gradient. One process: `mi_loss(z)`."""
    if dist.world_size() == 1:
        return mi_loss(z, labels, tau)
    b = z.shape[0] // 2
    first = dist.all_gather_with_grad(z[:b])
    second = dist.all_gather_with_grad(z[b:])
    y = torch.cat(dist.all_gather(labels))
    return mi_loss(torch.cat([*first, *second]), y, tau)


# --- the second view, on the device ------------------------------------------------------------


def crop_boxes(b: int, h: int, w: int, generator: torch.Generator, device, mode: str = "authors"):
    """Per image (sw, sh, tx, ty): the crop's width and height as shares of the image and its centre's
    offset, in affine-grid units (align_corners=False).

    `authors` (MIST's code): 10 candidates per image, area U(0.3, 1) x h w and log-aspect
    U(log 3/4, log 4/3), sides rounded to whole pixels; the first candidate that fits the image
    (0 < side <= image side) is taken (the centre crop of the whole image when none does); its top-left
    corner uniform over the whole pixels that keep it inside, so its centre moves in half-pixel steps.
    `continuous` (clpt before): one draw, sides clamped at the image's, whole-pixel centre offsets."""

    def u(*shape):
        return torch.rand(*shape, generator=generator, device=device)

    lo, hi = math.log(3 / 4), math.log(4 / 3)
    if mode == "continuous":
        area = 0.3 + 0.7 * u(b)  # U(0.3, 1)
        ar = torch.exp(lo + (hi - lo) * u(b))
        sw = torch.sqrt(area * ar).clamp(max=1.0)  # crop width / image width
        sh = torch.sqrt(area / ar).clamp(max=1.0)
        # integer translation (in pixels) that keeps the crop inside the image, as a grid offset
        max_tx, max_ty = ((1 - sw) * w / 2).floor(), ((1 - sh) * h / 2).floor()
        tx = torch.round((2 * u(b) - 1) * max_tx) * 2 / w
        ty = torch.round((2 * u(b) - 1) * max_ty) * 2 / h
        return sw, sh, tx, ty
    area = (0.3 + 0.7 * u(b, 10)) * (h * w)
    ar = torch.exp(lo + (hi - lo) * u(b, 10))
    cw, ch = torch.sqrt(area * ar).round(), torch.sqrt(area / ar).round()
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.int().argmax(1)  # the first candidate that fits (0 when none does)
    rows = torch.arange(b, device=device)
    any_fits = fits.any(1)
    cw = torch.where(any_fits, cw[rows, first], torch.full_like(cw[:, 0], w))
    ch = torch.where(any_fits, ch[rows, first], torch.full_like(ch[:, 0], h))
    x0 = torch.floor(u(b) * (w - cw + 1)).clamp(max=w - cw)  # top-left corner, whole pixels
    y0 = torch.floor(u(b) * (h - ch + 1)).clamp(max=h - ch)
    return cw / w, ch / h, (2 * x0 + cw) / w - 1, (2 * y0 + ch) / h - 1


def second_view(x: torch.Tensor, generator: torch.Generator, crop: str = "authors") -> torch.Tensor:
    """h-flip p 0.5, grayscale p 0.25, random resized crop by an affine grid (docs/methods/mist.md;
    `crop_boxes` for the crop)."""
    b, _, h, w = x.shape
    dev = x.device

    def u(*shape):
        return torch.rand(*shape, generator=generator, device=dev)

    flip = u(b) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    gray = u(b) < 0.25
    lum = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None].expand_as(x)
    x = torch.where(gray[:, None, None, None], lum, x)
    sw, sh, tx, ty = crop_boxes(b, h, w, generator, dev, crop)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = sw, sh, tx, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# --- per-tensor quantiles and masks --------------------------------------------------------------


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(x.flatten(), q) (linear interpolation), for tensors of any size (kthvalue)."""
    flat = x.flatten()
    n = flat.numel()
    pos = q * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    v_lo = flat.kthvalue(lo + 1).values
    if hi == lo:
        return v_lo
    v_hi = flat.kthvalue(hi + 1).values
    return v_lo + (v_hi - v_lo) * (pos - lo)


class MistState(nn.Module):
    """Per eligible backbone tensor: `frozen` (bool) and `overlap` (int counts); kept across tasks."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.names = [n for n, _ in backbone.named_parameters() if ELIGIBLE.match(n)]
        for n, p in backbone.named_parameters():
            if ELIGIBLE.match(n):
                key = n.replace(".", "__")
                self.register_buffer(f"frozen__{key}", torch.zeros_like(p, dtype=torch.bool))
                self.register_buffer(f"overlap__{key}", torch.zeros_like(p, dtype=torch.int32))

    def frozen(self, name: str) -> torch.Tensor:
        return getattr(self, f"frozen__{name.replace('.', '__')}")

    def overlap(self, name: str) -> torch.Tensor:
        return getattr(self, f"overlap__{name.replace('.', '__')}")


class MistModel(nn.Module):
    """What a MIST step differentiates: backbone features -> projection head (wrapped in DDP when distributed)."""

    def __init__(self, backbone: nn.Module, proj: nn.Module):
        super().__init__()
        self.backbone, self.proj = backbone, proj

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projections, backbone features): the features feed the distillation term when it is on."""
        feats = self.backbone(x)
        return self.proj(feats), feats


def make_projection(dim: int, out: int = 128, seed: int = 0) -> nn.Linear:
    """Linear(d -> 128) with bias, default init (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(dim, out)


def sensitivity(
    net, loader, state: MistState, tau: float, generator, frozen_prev: dict, amp=contextlib.nullcontext,
    crop: str = "authors",
) -> dict:
    """Epoch 1: S = sum over mini-batches of g^2 / N_batches per eligible tensor; no parameter changes."""
    params = (
        dict(net.backbone.named_parameters())
        if not hasattr(net, "module")
        else dict(net.module.backbone.named_parameters())
    )
    scores = {n: torch.zeros_like(params[n]) for n in state.names}
    n_batches = 0
    for x, y in loader:
        x2 = torch.cat([x, second_view(x, generator, crop)])
        with amp():
            z, _ = net(x2)
        loss = global_mi_loss(z.float(), y, tau)
        net.zero_grad(set_to_none=True)
        loss.backward()
        for n in state.names:
            g = params[n].grad
            if g is not None:
                scores[n] += g.masked_fill(frozen_prev[n], 0.0).square()
        n_batches += 1
    net.zero_grad(set_to_none=True)
    return {n: s / max(n_batches, 1) for n, s in scores.items()}


def build_masks(scores: dict, select: float) -> dict:
    """Per eligible tensor: S >= quantile(S, 1 - select) (the top `select` share of its entries)."""
    return {n: s >= quantile(s, 1.0 - select) for n, s in scores.items()}


class GradientMasker:
    """Step 3 of the module docstring, prepared once per task and applied to every step's gradients.

    Per eligible tensor the factor mask * ~frozen_prev * decay ** overlap is fixed for
    the task, so it is computed once; a step then costs one random draw, a compare
    and two multiplies per tensor (no loop over elements, no host synchronisation).
    """

    def __init__(self, masks: dict, frozen_prev: dict, overlap: dict, keep: float, decay: float):
        self.keep = keep
        self.scale = {n: (masks[n] & ~frozen_prev[n]) * torch.pow(decay, overlap[n].float()) for n in masks}
        self.active = {n: s > 0 for n, s in self.scale.items()}

    def __call__(self, params: dict, generator: torch.Generator, movable: bool = True) -> dict:
        """In place on `params`' gradients; returns, per tensor, the entries whose gradient passes.

        `movable=False` skips building that mask (a step that needs neither the
        whole-update option nor the share statistic).
        """
        out = {}
        for n, p in params.items():
            if p.grad is None:
                continue
            keep = torch.rand(p.shape, generator=generator, device=p.device) < self.keep
            scale = self.scale.get(n)
            if scale is None:  # always-on tensors (bias, norm, projection head): mask all ones
                p.grad.mul_(keep)
                if movable:
                    out[n] = keep
            else:
                p.grad.mul_(scale).mul_(keep)
                if movable:
                    out[n] = keep & self.active[n]
        return out


def train_task_mist(model, bench, cfg, t: int, device: torch.device, learner_state: dict) -> dict:
    """MIST on task t, in place on model.backbone.

    `learner_state` (a flat tensor dict kept in the model checkpoint) holds the
    projection head (`proj.*`) and the per-tensor `frozen` / `overlap` state
    (`masks.*`) from the previous task, and receives them updated.
    """
    mc = cfg.mist
    classes = bench.tasks[t]
    model.heads.add(len(classes))  # untrained task head: the method's classifier is a statistics head
    backbone = model.backbone.to(device)
    proj = make_projection(model.dim, mc.proj_dim, cfg.seed)
    state = MistState(backbone)
    if learner_state:
        proj.load_state_dict({k[5:]: v for k, v in learner_state.items() if k.startswith("proj.")})
        state.load_state_dict({k[6:]: v for k, v in learner_state.items() if k.startswith("masks.")})
    if t > 0 and mc.first_task_only:
        return {"mist": "skipped (first_task_only)", "train_images": 0}
    proj, state = proj.to(device), state.to(device)
    tc = cfg.train  # feature distillation to the backbone as the task starts (SLDC's beta variants)
    teacher = None
    if (tc.kd_feat > 0 or tc.kd_norm > 0) and (t > 0 or tc.kd_first_task):
        teacher = copy.deepcopy(backbone).eval().requires_grad_(False)
    net: nn.Module = MistModel(backbone, proj)
    world = dist.world_size()
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    backbone.requires_grad_(True)
    proj.requires_grad_(True)
    named = dict(backbone.named_parameters())
    frozen_prev = {n: state.frozen(n).clone() for n in state.names}
    overlap = {n: state.overlap(n) for n in state.names}
    gen = torch.Generator(device=device).manual_seed(task_seed(cfg.seed, t, MIST_VIEW))
    loader_gen = torch.Generator().manual_seed(task_seed(cfg.seed, t, LOADER))
    loader = batches(
        bench, bench.train, bench.train.indices_of(classes), -(-mc.batch_size // world), device,
        train=True, generator=loader_gen, rank=dist.rank(), world_size=world, num_workers=cfg.system.num_workers,
    )  # fmt: skip
    net.train()
    t0 = time.perf_counter()
    prec = P.resolve(cfg.system.precision, device)

    def amp():
        return P.autocast(prec, device)

    scores = sensitivity(net, loader, state, mc.tau, gen, frozen_prev, amp, mc.view_crop)
    masks = build_masks(scores, mc.select)
    opt = torch.optim.SGD(
        [{"params": list(backbone.parameters()), "lr": mc.backbone_lr},
         {"params": list(proj.parameters()), "lr": mc.proj_lr}],
        momentum=mc.momentum, weight_decay=mc.weight_decay,
    )  # fmt: skip
    all_params = {**named, **{f"proj.{k}": v for k, v in proj.named_parameters()}}
    masker = GradientMasker(masks, frozen_prev, overlap, mc.keep, mc.decay)
    losses, shares = [], []
    for epoch in range(1, mc.epochs):
        total, n = torch.zeros((), device=device), 0
        moved = torch.zeros((), device=device)
        with progress.bar(
            f"task {t} MIST, epoch {epoch + 1}/{mc.epochs}", -(-len(loader.indices) // world)
        ) as shown:
            for step, (x, y) in enumerate(loader):
                shown.advance(len(y))
                x2 = torch.cat([x, second_view(x, gen, mc.view_crop)])
                with amp():
                    z, feats = net(x2)
                    if teacher is not None:
                        with torch.no_grad():
                            prev = teacher(x2)
                loss = global_mi_loss(z.float(), y, mc.tau)
                if teacher is not None:
                    loss = loss + distillation_loss(feats, prev, tc.kd_feat, tc.kd_norm)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                sample = step == 0  # the share statistic: the epoch's first step
                movable = masker(all_params, gen, movable=mc.mask_update or sample)
                if mc.mask_update:
                    before = {k: p.detach().clone() for k, p in all_params.items()}
                opt.step()
                if mc.mask_update:  # the paper's words: entries not selected this step stay bit-identical
                    with torch.no_grad():
                        for k, p in all_params.items():
                            sel = movable.get(k)
                            p.copy_(before[k] if sel is None else torch.where(sel, p, before[k]))
                if sample:  # backbone entries whose gradient passes, on one step per epoch
                    moved += sum(movable[k].sum() for k in named if k in movable)
                total += loss.detach() * len(y)
                n += len(y)
        losses.append(float(total) / max(n, 1))  # one host sync per epoch
        if not math.isfinite(losses[-1]):  # stop before a NaN backbone is written
            raise ClptError(
                f"MIST on task {t} diverged: the loss became {losses[-1]} in epoch {epoch + 1}",
                hint="lower mist.backbone_lr and re-run the task with --force",
            )
        shares.append(float(moved) / sum(named[k].numel() for k in named))
        log.info("task %d MIST epoch %d/%d: loss %.4f (%.0f s)", t, epoch + 1, mc.epochs, losses[-1],
                 time.perf_counter() - t0)  # fmt: skip
    with torch.no_grad():
        for k in state.names:  # after the task: freeze the most sensitive entries; count selections
            state.frozen(k).logical_or_(scores[k] >= quantile(scores[k], mc.frozen_quantile))
            state.overlap(k).add_(masks[k].to(torch.int32))
    backbone.requires_grad_(False)
    learner_state.clear()
    learner_state.update({f"proj.{k}": v.detach().cpu() for k, v in proj.state_dict().items()})
    learner_state.update({f"masks.{k}": v.cpu() for k, v in state.state_dict().items()})
    selected = sum(int(masks[k].sum()) for k in state.names) + sum(
        p.numel() for k, p in named.items() if k not in masks
    )
    return {
        "epoch_loss": [round(v, 6) for v in losses],
        "selected_share": selected / sum(p.numel() for p in named.values()),
        "updated_share_per_step": round(sum(shares) / max(len(shares), 1), 6),
        "train_images": int(len(loader.indices)),
        "images_seen": int(len(loader.indices)) * mc.epochs * 2,  # two views per image, every epoch
        "precision": prec,
        **({"distillation": {"kd_feat": tc.kd_feat, "kd_norm": tc.kd_norm}} if teacher is not None else {}),
    }
