"""`ncm`: SimpleCIL's nearest class mean (docs/methods/heads.md, ncm).

Prototype p_c = mean of the unnormalised features of class c (from the cached
statistics: of the backbone that followed the class's task, never recomputed);
predict argmax_c cos(f(x), p_c).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clpt.heads.base import HeadSpec, register_head, stats_upto


@dataclass
class NCMConfig:
    """No settings: cosine similarity to the class means, scale 1."""


def fit(ctx, settings: NCMConfig):
    protos = F.normalize(ctx.class_stats().mean.to(ctx.device, dtype=torch.float32), dim=1)  # (C, d)
    return lambda x: F.normalize(x.to(protos.dtype), dim=1) @ protos.T


register_head(
    HeadSpec(
        "ncm", "cosine nearest class mean (SimpleCIL)", NCMConfig, fit, inputs=lambda cfg, t: stats_upto(t)
    )
)
