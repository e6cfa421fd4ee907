"""torch.distributed glue: one process by default, several under `torchrun`.

Under `torchrun` (WORLD_SIZE > 1) the process group is initialised from the
environment (NCCL on CUDA, Gloo on CPU). Training shards every epoch across
ranks and averages gradients with DDP; feature extraction shards the rows;
rank 0 writes markers and small artifacts.

`rank()` and `world_size()` are the one place that answers "which process am
I": from the process group once it is initialised, before that from the
launcher's environment (so the lock, progress bars and the CLI's output agree
with the group that is about to form). This module imports torch only when a
function needs it, so light commands can ask for the rank cheaply.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

from clpt.errors import ClptError

if TYPE_CHECKING:
    import torch


def _group():
    """torch.distributed when a process group is initialised, else None."""
    import sys

    if "torch" not in sys.modules:  # nothing imported torch, so no group can exist
        return None
    import torch.distributed as tdist

    return tdist if tdist.is_available() and tdist.is_initialized() else None


def world_size() -> int:
    g = _group()
    return g.get_world_size() if g is not None else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    g = _group()
    return g.get_rank() if g is not None else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    g = _group()
    if g is not None and g.get_world_size() > 1:
        g.barrier()


def broadcast_object(obj: Any) -> Any:
    g = _group()
    if g is None or g.get_world_size() == 1:
        return obj
    box = [obj]
    g.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """`t` of every rank, in rank order (same shape and dtype on every rank; on the process group's
    device: CUDA under NCCL, CPU under Gloo); [t] in one process."""
    g = _group()
    if g is None or g.get_world_size() == 1:
        return [t]
    t = t.contiguous()
    out = [t.new_empty(t.shape) for _ in range(g.get_world_size())]
    g.all_gather(out, t)
    return out


def all_gather_with_grad(t: torch.Tensor) -> list[torch.Tensor]:
    """`t` of every rank, in rank order, differentiable: the gradient a rank's loss sends to another
    rank's piece reaches that rank (summed over ranks in the backward pass); [t] in one process.

    The backward pass is one all-reduce of the gradients of every piece, of which a rank keeps its
    own: the reduce-scatter of the gradient, with the one collective every backend has (torch's
    `distributed.nn.functional.all_gather` is deprecated and, on Gloo, emulates it with a scatter per
    rank)."""
    g = _group()
    if g is None or g.get_world_size() == 1:
        return [t]
    return list(_gather_with_grad().apply(t.contiguous()).unbind(0))


@functools.cache
def _gather_with_grad():
    """The autograd function behind `all_gather_with_grad` (defined once, on first use: torch is imported
    lazily here)."""
    import torch

    class GatherWithGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return torch.stack(all_gather(t))

        @staticmethod
        def backward(ctx, grad):
            return all_reduce_sum(grad.contiguous().clone())[rank()]

    return GatherWithGrad


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The rows of `t` of every rank concatenated in rank order (ranks may hold different numbers of
    rows; the other dimensions and the dtype agree); `t` itself in one process."""
    import torch

    if world_size() == 1:
        return t
    sizes = [int(n) for n in all_gather(torch.tensor([len(t)], device=t.device))]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: len(t)] = t
    return torch.cat([p[:n] for p, n in zip(all_gather(padded), sizes, strict=True)])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In place: the sum of `t` over every rank (every rank gets it); `t` itself in one process."""
    g = _group()
    if g is not None and g.get_world_size() > 1:
        g.all_reduce(t, op=g.ReduceOp.SUM)
    return t


def resolve_device(pref: str) -> torch.device:
    """`auto` -> this rank's GPU if CUDA is available, else the CPU."""
    import torch

    if pref == "cpu":
        return torch.device("cpu")
    if pref == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ClptError(
            f"system.device={pref} but CUDA is not available", hint="use system.device=auto or cpu"
        )
    if pref in ("auto", "cuda"):
        return torch.device("cuda", local_rank())
    return torch.device(pref)


def init_from_env(device_pref: str = "auto") -> torch.device:
    """Initialise the process group when launched by torchrun; return this rank's device."""
    import torch
    import torch.distributed as tdist

    device = resolve_device(device_pref)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group(backend=backend)
    return device


def shutdown() -> None:
    g = _group()
    if g is not None:
        g.destroy_process_group()
