"""Batched image transforms that run where the batch lives (CPU or GPU).

In-memory uint8 datasets (the built-in benchmark, CIFAR-sized images) are
augmented a whole batch at a time on the compute device, so no worker process
has to decode or crop single images. Randomness comes from a CPU
`torch.Generator`, so a seed gives the same crops on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_float(x_uint8_nhwc: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1]."""
    return x_uint8_nhwc.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def pad_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop of the input size from a reflect-padded batch, then random h-flip.

    x: (B, C, H, W) float. Each image gets its own offset and flip.
    """
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (B, C, H+2p, W+2p)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    iy = (oy[:, None] + ar_h[None, :])[:, :, None]  # (B, H, 1)
    ix = ox[:, None] + ar_w[None, :]  # (B, W)
    ix = torch.where(flip[:, None], ix.flip(-1), ix)[:, None, :]  # (B, 1, W)
    bi = torch.arange(b, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bi, iy, ix]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
