"""Incremental heads (issue 20): a head that updates its previous task's state equals the from-scratch fit."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from clpt import artifacts
from clpt.heads import HEADS
from clpt.run import open_run
from clpt.stages.heads import RunCache
from clpt_cli.main import app

STATE = {"ncm": ("protos",), "lda": ("w", "b"), "fecam": ("mu", "chol"), "ranpac": ("w_o",)}
PER_CLASS = ("ncm", "fecam")  # a task's fit and file hold its own classes: a part of the state


@pytest.mark.parametrize("head", sorted(STATE))
def test_a_head_updated_task_by_task_equals_the_fit_from_scratch_at_every_task(finished_run, head):
    run = open_run(finished_run)
    settings = run.cfg.heads.of(head)
    for t in range(run.info.n_tasks):
        own, md = artifacts.read_head_state(artifacts.head_state_path(run.root, head, t), head, None)
        assert md["info"]["incremental"] == (t > 0)  # the run built each task's state on the one before
        lo, hi = run.info.tasks[t]
        assert md["n_classes"] == hi and md["first_class"] == (lo if head in PER_CLASS else 0)
        assert len(own[STATE[head][0]]) == (hi - lo if head in PER_CLASS else hi) or head == "ranpac"
        parts, _ = artifacts.read_head_parts(run.root, head, t, lambda k: None)
        assert len(parts) == (t + 1 if head in PER_CLASS else 1)
        tensors = HEADS.get(head).state_class().join(parts)
        cache = RunCache(run.root, run.cfg, t, run.info.tasks, torch.device("cpu"))
        cache.previous_state = lambda head: None  # type: ignore[method-assign]  # from scratch
        scratch = HEADS.get(head).fit(cache, settings)
        # the same sums and factorisations of the same classes, in the same order: equal to the bit
        for k in STATE[head]:
            assert torch.equal(getattr(scratch, k), tensors[k]), (head, t, k)
    # the carry is kept for the latest task only, and the latest one continues to the same state
    carries = sorted(run.root.glob(f"tasks/*/heads/{head}.carry.safetensors"))
    assert [p.parts[-3] for p in carries] == ([f"{run.info.n_tasks - 1:03d}"] if head in ("lda", "ranpac") else [])


@pytest.mark.parametrize("head", ["lda", "ranpac"])
def test_a_missing_or_damaged_carry_refits_from_scratch_to_the_same_state(run_copy, head):
    run = open_run(run_copy)
    t = run.info.n_tasks - 1
    carry = artifacts.head_carry_path(run.root, head, t - 1)
    before, _ = artifacts.read_head_state(artifacts.head_state_path(run.root, head, t), head, None)
    # the run kept task t's carry only: refit task t - 1 (writes its carry), then damage it
    cache = RunCache(run.root, run.cfg, t, run.info.tasks, torch.device("cpu"))
    assert cache.previous_state(head)[1]["carry"] is None  # type: ignore[index]  # gone: from scratch
    state = HEADS.get(head).fit(cache, run.cfg.heads.of(head))
    assert state.info["incremental"] is False
    for k, v in before.items():
        assert torch.equal(state.tensors()[k], v)
    res = CliRunner().invoke(app, ["heads", str(run.root), "--head", head, "--task", str(t - 1), "--force"])
    assert res.exit_code == 0, res.output
    assert carry.is_file()
    data = bytearray(carry.read_bytes())
    data[-1] ^= 1  # one flipped bit: its sha256 no longer matches the one the state recorded
    carry.write_bytes(bytes(data))
    assert cache.previous_state(head)[1]["carry"] is None  # type: ignore[index]


def test_an_incremental_fit_starts_over_when_the_settings_differ(finished_run):
    from dataclasses import replace

    run = open_run(finished_run)
    cache = RunCache(run.root, run.cfg, 2, run.info.tasks, torch.device("cpu"))
    other = replace(run.cfg.heads.of("fecam"), shrink1=2.0)
    state = HEADS.get("fecam").fit(cache, other)
    assert state.info == {"incremental": False} and len(state.mu) == run.info.tasks[2][1]
