"""Non-finite numbers are stopped where they appear (issue 11, section 4)."""

from __future__ import annotations

import numpy as np
import zarr
from typer.testing import CliRunner

from clpt_cli.main import app


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(res) -> str:
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def test_non_finite_cached_features_stop_statistics_heads_and_evaluation(run_copy):
    g = zarr.open_group(run_copy / "features.zarr", mode="r+")
    test = g["task_004/test/feats"]
    test[:400] = np.inf  # written through zarr: the checksums are valid, the values are not
    for args in (("eval", run_copy, "--task", 4, "--force"), ("heads", run_copy, "--head", "ncm", "--force")):
        res = cli(*args)
        assert res.exit_code == 4 and "test features of task 4 contain non-finite values" in error_line(
            res
        ), args
    train = g["task_002/train/feats"]
    row = train[3]
    row[5] = np.nan
    train[3] = row
    res = cli("fit-stats", run_copy, "--task", 2, "--force")
    assert res.exit_code == 4
    assert "train features of task 2 contain non-finite values" in error_line(res)


def test_a_diverging_loss_stops_training_before_a_model_is_written(tmp_path, tiny, clpt_cache):
    root = tmp_path / "nan"
    sets = [*tiny, "train.lr=1e30", "train.backbone_lr_scale=1.0"]
    assert cli("init", root, *sum((["--set", s] for s in sets), [])).exit_code == 0
    res = cli("train-task", root, "--task", 0)
    assert res.exit_code == 1 and "training of task 0 diverged" in error_line(res)
    assert not (root / "tasks" / "000" / "model.pt").exists()
    assert not (root / "tasks" / "000" / "train.done.json").exists()


def test_a_diverged_backbone_stops_extraction_and_caches_nothing(run_copy, monkeypatch):
    import torch

    from clpt.model import CLModel
    from clpt.run import open_run

    real = CLModel.features
    monkeypatch.setattr(CLModel, "features", lambda self, x: real(self, x) * torch.nan)
    res = cli("extract", run_copy, "--task", 4, "--force")
    assert res.exit_code == 4
    line = error_line(res)
    assert "the backbone of task 4 produced non-finite train features" in line and "train-task" in line
    feats = zarr.open_group(run_copy / "features.zarr", mode="r")["task_004/train/feats"]
    assert feats.attrs["rows_done"] == 0  # nothing committed
    assert open_run(run_copy).state("extract", 4) == "missing"
