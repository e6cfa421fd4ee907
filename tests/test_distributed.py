"""Multi-process runs under torchrun (2 CPU processes, Gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
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
    for head, keys in (("fecam", ("mu", "chol")), ("ranpac", ("w_o",)), ("ncm", ("protos",))):
        mine, md = artifacts.read_head_state(artifacts.head_state_path(run_copy, head, 3), head, None)
        ref, _ = artifacts.read_head_state(artifacts.head_state_path(finished_run, head, 3), head, None)
        for k in keys:
            torch.testing.assert_close(mine[k], ref[k], rtol=1e-4, atol=1e-4 * float(ref[k].abs().max()))
        rows = json.loads(artifacts.head_eval_path(run_copy, head, 3).read_text())
        assert rows["accuracy"] == json.loads(artifacts.head_eval_path(finished_run, head, 3).read_text())["accuracy"]


MIST_GATHER = """
import json, os, sys
import torch, torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP
from clpt.mist import global_mi_loss, mi_loss

tdist.init_process_group("gloo")
r, k = tdist.get_rank(), tdist.get_world_size()
os.dup2(os.open(f"{sys.argv[1]}.rank{r}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)  # C++ aborts too
g = torch.Generator().manual_seed(0)
x, x2 = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)  # a global batch and its views
y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
torch.manual_seed(1)
net = DDP(torch.nn.Linear(6, 4))
b = 8 // k
own = slice(r * b, (r + 1) * b)  # this rank's share of the global batch
z = net(torch.cat([x[own], x2[own]]))
loss = (global_mi_loss if sys.argv[2] == "gather" else mi_loss)(z, y[own], 0.07)
loss.backward()
if r == 0:
    json.dump({"loss": loss.item(), "grad": net.module.weight.grad.tolist()}, open(sys.argv[1], "w"))
tdist.barrier()  # no rank tears the group down while the other still uses it
del net  # DDP's reducer holds the group: release it before the group goes
tdist.destroy_process_group()
# torch's C++ teardown at interpreter exit sometimes aborts ("terminate called without an active
# exception", SIGABRT) after all of the above has finished: 5 of 25 runs of this test under load, 2 of 20
# direct runs of this script, 0 of 20 when it leaves here without that teardown. The test is about the
# loss and gradient, which are written (and the group destroyed) by now.
sys.stderr.flush()
os._exit(0)
"""


def test_mist_loss_under_two_ranks_is_the_one_process_loss_and_gradient(tmp_path):
    """issue 23, item 6: with the projections gathered (with their gradient) before the loss, 2 Gloo
    ranks holding halves of a global batch get the loss and the DDP gradient of one process on the
    whole batch; the per-rank loss (each anchor seeing half the negatives) does not."""
    from clpt.mist import mi_loss

    script = tmp_path / "gather.py"
    script.write_text(MIST_GATHER)
    out = {}
    for mode in ("gather", "local"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(script), str(tmp_path / f"{mode}.json"), mode]  # fmt: skip
        res = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
        ranks = {p.name: p.read_text()[-1500:] for p in sorted(tmp_path.glob(f"{mode}.json.rank*.err"))}
        assert res.returncode == 0, (mode, ranks, res.stdout[-1000:], res.stderr[-1500:])  # the ranks' own first
        out[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
    g = torch.Generator().manual_seed(0)
    x, x2 = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    torch.manual_seed(1)
    net = torch.nn.Linear(6, 4)
    loss = mi_loss(net(torch.cat([x, x2])), y, 0.07)
    loss.backward()
    assert out["gather"]["loss"] == pytest.approx(loss.item(), rel=1e-6)
    np.testing.assert_allclose(out["gather"]["grad"], net.weight.grad.numpy(), rtol=1e-5, atol=1e-7)
    assert abs(out["local"]["loss"] - loss.item()) > 1e-3  # what each rank optimised before
