"""`linear`: the task heads as the learner left them (before alignment): what Seq FT evaluates."""

from __future__ import annotations

from dataclasses import dataclass

from clpt.heads.base import HeadSpec, TaskHeadScores, register_head


@dataclass
class LinearHeadConfig:
    """No settings: the trained heads are used as they are."""


def fit(ctx, settings: LinearHeadConfig) -> TaskHeadScores:
    return TaskHeadScores(ctx.trained_heads().to(ctx.device))


register_head(
    HeadSpec(
        "linear",
        "the trained task heads, before alignment",
        LinearHeadConfig,
        fit,
        inputs=lambda cfg, t: [("train", t)],
        drift=False,  # the learner's heads: no statistics to compensate
    )
)
