"""The run machinery at many tasks: markers and states read once per command, forgotten where they can change."""

from __future__ import annotations

from pathlib import Path

from clpt.run import Run
from clpt.stages import RunInfo, run_order
from clpt.stages import resolve as R


def _fake_run(root: Path, n_tasks: int) -> Run:
    cfg = R.resolve(overrides=["benchmark.init_classes=1", "benchmark.increment=1"])
    info = RunInfo("builtin", n_tasks, [[t, t + 1] for t in range(n_tasks)], list(range(n_tasks)),
                   [f"c{t}" for t in range(n_tasks)], {})  # fmt: skip
    return Run(root, cfg, info)


def _complete(run: Run, stage: str, t: int) -> None:
    inputs = {f"{s}/{i}": run.marker(s, i)["id"] for s, i in run.inputs(stage, t)}  # type: ignore[index]
    run.complete(stage, t, inputs, [], 0.0, {})


def test_remembered_states_follow_a_redone_stage_and_match_a_fresh_reading(tmp_path, monkeypatch):
    run = _fake_run(tmp_path, 40)
    order = run_order(run.cfg)
    for t in range(40):
        for stage in order:
            _complete(run, stage, t)
    assert all(run.state(s, t) == "done" for t in range(40) for s in order)
    _complete(run, "train", 10)  # redone: everything downstream of it is stale, nothing before it
    fresh = _fake_run(tmp_path, 40)
    for t in range(40):
        for s in order:
            assert run.state(s, t) == fresh.state(s, t)
    assert run.state("train", 9) == "done" and run.state("extract", 10) == "stale"
    assert run.state("head:ncm", 39) == "stale"
    # a resumed check reads each marker once: counting reads over all tasks of a fresh Run
    reads = []
    real = Run._read_marker
    monkeypatch.setattr(Run, "_read_marker", lambda self, s, t: reads.append((s, t)) or real(self, s, t))
    again = _fake_run(tmp_path, 40)
    [again.state(s, t) for t in range(40) for s in order]
    assert len(reads) == len(set(reads)) == 40 * len(order)
    run.invalidate("stats", 5)
    assert run.state("stats", 5) == "missing" and run.state("head:ncm", 5) == "stale"
