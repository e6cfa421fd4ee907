"""`ncm`: SimpleCIL's nearest class mean (docs/methods/heads.md, ncm).

Prototype p_c = mean of the unnormalised features of class c (from the cached
statistics: of the backbone that followed the class's task, never recomputed);
predict argmax_c cos(f(x), p_c).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clpt.heads.base import HeadSpec, HeadState, register_head, stats_upto


@dataclass
class NCMConfig:
    """No settings: cosine similarity to the class means, scale 1."""


class CosineScores(HeadState):
    """cos(f(x), p_c): unit prototypes (C, d) float32."""

    score = "the cosine similarity to the class mean"

    def __init__(self, protos: torch.Tensor, info: dict | None = None):
        super().__init__(info)
        self.protos: torch.Tensor
        self.register_buffer("protos", protos.contiguous())

    @classmethod
    def from_state(cls, tensors, meta) -> CosineScores:
        return cls(tensors["protos"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.to(self.protos.dtype), dim=1) @ self.protos.T


def fit(ctx, settings: NCMConfig) -> CosineScores:
    protos = F.normalize(ctx.class_stats().mean.to(ctx.device, dtype=torch.float32), dim=1)  # (C, d)
    return CosineScores(protos)


register_head(
    HeadSpec(
        "ncm",
        "cosine nearest class mean (SimpleCIL)",
        NCMConfig,
        fit,
        inputs=lambda cfg, t: stats_upto(t),
        state_cls=CosineScores,
    )
)
