"""End-to-end through the CLI on the built-in benchmark with tiny settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from processes import kill_mid_write
from typer.testing import CliRunner

from clpt.run import STAGES, open_run
from clpt_cli.main import app

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def markers(root: Path) -> dict:
    run = open_run(root)
    return {(s, t): (run.marker(s, t) or {}).get("id") for t in range(run.info.n_tasks) for s in STAGES}


def report(root: Path) -> dict:
    res = cli("eval", root, "--task", 4, "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    doc.pop("run")
    return doc


def test_every_stage_leaves_its_artifacts(finished_run):
    root = finished_run
    assert (root / "config.yaml").is_file() and (root / "benchmark.json").is_file()
    info = json.loads((root / "benchmark.json").read_text())
    np.random.seed(1993)
    assert info["class_order"] == np.random.permutation(50).tolist()
    feats = zarr.open_group(root / "features.zarr", mode="r")  # plain zarr reads the cache
    stats = zarr.open_group(root / "stats.zarr", mode="r")
    for t in range(5):
        tdir = root / "tasks" / f"{t:03d}"
        for f in ("model.pt", "heads_aligned.pt", "eval.json", *(f"{s}.done.json" for s in STAGES)):
            assert (tdir / f).is_file(), f
        tr, te = feats[f"task_{t:03d}/train"], feats[f"task_{t:03d}/test"]
        assert tr["feats"].shape == (1200, 128) and tr["feats"].attrs["rows_done"] == 1200
        assert te["feats"].shape == (400 * (t + 1), 128)
        assert set(np.unique(tr["labels"][:])) == set(range(10 * t, 10 * t + 10))
        assert set(np.unique(te["labels"][:])) == set(range(10 * t + 10))
        g = stats[f"task_{t:03d}"]
        assert g["m2"].shape == (10, 128, 128) and g["count"][:].tolist() == [120] * 10
        assert g["classes"][:].tolist() == list(range(10 * t, 10 * t + 10))
        assert "cov" not in g and g.attrs["format_version"] == 2  # sufficient statistics, no ridge stored
        # the stored statistics are those of the stored features
        x = torch.from_numpy(tr["feats"][:]).double()
        y = tr["labels"][:]
        c0 = 10 * t
        ref = torch.cov(x[y == c0].T)
        stored = torch.from_numpy(g["m2"][0]) / (120 - 1)
        assert float((stored - ref).norm() / ref.norm()) < 2e-6  # float32 accumulation
        assert torch.equal(stored, stored.T)


def test_json_outputs(finished_run):
    res = cli("status", finished_run, "--json")
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert doc["n_tasks"] == 5 and all(
        st["state"] == "done" and st["seconds"] >= 0 for row in doc["tasks"] for st in row["stages"].values()
    )
    rep = report(finished_run)
    for key in ("task", "accuracy", "acc_matrix", "last_acc", "inc_acc", "forgetting"):
        assert key in rep
    assert rep["task"] == 4 and [len(r) for r in rep["acc_matrix"]] == [1, 2, 3, 4, 5]
    assert rep["last_acc"] == rep["accuracy"] == rep["accuracies"][4]
    assert rep["inc_acc"] == pytest.approx(np.mean(rep["accuracies"]))
    assert rep["accuracy"] > 0.3  # 50 classes: chance is 0.02
    res = cli("eval", finished_run, "--task", 1, "--json")
    assert json.loads(res.stdout)["acc_matrix"] == rep["acc_matrix"][:2]


def test_run_redoes_only_what_was_deleted(run_copy):
    before, rep_before = markers(run_copy), report(run_copy)
    (run_copy / "tasks" / "002" / "heads_aligned.pt").unlink()
    st = json.loads(cli("status", run_copy, "--json").stdout)["tasks"][2]["stages"]
    assert (
        st["align"]["state"] == "missing"
        and st["eval"]["state"] == "stale"
        and st["stats"]["state"] == "done"
    )
    assert cli("run", run_copy).exit_code == 0
    after = markers(run_copy)
    redone = {k for k in before if before[k] != after[k]}
    assert redone == {("align", 2), ("eval", 2)}
    assert report(run_copy) == rep_before  # alignment is seeded: the same heads again

    shutil.rmtree(run_copy / "features.zarr" / "task_003")
    assert cli("run", run_copy).exit_code == 0
    again = markers(run_copy)
    redone = {k for k in after if after[k] != again[k]}
    assert redone == {("extract", 3), ("stats", 3), ("align", 3), ("align", 4), ("eval", 3), ("eval", 4)}
    assert report(run_copy) == rep_before


def test_same_seed_gives_identical_metrics(finished_run, tmp_path, tiny):
    args = ["run", tmp_path / "again"]
    for o in tiny:
        args += ["--set", o]
    assert cli(*args).exit_code == 0
    assert report(tmp_path / "again") == report(finished_run)


def test_killed_extraction_is_not_taken_for_finished_work_and_resumes(run_copy, finished_run):
    assert (
        cli(
            "config",
            run_copy,
            "--set",
            "system.feature_chunk_rows=32",
            "--set",
            "system.extract_batch_size=32",
        ).exit_code
        == 0
    )
    group = run_copy / "features.zarr" / "task_004" / "train" / "feats"
    killed_at = kill_mid_write(["extract", run_copy, "--task", "4", "--force"], group, chunk_rows=32)
    assert killed_at is not None, "extraction finished before it could be killed"
    run = open_run(run_copy)
    assert run.state("extract", 4) == "missing"
    for s in ("stats", "align", "eval"):
        assert run.state(s, 4) != "done"
    res = cli("fit-stats", run_copy, "--task", 4)
    assert res.exit_code == 3 and "clpt extract" in res.stderr
    res = cli("extract", run_copy, "--task", 4)
    assert res.exit_code == 0
    assert "resuming at row" in res.stderr
    assert cli("run", run_copy).exit_code == 0
    a = zarr.open_group(run_copy / "features.zarr", mode="r")["task_004/train/feats"][:]
    b = zarr.open_group(finished_run / "features.zarr", mode="r")["task_004/train/feats"][:]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # batch size differs: BLAS may round differently
    assert report(run_copy)["acc_matrix"] == report(finished_run)["acc_matrix"]


def test_editing_alignment_settings_makes_alignment_stale(run_copy):
    before = markers(run_copy)
    res = cli("align", run_copy, "--task", 1, "--set", "align.tau=0.2")
    assert res.exit_code == 0
    assert "tau: 0.2" in (run_copy / "config.yaml").read_text()
    st = json.loads(cli("status", run_copy, "--json").stdout)["tasks"]
    assert st[1]["stages"]["align"]["state"] == "done"
    assert st[3]["stages"]["align"]["state"] == "stale" and st[3]["stages"]["train"]["state"] == "done"
    assert cli("run", run_copy).exit_code == 0
    after = markers(run_copy)
    assert {s for (s, t) in before if before[(s, t)] != after[(s, t)]} == {"align", "eval"}
    res = cli("config", run_copy, "--set", "train.lr=1")
    assert res.exit_code == 2 and "cannot be changed in an existing run" in res.stderr


def test_missing_inputs_name_the_command(tmp_path, tiny):
    root = tmp_path / "fresh"
    assert cli("init", root, *sum((["--set", o] for o in tiny), [])).exit_code == 0
    res = cli("align", root, "--task", 1)
    assert res.exit_code == 3
    assert "clpt train-task" in res.stderr and "--task 1" in res.stderr
    res = cli("eval", root, "--task", 0)
    assert res.exit_code == 3 and "clpt align" in res.stderr
    res = cli("train-task", root, "--task", 2)
    assert res.exit_code == 3 and "clpt train-task" in res.stderr and "task 1" in res.stderr
    res = cli("train-task", root, "--task", 9)
    assert res.exit_code == 1 and "tasks 0..4" in res.stderr
    res = cli("status", tmp_path / "nothing")
    assert res.exit_code == 3 and "clpt init" in res.stderr
    for r in (res,):
        assert len(r.stderr.strip().splitlines()) == 1  # one line


def test_bad_config_is_rejected_before_anything_is_written(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  lr: -1\n  epocs: 3\nalign:\n  tau: zero\n")
    res = cli("init", tmp_path / "r", "--config", cfg)
    assert res.exit_code == 2
    assert "train.lr: must be > 0" in res.stderr and "train.epocs: unknown key" in res.stderr
    assert "align.tau: expected a number" in res.stderr
    assert not (tmp_path / "r").exists()
    res = cli("init", tmp_path / "r2", "--set", "benchmark.name=mnist")
    assert res.exit_code == 2 and "benchmark.name" in res.stderr


def test_existing_run_is_not_overwritten(finished_run):
    res = cli("init", finished_run)
    assert res.exit_code == 1 and "already holds a run" in res.stderr
    res = cli("run", finished_run, "--set", "train.lr=0.5")
    assert res.exit_code == 1 and "already holds a run" in res.stderr


def test_done_stage_is_skipped_unless_forced(run_copy):
    before = markers(run_copy)
    res = cli("fit-stats", run_copy, "--task", 0)
    assert res.exit_code == 0 and "already done" in res.stderr and markers(run_copy) == before
    res = cli("fit-stats", run_copy, "--task", 0, "--force")
    assert res.exit_code == 0 and markers(run_copy)[("stats", 0)] != before[("stats", 0)]
    assert open_run(run_copy).state("align", 1) == "stale"


# --- classifier heads from the cache ----------------------------------------------------------

HEAD_NAMES = ["ca", "linear", "ncm", "lda", "fecam", "ranpac"]


def all_markers(root: Path) -> dict:
    from clpt.stages import run_order

    run = open_run(root)
    return {
        (s, t): (run.marker(s, t) or {}).get("id")
        for t in range(run.info.n_tasks)
        for s in run_order(run.cfg)
    }


def test_one_run_gives_an_accuracy_matrix_for_every_head(finished_run):
    rep = report(finished_run)
    assert list(rep["heads"]) == HEAD_NAMES
    for name, h in rep["heads"].items():
        assert [len(r) for r in h["acc_matrix"]] == [1, 2, 3, 4, 5], name
        assert h["last_acc"] == h["accuracy"] == h["accuracies"][4] and h["inc_acc"] == pytest.approx(
            np.mean(h["accuracies"])
        )
        assert 0 <= h["forgetting"] <= 1 and h["accuracy"] > 0.3, name  # 50 classes: chance is 0.02
    # SLCA's own classifier is the aligned heads: the `ca` head reads the same file
    assert rep["heads"]["ca"]["acc_matrix"] == rep["acc_matrix"]
    res = cli("eval", finished_run, "--task", 4)
    assert res.exit_code == 0 and "classifier heads from the cache" in res.stdout and "ranpac" in res.stdout
    doc = json.loads(cli("status", finished_run, "--json").stdout)
    assert doc["heads"] == HEAD_NAMES
    assert all(row["stages"][f"head:{h}"]["state"] == "done" for row in doc["tasks"] for h in HEAD_NAMES)


def test_refitting_one_head_redoes_only_that_head_and_reads_no_image(run_copy, monkeypatch):
    from clpt.run import Run

    def no_images(self):
        raise AssertionError("a head stage read the benchmark's images")

    monkeypatch.setattr(Run, "benchmark", no_images)
    before = all_markers(run_copy)
    lda_before = report(run_copy)["heads"]["lda"]
    res = cli("heads", run_copy, "--head", "lda", "--set", "heads.lda.shrinkage=0.5", "--json")
    assert res.exit_code == 0, res.stderr
    after = all_markers(run_copy)
    assert {k for k in before if before[k] != after[k]} == {("head:lda", t) for t in range(5)}
    lda = json.loads(res.stdout)["heads"]["lda"]
    assert lda["acc_matrix"] != lda_before["acc_matrix"]  # a heavily shrunk covariance changes the head
    assert open_run(run_copy).cfg.heads.of("lda").shrinkage == 0.5
    # again: nothing to do; --force refits the selected head only
    assert cli("heads", run_copy, "--head", "lda").exit_code == 0 and all_markers(run_copy) == after
    res = cli("heads", run_copy, "--head", "ncm", "--task", 1, "--force")
    assert res.exit_code == 0
    again = all_markers(run_copy)
    assert {k for k in after if after[k] != again[k]} == {("head:ncm", 0), ("head:ncm", 1)}


def test_editing_the_ridge_does_not_redo_fit_stats(run_copy):
    before = all_markers(run_copy)
    assert cli("config", run_copy, "--set", "stats.ridge=0.001").exit_code == 0
    run = open_run(run_copy)
    assert all(run.state("stats", t) == "done" for t in range(5))
    assert run.state("align", 1) == "stale" and run.state("head:lda", 4) == "done"
    assert cli("run", run_copy).exit_code == 0
    after = all_markers(run_copy)
    redone = {k for k in before if before[k] != after[k]}
    # align (and what reads it) depends on stats.ridge; statistics and the other heads stay
    assert redone == {(s, t) for t in range(5) for s in ("align", "eval", "head:ca")}


def test_heads_command_errors_are_one_line(run_copy):
    res = cli("heads", run_copy, "--head", "knn")
    assert res.exit_code == 1 and "unknown head 'knn'" in res.stderr and "ranpac" in res.stderr
    res = cli("heads", run_copy, "--set", "heads.ranpac.dim=0")
    assert res.exit_code == 2 and "heads.ranpac.dim: must be >= 1" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_a_config_key_added_later_at_its_default_keeps_stages_done(run_copy):
    """A marker written before a config key existed: the key at its default cannot have changed the result."""
    res = cli("status", run_copy)  # heads folded into one column, readable at 80 columns
    assert res.exit_code == 0 and res.stdout.count("6/6") == 5
    path = run_copy / "tasks" / "000" / "train.done.json"
    marker = json.loads(path.read_text())
    del marker["config"]["benchmark"]["normalization"]  # as written by a clpt without that key
    path.write_text(json.dumps(marker))
    run = open_run(run_copy)
    assert run.state("train", 0) == "done" and run.state("eval", 4) == "done"
    marker["config"]["benchmark"]["seed"] = 7  # a recorded value that differs still makes it stale
    path.write_text(json.dumps(marker))
    assert open_run(run_copy).state("train", 0) == "stale"


def test_a_usage_error_exits_2_as_the_readme_says():
    from pathlib import Path

    res = CliRunner().invoke(app, ["status", "somewhere", "--jsn"])
    assert res.exit_code == 2 and "--jsn" in res.stderr
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "2 a usage error of the command line" in readme


def test_config_defaults_lists_every_key_with_its_default_and_meaning():
    from clpt import config as C
    from clpt.stages.resolve import default_config

    res = CliRunner().invoke(app, ["config", "--defaults"])
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    keys = {line.split()[0] for line in lines}
    flat = C.flatten(C.to_dict(default_config()))
    assert set(flat) <= keys  # every key of the resolved config, heads' and drift methods' included
    assert any(line.startswith("heads.ranpac.dim ") and "10000" in line for line in lines)
    assert any(line.startswith("train.kd_feat ") and "# weight of" in line for line in lines)
    res = CliRunner().invoke(app, ["init", "x", "--set", "train.lr=-1"])
    assert res.exit_code == 2 and "clpt config --defaults" in res.stderr


def test_a_creation_cut_short_is_continued_by_the_same_command(tmp_path):
    """issue 23, item 6: a creation that failed on a full disk (or was killed) before config.yaml left
    manifest.json / benchmark.json / temporary files; the same command then creates the run, as its
    message promised, while a folder holding anything else is still refused."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("manifest.json", "benchmark.json", ".benchmark.json.x1y2.tmp", ".clpt.lock"):
        (run / name).write_text("{")  # half-written, as a full disk leaves them
    res = CliRunner().invoke(app, ["init", str(run)])
    assert res.exit_code == 0, res.stderr
    assert (run / "config.yaml").is_file() and json.loads((run / "benchmark.json").read_text())["n_classes"] == 50
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    res = CliRunner().invoke(app, ["init", str(other)])
    assert res.exit_code == 1 and "exists and is not empty" in res.stderr


def test_flags_show_no_value_placeholder_in_help():
    """issue 23, item 17: `--force <bool>` read as if the flag took a value."""
    res = CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "160"})
    assert res.exit_code == 0
    force = next(line for line in res.stdout.splitlines() if "--force" in line)
    assert "<bool>" not in res.stdout and "Redo the stage" in force
    task = next(line for line in res.stdout.splitlines() if "--task" in line)
    assert "<int>" in task  # options that take a value keep theirs
