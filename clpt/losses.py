"""Losses shared by training and alignment."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sce_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """a * CE(z, y) + b * mean(-sum_k p_k log q_k), p = clamp(softmax z, 1e-7, 1), q = clamp(onehot y, 1e-4, 1)."""
    ce = F.cross_entropy(logits, labels)
    p = F.softmax(logits, dim=1).clamp(min=1e-7, max=1.0)
    q = F.one_hot(labels, logits.shape[1]).to(logits.dtype).clamp(min=1e-4, max=1.0)
    rce = (-(p * torch.log(q)).sum(dim=1)).mean()
    return alpha * ce + beta * rce


def distillation_loss(
    feats: torch.Tensor, teacher: torch.Tensor, w_feat: float, w_norm: float
) -> torch.Tensor:
    """SLDC's feature distillation: w_feat mean((f_prev - f)^2) + w_norm mean((||f_prev|| - ||f||)^2)."""
    feats, teacher = feats.float(), teacher.float()
    norms = (teacher.norm(dim=1) - feats.norm(dim=1)) ** 2
    return w_feat * ((teacher - feats) ** 2).mean() + w_norm * norms.mean()
