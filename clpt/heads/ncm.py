"""`ncm`: SimpleCIL's nearest class mean (docs/methods/heads.md, ncm).

Prototype p_c = mean of the unnormalised features of class c (from the cached
statistics: of the backbone that followed the class's task, never recomputed);
predict argmax_c cos(f(x), p_c). In a run, task T fits its classes' prototypes
alone, a part saved after task T-1's state (joined, bit-identical to the fit
from scratch); `ncm+drift` refits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clpt.heads.base import HeadState
from clpt.heads.registry import NCMConfig


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


def prototypes(mean: torch.Tensor, device) -> torch.Tensor:
    return F.normalize(mean.to(device, dtype=torch.float32), dim=1)  # (C, d), one row per class


def fit(ctx, settings: NCMConfig) -> CosineScores:
    """Incremental: an old class's prototype never changes (its statistics are its task's), so after the
    previous task's state only task T's prototypes are fitted, a part (`first_class`); from scratch at
    task 0 and for a compensated head."""
    prev = ctx.previous_state("ncm")
    lo = ctx.tasks[ctx.task][0]
    if prev is not None and prev[1]["n_classes"] == lo:
        part = CosineScores(prototypes(ctx.task_stats(ctx.task).mean, ctx.device), info={"incremental": True})
        part.first_class = lo
        return part
    return CosineScores(prototypes(ctx.class_stats().mean, ctx.device), info={"incremental": False})
