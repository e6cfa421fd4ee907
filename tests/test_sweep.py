"""Sweeps through submitit (`clpt sweep`): the plan, and a local job array end to end."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from clpt.errors import ConfigError
from clpt.sweep import parse_grid, plan
from clpt_cli.main import app


def test_the_plan_is_one_validated_run_folder_per_combination_and_seed(tmp_path):
    jobs = plan(tmp_path, None, ["method=simplecil"], [1993, 1996],
                parse_grid(["heads.lda.shrinkage=1e-4,1e-2", "align.tau=0.1"]))  # fmt: skip
    assert [j.root.relative_to(tmp_path).as_posix() for j in jobs] == [
        "heads.lda.shrinkage=1e-4,align.tau=0.1/seed_1993", "heads.lda.shrinkage=1e-4,align.tau=0.1/seed_1996",
        "heads.lda.shrinkage=1e-2,align.tau=0.1/seed_1993", "heads.lda.shrinkage=1e-2,align.tau=0.1/seed_1996",
    ]  # fmt: skip
    assert jobs[1].overrides == ["method=simplecil", "heads.lda.shrinkage=1e-4", "align.tau=0.1", "seed=1996",
                                 "benchmark.seed=1996"]  # fmt: skip
    assert [j.root for j in plan(tmp_path, None, [], None, [])] == [tmp_path]
    with pytest.raises(ConfigError, match="expected KEY=V1,V2"):
        parse_grid(["train.lr"])
    with pytest.raises(ConfigError, match="--seeds"):
        parse_grid(["seed=1,2"])
    with pytest.raises(ConfigError, match="train.lr"):  # a bad value fails before anything is submitted
        plan(tmp_path, None, [], None, parse_grid(["train.lr=-1,0.1"]))


def test_a_local_job_array_runs_each_folder_and_report_aggregates_them(tmp_path, clpt_cache):
    parent = tmp_path / "sweep"
    args = ["sweep", str(parent), "--seeds", "1993,1996", "--cluster", "local", "--json",
            "--set", "method=simplecil", "--set", "heads.enabled=[ncm]"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.stderr
    jobs = json.loads(res.stdout)["jobs"]
    assert [j["run"] for j in jobs] == [str(parent / "seed_1993"), str(parent / "seed_1996")]
    assert all(0.5 < j["last_acc"] <= 1 and j["n_tasks"] == 5 for j in jobs)
    res = CliRunner().invoke(app, ["report", str(parent), "--format", "json"])
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)["rows"]
    assert rows and all(r["seeds"] == [1993, 1996] for r in rows)  # one group over both folders
    res = CliRunner().invoke(app, args)  # again: each job continues its finished run
    assert res.exit_code == 0 and json.loads(res.stdout)["jobs"][0]["last_acc"] == jobs[0]["last_acc"]
