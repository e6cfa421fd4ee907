"""Classifier heads fitted from a run's cache, by name (see `clpt.heads.base`).

Importing this package loads only the registry (`clpt.heads.registry`, no torch);
the names of `clpt.heads.base` are imported from it when first used.
"""

from clpt.heads.registry import HEADS, HeadSpec, register_head

_BASE = ("ClassStats", "HeadCache", "HeadState", "InMemoryCache", "TaskHeadScores", "restore_state",
         "restore_parts", "score_in_chunks")  # fmt: skip


def __getattr__(name: str):
    if name in _BASE:
        from clpt.heads import base

        return getattr(base, name)
    raise AttributeError(f"module 'clpt.heads' has no attribute {name!r}")


__all__ = ["HEADS", "HeadSpec", "register_head", *_BASE]
