"""`linear`: the task heads as the learner left them (before alignment): what Seq FT evaluates."""

from __future__ import annotations

from clpt.heads.base import TaskHeadScores
from clpt.heads.registry import LinearHeadConfig


def fit(ctx, settings: LinearHeadConfig) -> TaskHeadScores:
    return TaskHeadScores(ctx.trained_heads().to(ctx.device))
