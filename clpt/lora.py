"""LoRA for the hybrid slow learner of SLCA++ (docs/methods/slca.md, SLCA++ additions 1).

`W x + scale * B (A x)` with rank r (4) and scale 0.8 on `attn.qkv` of every
block (`targets: [qkv]`, what produced the published numbers), or on
`attn.qkv`, `mlp.fc1` and `mlp.fc2` (`targets: [qkv, mlp]`, what the reference
code meant to train). B starts at zero; at task 0, A is set to the top-r right
singular vectors of the pre-trained W. One LoRA per layer, trained on through
all tasks, never merged or reset: its parameters live in the backbone's state
dict, so every run checkpoint carries them.
"""

from __future__ import annotations

import torch
from torch import nn

TARGET_LAYERS = {"qkv": ("attn.qkv",), "mlp": ("mlp.fc1", "mlp.fc2")}

# SLCA++ trains only parameters whose names contain one of these (docs/methods/slca.md).
PEFT_KEYS = ("norm", "bias", "cls_token", "lora")


class LoRALinear(nn.Module):
    """A frozen-able `nn.Linear` plus a low-rank update `scale * B @ A`."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.base = base
        self.rank, self.scale = rank, scale
        self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))  # (out, r)

    @torch.no_grad()
    def init_from_svd(self) -> None:
        """A = top-r right singular vectors of the base weight; B = 0."""
        _, _, vh = torch.linalg.svd(self.base.weight.detach().double(), full_matrices=False)
        self.lora_A.copy_(vh[: self.rank].to(self.lora_A.dtype))
        self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return self.base(x) + self.scale * ((x @ self.lora_A.T) @ self.lora_B.T)


def apply_lora(backbone: nn.Module, targets: list[str], rank: int, scale: float, svd_init: bool) -> int:
    """Wrap the target linears of every ViT block; returns the number of LoRA parameters."""
    unknown = [t for t in targets if t not in TARGET_LAYERS]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}: expected a subset of {sorted(TARGET_LAYERS)}")
    n = 0
    blocks: nn.Sequential = backbone.blocks  # type: ignore[assignment]  # a timm ViT's blocks
    for block in blocks:
        for target in targets:
            for path in TARGET_LAYERS[target]:
                parent_name, _, leaf = path.rpartition(".")
                parent = block.get_submodule(parent_name)
                base = getattr(parent, leaf)
                if isinstance(base, LoRALinear):
                    continue
                wrapped = LoRALinear(base, rank, scale)
                if svd_init:
                    wrapped.init_from_svd()
                setattr(parent, leaf, wrapped)
                n += wrapped.lora_A.numel() + wrapped.lora_B.numel()
    return n


def is_peft_trainable(name: str) -> bool:
    return any(key in name for key in PEFT_KEYS)
