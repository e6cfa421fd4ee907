"""Classifier heads fitted from a run's cache, by name (see `clpt.heads.base`)."""

from clpt.heads import ca, fecam, lda, linear, ncm, ranpac  # noqa: F401  (each registers itself)
from clpt.heads.base import (
    HEADS,
    ClassStats,
    HeadCache,
    HeadSpec,
    HeadState,
    InMemoryCache,
    TaskHeadScores,
    register_head,
    restore_state,
    score_in_chunks,
)

__all__ = [
    "HEADS",
    "ClassStats",
    "HeadCache",
    "HeadSpec",
    "HeadState",
    "InMemoryCache",
    "TaskHeadScores",
    "register_head",
    "restore_state",
    "score_in_chunks",
]
