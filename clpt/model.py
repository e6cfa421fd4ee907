"""The continual model: a backbone and one linear head per task (docs/methods/slca.md, Classifier)."""

from __future__ import annotations

import torch
from torch import nn


def new_head(dim: int, n_classes: int) -> nn.Linear:
    """`d -> classes of the task`, weights truncated-normal std 0.02, bias 0."""
    head = nn.Linear(dim, n_classes, bias=True)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


class Heads(nn.Module):
    """Per-task linear heads whose logits are concatenated in class order.

    `input_scale[t]` multiplies the features fed to head t (1 by default; SLCA++
    sets fixed scales for old heads at inference).
    """

    def __init__(self, dim: int, sizes: list[int] | None = None):
        super().__init__()
        self.dim = dim
        self.heads = nn.ModuleList(new_head(dim, n) for n in (sizes or []))
        self.input_scale: torch.Tensor
        self.register_buffer("input_scale", torch.ones(len(sizes or [])), persistent=True)

    @property
    def sizes(self) -> list[int]:
        return [int(h.out_features) for h in self.heads]  # type: ignore[arg-type]  # each is an nn.Linear

    @property
    def n_classes(self) -> int:
        return sum(self.sizes)

    def add(self, n_classes: int) -> nn.Linear:
        head = new_head(self.dim, n_classes).to(self.input_scale.device)
        self.heads.append(head)
        self.input_scale = torch.cat([self.input_scale, self.input_scale.new_ones(1)])
        return head

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, n_classes)
        return torch.cat([h(feats * s) for h, s in zip(self.heads, self.input_scale, strict=True)], dim=1)


class CLModel(nn.Module):
    def __init__(self, backbone: nn.Module, heads: Heads):
        super().__init__()
        self.backbone = backbone
        self.heads = heads

    @property
    def dim(self) -> int:
        return self.heads.dim

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, d)
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, n_classes)
        return self.heads(self.backbone(x))
