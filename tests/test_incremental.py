"""Incremental heads (issue 20): a head that updates its previous task's state equals the from-scratch fit."""

from __future__ import annotations

import torch

from clpt import artifacts
from clpt.heads import HEADS
from clpt.run import open_run
from clpt.stages.heads import RunCache


def test_fecam_updated_task_by_task_equals_the_fit_from_scratch_at_every_task(finished_run):
    run = open_run(finished_run)
    settings = run.cfg.heads.of("fecam")
    for t in range(run.info.n_tasks):
        tensors, md = artifacts.read_head_state(
            artifacts.head_state_path(run.root, "fecam", t), "fecam", None
        )
        assert md["info"] == {"incremental": t > 0}  # the run built each task's state on the one before
        cache = RunCache(run.root, run.cfg, t, run.info.tasks, torch.device("cpu"))
        cache.previous_state = lambda head: None  # type: ignore[method-assign]  # from scratch
        scratch = HEADS.get("fecam").fit(cache, settings)
        # the same sums and factorisations of the same classes: equal to the bit
        assert torch.equal(scratch.mu, tensors["mu"]) and torch.equal(scratch.prec, tensors["prec"])


def test_an_incremental_fit_starts_over_when_the_settings_differ(finished_run):
    from dataclasses import replace

    run = open_run(finished_run)
    cache = RunCache(run.root, run.cfg, 2, run.info.tasks, torch.device("cpu"))
    other = replace(run.cfg.heads.of("fecam"), shrink1=2.0)
    state = HEADS.get("fecam").fit(cache, other)
    assert state.info == {"incremental": False} and len(state.mu) == run.info.tasks[2][1]
