"""`system.precision`: the arithmetic of the forward passes of training and extraction.

    fp32   float32 everywhere (the reference code's arithmetic; the default)
    bf16   torch.autocast to bfloat16 for the forward passes (matmuls, attention)
    auto   bf16 on a CUDA GPU that supports it, fp32 otherwise (CPU)

Only forward passes are autocast: parameters, gradients and optimizer state stay
float32, losses are computed in float32, cached features are stored as float32
and class statistics accumulate in float64, whatever the precision.
"""

from __future__ import annotations

import contextlib

import torch

from clpt.errors import ConfigError

CHOICES = ("fp32", "bf16", "auto")


def resolve(precision: str, device: torch.device) -> str:
    """'fp32' or 'bf16' for this device."""
    if precision not in CHOICES:
        raise ConfigError([f"system.precision: {precision!r} is not one of {', '.join(CHOICES)}"])
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            [
                f"system.precision: bf16 is not supported by {torch.cuda.get_device_name(device)}: use fp32 or auto"
            ]
        )
    return precision


def autocast(precision: str, device: torch.device):
    """The context for a forward pass at `precision` ('fp32' or 'bf16', as `resolve` returns)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
