"""Corruption is detected, never served: crc32c on every cached chunk, digests of result files in markers."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from clpt.run import open_run
from clpt_cli.main import app


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def flip_a_byte(chunk: Path, at: int = 40) -> None:
    data = bytearray(chunk.read_bytes())
    data[min(at, len(data) - 1)] ^= 0xFF
    chunk.write_bytes(bytes(data))


def one_line_error(res, code: int, *needles: str) -> None:
    assert res.exit_code == code, (res.exit_code, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in res.stderr, res.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])


def test_a_flipped_byte_in_a_feature_chunk_is_an_error_not_an_accuracy(run_copy):
    flip_a_byte(run_copy / "features.zarr" / "task_004" / "test" / "feats" / "c" / "0" / "0")
    res = cli("eval", run_copy, "--task", 4, "--force")
    one_line_error(res, 4, "test features of task 4 is damaged", f"clpt extract {run_copy} --task 4 --force")
    flip_a_byte(run_copy / "features.zarr" / "task_003" / "train" / "feats" / "c" / "0" / "0")
    res = cli("fit-stats", run_copy, "--task", 3, "--force")
    one_line_error(res, 4, "train features of task 3 is damaged", "clpt extract")
    assert cli("extract", run_copy, "--task", 3, "--force").exit_code == 0  # the named fix works


def test_a_damaged_statistics_chunk_names_fit_stats(run_copy):
    flip_a_byte(run_copy / "stats.zarr" / "task_002" / "m2" / "c" / "0" / "0" / "0")
    res = cli("align", run_copy, "--task", 2, "--force")
    one_line_error(res, 4, "statistics of task 2 is damaged", f"clpt fit-stats {run_copy} --task 2 --force")


def test_a_hand_edited_result_is_shown_damaged_and_never_reported(run_copy):
    before = json.loads(cli("eval", run_copy, "--task", 4, "--json").stdout)
    path = run_copy / "tasks" / "004" / "eval.json"
    row = json.loads(path.read_text())
    row["accuracy"] = 0.999
    path.write_text(json.dumps(row))
    doc = json.loads(cli("status", run_copy, "--json").stdout)
    assert doc["tasks"][4]["stages"]["eval"]["state"] == "damaged"
    assert open_run(run_copy).state("eval", 3) == "done"
    res = cli("eval", run_copy, "--task", 4, "--json")  # the report would read it: refused
    one_line_error(
        res,
        4,
        "eval of task 4 is damaged: tasks/004/eval.json was changed",
        f"clpt eval {run_copy} --task 4 --force",
    )
    assert cli("eval", run_copy, "--task", 4, "--force").exit_code == 0  # the named fix works
    head = run_copy / "tasks" / "004" / "heads" / "lda.json"
    head.write_text(head.read_text().replace('"task"', '"task" ', 1))
    assert open_run(run_copy).state("head:lda", 4) == "damaged"
    one_line_error(cli("run", run_copy), 4, "head:lda of task 4", "--head lda --task 4 --force")
    assert cli("heads", run_copy, "--head", "lda", "--force").exit_code == 0
    after = json.loads(cli("eval", run_copy, "--task", 4, "--json").stdout)
    assert after == before


def test_a_deleted_chunk_file_shows_the_stage_damaged_not_done(run_copy):
    """zarr reads a missing chunk as fill values: every store is written with every chunk, so a missing
    one is damage, seen by `clpt status` and named by the stage that reads it."""
    (run_copy / "features.zarr" / "task_004" / "test" / "feats" / "c" / "0" / "0").unlink()
    run = open_run(run_copy)
    assert run.state("extract", 4) == "damaged" and run.state("extract", 3) == "done"
    assert run.state("eval", 4) == "stale" and run.damaged_ancestor("eval", 4) == ("extract", 4)
    res = CliRunner().invoke(app, ["eval", str(run_copy), "--task", "4", "--force"])
    assert res.exit_code == 4 and "task_004/test/feats/c/0/0 is missing" in res.stderr
    assert "clpt extract" in res.stderr and "--force" in res.stderr


def test_a_large_result_file_is_verified_too(run_copy, monkeypatch):
    """Every result file has its SHA-256 in the marker; one over DIGEST_MAX_BYTES is re-hashed only when its
    size or modification time changed (an in-place overwrite changes the time)."""
    import os

    from clpt import run as run_mod

    monkeypatch.setattr(
        run_mod, "DIGEST_MAX_BYTES", 1 << 20
    )  # the built-in model.pt (3.3 MB) counts as large
    run = open_run(run_copy)
    old = run.marker("train", 2)
    path = run_copy / "tasks" / "002" / "model.pt"
    marker = run.complete("train", 2, old["inputs"], [path], old["seconds"], old["summary"])
    size = path.stat().st_size
    assert marker["stat"]["tasks/002/model.pt"][0] == size and "tasks/002/model.pt" in marker["digests"]
    assert open_run(run_copy).state("train", 2) == "done"
    with open(path, "r+b") as f:  # zero 64 KiB in place: same size, new modification time
        f.seek(size // 2)
        f.write(b"\0" * 65536)
    assert open_run(run_copy).state("train", 2) == "damaged"
    os.utime(path, ns=(marker["stat"]["tasks/002/model.pt"][1],) * 2)  # a forged time is trusted: as stated
    assert open_run(run_copy).state("train", 2) == "done"


def test_status_trusts_a_recorded_size_and_time_where_a_stage_hashes_the_file(run_copy):
    """`clpt status` (a view) re-hashes a result file only when its size or time differ from its marker's
    record; the stages that read it always hash a file under DIGEST_MAX_BYTES."""
    import os

    path = run_copy / "tasks" / "001" / "heads" / "ncm.safetensors"
    recorded = open_run(run_copy).marker("head:ncm", 1)["stat"]["tasks/001/heads/ncm.safetensors"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a tensor byte: same size
    path.write_bytes(bytes(data))

    def state() -> str:
        return json.loads(cli("status", run_copy, "--json").stdout)["tasks"][1]["stages"]["head:ncm"]["state"]

    assert state() == "damaged"  # the time changed: hashed, and found changed
    os.utime(path, ns=(recorded[1], recorded[1]))  # a forged time: the view trusts it, as stated
    assert state() == "done"
    assert open_run(run_copy).state("head:ncm", 1) == "damaged"  # what the stages see: hashed


def test_a_diverging_alignment_stops_and_json_never_prints_nan(run_copy):
    res = CliRunner().invoke(app, ["config", str(run_copy), "--set", "align.lr=1e30"])
    assert res.exit_code == 0
    res = CliRunner().invoke(app, ["run", str(run_copy)])
    assert res.exit_code == 1 and "diverged" in res.stderr and "align.lr" in res.stderr
    from clpt.units import machine

    assert machine({"a": [float("nan"), 1.0, float("inf")]}) == {"a": [None, 1.0, None]}
    assert machine({"acc": 0.8314999938011169, "pct": 83.49999785423279}) == {"acc": 0.8315, "pct": 83.5}


def test_cached_labels_rewritten_with_valid_checksums_are_found_when_the_store_opens(run_copy):
    """issue 23, item 3: a label chunk rewritten through zarr (its checksum valid) with a class outside the
    task's range, or another class inside it, is the damaged-features line naming `clpt extract`, before
    any work, not a kernel's ValueError."""
    import zarr

    labels = zarr.open_array(run_copy / "features.zarr" / "task_001" / "train" / "labels", mode="r+")
    y = labels[:]
    labels[:4] = 99  # far outside task 1's classes
    res = cli("fit-stats", run_copy, "--task", 1, "--force")
    one_line_error(res, 4, "train labels of task 1 are damaged (labels outside", f"clpt extract {run_copy} --task 1 --force")
    y2 = y.copy()
    y2[0] = y[-1]  # a class of the task, but not this row's
    labels[:] = y2
    res = cli("fit-stats", run_copy, "--task", 1, "--force")
    one_line_error(res, 4, "per-class counts differ")
    labels[:] = y
    assert cli("fit-stats", run_copy, "--task", 1, "--force").exit_code == 0


def test_a_damaged_cached_builtin_backbone_is_refused_and_other_weights_are_not_taken_for_the_runs(
    run_copy, clpt_cache, tmp_path, monkeypatch
):
    """The built-in backbone's cache carries the SHA-256 pre-training wrote; a flipped byte in it is one
    line naming `clpt pretrain-builtin --force`. Task 0 redone from other weights than backbone.json's
    is refused too."""
    import shutil

    from clpt.backbone import builtin_weights_path
    from clpt.io import digest_path, file_sha256

    cache = tmp_path / "cache"
    shutil.copytree(clpt_cache, cache)
    monkeypatch.setenv("CLPT_CACHE_DIR", str(cache))
    weights = builtin_weights_path()
    assert weights.parent == cache
    if not digest_path(weights).is_file():  # a cache from before the digest gets one at its first load
        assert cli("train-task", run_copy, "--task", 0, "--force").exit_code == 0
    assert digest_path(weights).read_text().strip() == file_sha256(weights)
    flip_a_byte(weights, at=weights.stat().st_size // 2)
    res = cli("train-task", run_copy, "--task", 0, "--force")
    one_line_error(res, 4, "cached weights", "are damaged", "clpt pretrain-builtin --force")
    digest_path(weights).write_text(file_sha256(weights) + "\n")  # other weights, their digest in order
    res = cli("train-task", run_copy, "--task", 0, "--force")
    one_line_error(res, 4, "not those the run started from")


def test_a_store_whose_arrays_are_gone_is_missing_and_redone_not_done(run_copy):
    """issue 23, item 9: an emptied statistics group left `clpt run` answering "done already"."""
    import shutil

    group = run_copy / "stats.zarr" / "task_002"
    for child in group.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    doc = json.loads(cli("status", run_copy, "--json").stdout)
    assert doc["tasks"][2]["stages"]["stats"]["state"] == "missing"
    res = cli("run", run_copy)
    assert res.exit_code == 0, res.stderr
    assert json.loads(cli("status", run_copy, "--json").stdout)["tasks"][2]["stages"]["stats"]["state"] == "done"
    assert (group / "m2" / "zarr.json").is_file()
