"""torch.distributed glue: one process by default, several under `torchrun`.

Under `torchrun` (WORLD_SIZE > 1) the process group is initialised from the
environment (NCCL on CUDA, Gloo on CPU). Training shards every epoch across
ranks and averages gradients with DDP; feature extraction shards the rows;
rank 0 writes markers and small artifacts.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as tdist


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        tdist.barrier()


def broadcast_object(obj: Any) -> Any:
    if world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_device(pref: str) -> torch.device:
    """`auto` -> this rank's GPU if CUDA is available, else the CPU."""
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from clpt.errors import ClptError

        raise ClptError(
            f"system.device={pref} but CUDA is not available", hint="use system.device=auto or cpu"
        )
    if pref in ("auto", "cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(pref)


def init_from_env(device_pref: str = "auto") -> torch.device:
    """Initialise the process group when launched by torchrun; return this rank's device."""
    device = resolve_device(device_pref)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group(backend=backend)
    return device


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
