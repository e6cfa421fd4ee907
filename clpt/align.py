"""Classifier Alignment on class statistics (docs/methods/slca.md, stage 3).

Only for tasks after the first; the backbone is not used. Each epoch draws
`samples_per_class` features per seen class from N(mu_c', Sigma_c), shuffles
them and makes one pass in mini-batches, training all heads with a
logit-normalised cross-entropy. Each Sigma_c is factored once (Cholesky in
float64, then float32) and all classes are sampled with one batched matmul.
The aligned heads are what `eval` scores; the next task trains from the
pre-alignment heads, and alignment is redone from scratch for each task.

SLDC's classifier refinement (docs/methods/drift.md) is the same loop with other
options: Adam (`align.optimizer`), symmetric cross-entropy of the raw logits
(`align.loss: sce`), a cosine floor (`align.lr_min`), a batch that grows with
the classes (`align.batch_per_class`), one draw of samples for all epochs
(`align.resample: false`), and a refinement at task 0 too (`align.first_task`).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from clpt import progress
from clpt.config import RunConfig
from clpt.errors import ClptError
from clpt.losses import sce_loss
from clpt.model import Heads
from clpt.seeding import ALIGN, task_seed
from clpt.stats import Scatter, class_blocks, covariance

log = logging.getLogger("clpt")


def ca_loss(logits: torch.Tensor, labels: torch.Tensor, sizes: list[int], tau: float) -> torch.Tensor:
    """CE(z / (n * tau), y), n = per-sample mean over tasks of each task block's L2 logit norm."""
    norms = torch.stack([b.norm(p=2, dim=1) + 1e-7 for b in logits.split(sizes, dim=1)], dim=1)  # (B, T)
    n = norms.mean(dim=1, keepdim=True)  # (B, 1)
    return F.cross_entropy(logits / (n * tau), labels)


def mean_scale_slca(task_of_class: torch.Tensor, current_task: int) -> torch.Tensor:
    """SLCA's mean shrink: 0.9 + 0.1 * (t_c + 1) / (T + 1) per class."""
    return 0.9 + 0.1 * (task_of_class.to(torch.float64) + 1) / (current_task + 1)


def sample_scale_slca_pp(
    task_of_sample: torch.Tensor, current_task: int, generator: torch.Generator
) -> torch.Tensor:
    """SLCA++: per-sample factor 1 / (1 + s (T - t_c)), s ~ U(0.01, 0.03) drawn per sample."""
    s = torch.empty(task_of_sample.shape, device=task_of_sample.device).uniform_(
        0.01, 0.03, generator=generator
    )
    return 1.0 / (1.0 + s * (current_task - task_of_sample).to(s.dtype))


def head_input_scales(n_heads: int, current_task: int) -> torch.Tensor:
    """SLCA++: fixed input scale 1 + 0.02 (T - j) of head j at inference after alignment."""
    return 1.0 + 0.02 * (current_task - torch.arange(n_heads, dtype=torch.float32))


def cholesky_float32(covs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, d, d) lower Cholesky factors, factorised in float64 and stored in float32, and LAPACK's info
    per class (0: positive definite). On a CPU one class at a time, so the float64 factor is a
    cache-sized block rather than an array as large as the covariances; the same LAPACK call per matrix
    as a batched one, so the same bits."""
    out = torch.empty(covs.shape, dtype=torch.float32, device=covs.device)
    info = torch.zeros(len(covs), dtype=torch.int32, device=covs.device)
    for k in class_blocks(len(covs), covs.device):
        out[k], info[k] = torch.linalg.cholesky_ex(covs[k].to(torch.float64))
    return out, info


class GaussianSampler:
    """Samples features of C classes from N(mu_c, Sigma_c), Sigma_c in the statistics' covariance form.

    full: Cholesky factors, x = mu + L z. diagonal: x = mu + sigma * z. lowrank (Sigma = U diag(a) U^T +
    b (I - U U^T)): x = mu + sqrt(b) z + U diag(sqrt(a) - sqrt(b)) U^T z, whose covariance is exactly that
    Sigma, at O(d r) per sample. Every form draws the same standard normals z (C, S, d).
    """

    form: str
    mean: torch.Tensor  # (C, d)
    chol: torch.Tensor  # full: (C, d, d), lower
    std: torch.Tensor  # diagonal: (C, d)
    s: torch.Tensor  # lowrank: (C,) sqrt(b)
    t: torch.Tensor  # lowrank: (C, r) sqrt(a)
    u: torch.Tensor  # lowrank: (C, d, r)

    def __init__(self, means: torch.Tensor, covs: torch.Tensor, device: torch.device):
        chol, info = cholesky_float32(covs)
        bad = torch.nonzero(info).flatten().tolist()
        if bad:
            raise ClptError(
                f"covariance of class(es) {bad[:10]} is not positive definite",
                hint="raise stats.ridge (published: 1e-4); it is added where the statistics are used",
            )
        self.form = "full"
        self.mean = means.to(device=device, dtype=torch.float32)  # (C, d)
        self.chol = chol.to(device=device)  # (C, d, d), lower
        self.device = device

    @classmethod
    def from_stats(cls, count: torch.Tensor, mean: torch.Tensor, scatter: Scatter, ridge: float,
                   device: torch.device) -> GaussianSampler:  # fmt: skip
        """The sampler of covariance M2 / (n - 1) + ridge I (ridge I alone for a class of < 2 rows)."""
        if scatter.form == "full":
            return cls(mean, covariance(count, scatter.full(), ridge), device)
        denom = torch.where(count >= 2, count.to(torch.float64) - 1, torch.full_like(count, math.inf,
                                                                                      dtype=torch.float64))  # fmt: skip
        self = cls.__new__(cls)
        self.form, self.device = scatter.form, device
        self.mean = mean.to(device=device, dtype=torch.float32)
        if scatter.form == "diagonal":
            self.std = (scatter.diagonal() / denom[:, None] + ridge).sqrt().to(device, torch.float32)
        else:
            assert scatter.basis is not None and scatter.eigval is not None and scatter.resid is not None
            self.s = (scatter.resid / denom + ridge).sqrt().to(device, torch.float32)  # (C,)
            self.t = (scatter.eigval / denom[:, None] + ridge).sqrt().to(device, torch.float32)  # (C, r)
            self.u = scatter.basis.to(device, torch.float32)  # (C, d, r)
        return self

    def sample(self, per_class: int, generator: torch.Generator, mean_scale: torch.Tensor | None = None):
        """(C * per_class, d) features and (C * per_class,) class indices, grouped by class."""
        c, d = self.mean.shape
        mu = self.mean if mean_scale is None else self.mean * mean_scale.to(self.mean)[:, None]
        z = torch.randn(c, per_class, d, generator=generator, device=self.device)  # (C, S, d)
        if self.form == "full":
            x = mu[:, None, :] + torch.bmm(z, self.chol.transpose(1, 2))  # (C, S, d)
        elif self.form == "diagonal":
            x = mu[:, None, :] + z * self.std[:, None, :]
        else:
            coef = torch.bmm(z, self.u) * (self.t - self.s[:, None])[:, None, :]  # (C, S, r)
            x = mu[:, None, :] + z * self.s[:, None, None] + torch.bmm(coef, self.u.transpose(1, 2))
        labels = torch.arange(c, device=self.device).repeat_interleave(per_class)
        return x.reshape(c * per_class, d), labels


def align_heads(
    heads: Heads,
    sampler: GaussianSampler,
    task_of_class: torch.Tensor,
    current_task: int,
    cfg: RunConfig,
    device: torch.device,
    seed: int,
    label: str = "",
) -> list[float]:
    """Train all heads in place on sampled features; returns the mean loss per epoch.

    `label` names a progress bar over the epochs ("" shows none)."""
    a = cfg.align
    heads.to(device).train()
    heads.input_scale.fill_(1.0)  # trained unscaled; SLCA++ scales old heads' inputs afterwards
    task_of_class = task_of_class.to(device)
    n_classes = len(sampler.mean)
    shrink = mean_scale_slca(task_of_class, current_task) if a.mean_shrink else None
    # the heads are trained as one matrix, their concatenation, and written back at the end: every head's
    # logits, gradients and optimizer updates are the same arithmetic element by element as training each
    # head's own parameters (both optimizers are elementwise), with one step of two tensors per batch
    # instead of two per task head, and no concatenation of the weights per batch
    linears: list[torch.nn.Linear] = list(heads.heads)  # type: ignore[arg-type]  # each is an nn.Linear
    weight = torch.nn.Parameter(torch.cat([h.weight.detach() for h in linears]))
    bias = torch.nn.Parameter(torch.cat([h.bias.detach() for h in linears]))
    if a.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam([weight, bias], lr=a.lr, weight_decay=cfg.align_weight_decay)
    else:
        opt = torch.optim.SGD([weight, bias], lr=a.lr, momentum=a.momentum, weight_decay=cfg.align_weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=a.epochs, eta_min=a.lr_min)
    gen = torch.Generator(device=device).manual_seed(seed)
    sizes = heads.sizes
    batch = a.batch_size if a.batch_per_class is None else max(1, int(a.batch_per_class * n_classes))
    losses = []
    drawn = None
    with progress.bar(label, a.epochs, unit="epoch") as shown:
        for _ in range(a.epochs):
            if drawn is None or a.resample:
                x, y = sampler.sample(a.samples_per_class, gen, shrink)
                if a.sample_scale:
                    x = x * sample_scale_slca_pp(task_of_class[y], current_task, gen)[:, None]
                drawn = x, y
            x, y = drawn
            perm = torch.randperm(len(y), generator=gen, device=device)
            x, y = x[perm], y[perm]
            total = 0.0
            for start in range(0, len(y), batch):
                xb, yb = x[start : start + batch], y[start : start + batch]
                logits = F.linear(xb, weight, bias)  # the input scales are 1 while the heads are aligned
                if a.loss == "sce":
                    loss = sce_loss(logits, yb, a.sce_alpha, a.sce_beta)
                else:
                    loss = ca_loss(logits, yb, sizes, a.tau)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(yb)
            sched.step()
            losses.append(total / len(y))
            if not math.isfinite(losses[-1]):  # stop before NaN heads are saved and scored
                raise ClptError(
                    f"classifier alignment of task {current_task} diverged: the loss became {losses[-1]}",
                    hint="lower align.lr (clpt config RUN --set align.lr=...) and run again",
                )
            shown.advance()
    with torch.no_grad():
        for h, w, b in zip(linears, weight.split(sizes), bias.split(sizes), strict=True):
            h.weight.copy_(w)
            h.bias.copy_(b)
    heads.eval()
    if a.head_scale:
        heads.input_scale.copy_(head_input_scales(len(sizes), current_task).to(heads.input_scale))
    return losses


def align_on_stats(
    heads: Heads, stats, current_task: int, cfg: RunConfig, device: torch.device, label: str = ""
) -> list[float]:
    """Align `heads` in place on the class statistics of tasks 0..current_task (a `ClassStats`).

    The ridge (`stats.ridge`, docs/methods/slca.md) is added to the stored covariances here, where it is used.
    """
    if len(stats.mean) != heads.n_classes:
        raise ClptError(
            f"statistics cover {len(stats.mean)} classes but the heads have {heads.n_classes}",
            hint=f"redo the class statistics of tasks 0..{current_task} with --force",
        )
    sampler = GaussianSampler.from_stats(stats.count, stats.mean, stats.scatter, cfg.stats.ridge, device)
    seed = task_seed(cfg.seed, current_task, ALIGN)
    tasks = class_tasks(stats.task_of_class, current_task, cfg.align.task_of_class)
    return align_heads(heads, sampler, tasks, current_task, cfg, device, seed, label)


def class_tasks(true_tasks: torch.Tensor, current_task: int, mode: str = "true") -> torch.Tensor:
    """The task index t_c of each class as alignment uses it (mean shrink, SLCA++'s scales).

    "true": the task the class was learned in. "authors": `class // size of the current task`, as
    the authors' code computes it; equal to the true task while all tasks have one size, different
    at Cars-196's last step (a 16-class task after nine of 20), where it reproduces their number.
    """
    if mode == "true":
        return true_tasks
    size = int((true_tasks == current_task).sum())
    return torch.arange(len(true_tasks), device=true_tasks.device) // size
