"""Multi-process runs under torchrun (2 CPU processes, Gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import torch
import zarr

from clpt import artifacts
from clpt.run import open_run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={_free_port()}",
        "-m",
        "clpt_cli",
        *map(str, args),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_sharded_extraction_equals_single_process(run_copy, finished_run):
    res = torchrun("extract", run_copy, "--task", 3, "--force")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.count("extract task 3: done") == 1  # only rank 0 reports
    a = zarr.open_group(run_copy / "features.zarr", mode="r")
    b = zarr.open_group(finished_run / "features.zarr", mode="r")
    for split in ("train", "test"):
        g = a[f"task_003/{split}"]
        assert g["feats"].attrs["rows_done"] == g["feats"].shape[0]
        np.testing.assert_array_equal(g["labels"][:], b[f"task_003/{split}/labels"][:])
        np.testing.assert_allclose(g["feats"][:], b[f"task_003/{split}/feats"][:], rtol=1e-5, atol=1e-5)
    assert open_run(run_copy).state("stats", 3) == "stale"


def test_distributed_training_then_single_process_continues(tmp_path, tiny, clpt_cache):
    root = tmp_path / "ddp"
    from typer.testing import CliRunner

    from clpt_cli.main import app

    runner = CliRunner()
    assert runner.invoke(app, ["init", str(root), *sum((["--set", o] for o in tiny), [])]).exit_code == 0
    res = torchrun("train-task", root, "--task", 0)
    assert res.returncode == 0, res.stderr[-2000:]
    run = open_run(root)
    assert run.state("train", 0) == "done"
    marker = run.marker("train", 0)
    assert marker["summary"]["train_images"] == 1200
    ckpt = torch.load(artifacts.model_path(run.root, 0), map_location="cpu", weights_only=True)
    assert ckpt["head_sizes"] == [10]
    res = runner.invoke(app, ["eval", str(root), "--task", 1, "--json"])
    assert res.exit_code == 3  # task 1 not trained yet
    res = runner.invoke(app, ["run", str(root), "--json"])
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["task"] == 4 and rep["last_acc"] > 0.3


def test_statistics_and_feature_heads_reduced_on_every_rank_equal_one_process(run_copy, finished_run):
    """Under torchrun each rank reduces its own share of the cached rows; the ranks' moments merge exactly
    (Chan), RanPAC's G and Q are summed: statistics and heads equal the single-process run's."""
    res = torchrun("fit-stats", run_copy, "--task", 3, "--force")
    assert res.returncode == 0, res.stderr[-2000:]
    run = open_run(run_copy)
    per_rank = run.marker("stats", 3)["summary"]["rows_per_rank"]
    n = zarr.open_group(run_copy / "features.zarr", mode="r")["task_003/train/feats"].shape[0]
    assert len(per_rank) == 2 and min(per_rank) > 0 and sum(per_rank) == n  # each its own share, no overlap
    a, b = artifacts.load_stats(run_copy, 3), artifacts.load_stats(finished_run, 3)
    np.testing.assert_array_equal(a["count"], b["count"])
    np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a["m2"], b["m2"], rtol=1e-5, atol=1e-4)
    res = torchrun("heads", run_copy, "--head", "fecam", "--head", "ranpac", "--head", "ncm", "--task", 3, "--force")
    assert res.returncode == 0, res.stderr[-2000:]
    for head, keys in (("fecam", ("mu", "prec")), ("ranpac", ("w_o",)), ("ncm", ("protos",))):
        mine, md = artifacts.read_head_state(artifacts.head_state_path(run_copy, head, 3), head, None)
        ref, _ = artifacts.read_head_state(artifacts.head_state_path(finished_run, head, 3), head, None)
        for k in keys:
            torch.testing.assert_close(mine[k], ref[k], rtol=1e-4, atol=1e-4 * float(ref[k].abs().max()))
        rows = json.loads(artifacts.head_eval_path(run_copy, head, 3).read_text())
        assert rows["accuracy"] == json.loads(artifacts.head_eval_path(finished_run, head, 3).read_text())["accuracy"]
