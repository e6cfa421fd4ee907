"""Growing a run with classes that arrive later (`clpt add-task`, clpt.stages.grow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from clpt_cli.main import app

SMALL = ["backbone.name=clpt_vit_micro", "train.epochs=1", "train.milestones=[1]", "align.epochs=2",
         "align.samples_per_class=32", "system.num_workers=0", "benchmark.name=stream"]  # fmt: skip


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _sets(*overrides):
    return [x for o in overrides for x in ("--set", o)]


def make_arrivals(root: Path, sizes=(4, 4, 3), train=12, test=4) -> list[Path]:
    """Folders arrive0.. of plain-colour classes a0.., b0.., c0.. (train/ and test/), and `all` with every class."""
    rng = np.random.default_rng(0)
    colors = rng.integers(0, 256, size=(sum(sizes), 3))
    folders, c = [], 0
    for k, n in enumerate(sizes):
        for j in range(n):
            for split, m in (("train", train), ("test", test)):
                for i in range(m):
                    arr = np.clip(colors[c] + rng.normal(0, 25, size=(36, 36, 3)), 0, 255).astype(np.uint8)
                    for base in (root / f"arrive{k}", root / "all"):
                        p = base / split / f"{'abc'[k]}{j}" / f"{i}.png"
                        p.parent.mkdir(parents=True, exist_ok=True)
                        Image.fromarray(arr).save(p)
            c += 1
        folders.append(root / f"arrive{k}")
    return folders


def test_a_grown_run_equals_a_run_created_with_all_its_classes(tmp_path, clpt_cache):
    """The invariant: three folders added one after another give the accuracy matrix, for every head, of a
    run created over all those classes in the same order (same seeds); tasks of different sizes (4, 4, 3)."""
    folders = make_arrivals(tmp_path)
    grown = tmp_path / "grown"
    res = _cli("run", grown, *_sets(*SMALL, f"benchmark.root={folders[0]}", "benchmark.init_classes=4",
                                    "benchmark.increment=4"))  # fmt: skip
    assert res.exit_code == 0, res.stderr
    # a head's carry (what the next task's fit continues from) is kept for the latest task only: not an artifact
    before = {p: p.stat().st_mtime_ns for p in (grown / "tasks").rglob("*")
              if p.is_file() and not p.name.endswith(".carry.safetensors")}  # fmt: skip
    for f in folders[1:]:
        res = _cli("add-task", grown, f, "--json")
        assert res.exit_code == 0, res.stderr
        assert {p: p.stat().st_mtime_ns for p in before} == before  # earlier artifacts untouched
        res = _cli("run", grown, "--json")
        assert res.exit_code == 0, res.stderr
    g = json.loads(res.stdout)
    res = _cli("run", tmp_path / "whole", "--json", *_sets(*SMALL, f"benchmark.root={tmp_path / 'all'}",
                                                           "benchmark.init_classes=4", "benchmark.increment=4"))  # fmt: skip
    assert res.exit_code == 0, res.stderr
    w = json.loads(res.stdout)
    assert g["n_tasks"] == w["n_tasks"] == 3 and [len(r) for r in g["acc_matrix"]] == [1, 2, 3]
    assert g["acc_matrix"] == w["acc_matrix"]
    assert set(g["heads"]) == set(w["heads"]) and len(g["heads"]) >= 5
    for name in w["heads"]:
        assert g["heads"][name]["acc_matrix"] == w["heads"][name]["acc_matrix"], name
    bench = json.loads((grown / "benchmark.json").read_text())
    assert bench["tasks"] == [[0, 4], [4, 8], [8, 11]] and bench["class_names"][-3:] == ["c0", "c1", "c2"]
    assert [a["task"] for a in bench["additions"]] == [1, 2]
    res = _cli("predict", grown, folders[2] / "test" / "c1", "-f", "json", "--head", "ncm")
    assert res.exit_code == 0 and {r["top"][0]["class"] for r in json.loads(res.stdout)["predictions"]} == {
        "c1"
    }
    # the report and plots take tasks of different sizes
    res = _cli("report", grown, "--plots", tmp_path / "plots")
    assert res.exit_code == 0, res.stderr


def test_bad_additions_get_one_line_and_change_nothing(tmp_path):
    """Run-creation only (no training): each bad folder is refused and the run's records stay byte for byte."""
    folders = make_arrivals(tmp_path, sizes=(2, 2, 2), train=3, test=1)
    run = tmp_path / "run"
    res = _cli("init", run, *_sets(*SMALL, f"benchmark.root={folders[0]}", "benchmark.init_classes=2",
                                   "benchmark.increment=2"))  # fmt: skip
    assert res.exit_code == 0, res.stderr

    def records():
        return {p.name: p.read_bytes() for p in (run / "benchmark.json", run / "manifest.json")}

    clean = records()
    empty = tmp_path / "empty"
    (empty / "x").mkdir(parents=True)
    one = tmp_path / "one"
    (one / "solo").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(one / "solo" / "0.png")
    no_test = tmp_path / "no_test"
    for split in ("train", "test"):
        (no_test / split / "q").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(no_test / "train" / "q" / "0.png")
    corrupt = tmp_path / "corrupt"
    for split in ("train", "test"):
        (corrupt / split / "z").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(corrupt / split / "z" / "0.png")
    (corrupt / "train" / "z" / "1.png").write_bytes(b"\x89PNG broken")
    for folder, code, needle in (
        (folders[0], 4, "already in the run"),
        (empty, 4, "hold"),
        (one, 4, "at least two"),
        (no_test, 4, "hold no images"),
        (corrupt, 4, "cannot be read as images"),
        (tmp_path / "nowhere", 4, "does not exist"),
    ):
        res = _cli("add-task", run, folder)
        assert res.exit_code == code and needle in res.stderr, (folder, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and records() == clean
    res = _cli("add-task", run, folders[1], "--test-fraction", "1.5")
    assert res.exit_code == 2 and records() == clean
    from clpt.lock import run_lock

    with run_lock(run, wait=False):  # another command is writing the run
        res = _cli("add-task", run, folders[1])
    assert res.exit_code == 1 and "in use by process" in res.stderr and records() == clean
    res = _cli("add-task", run, folders[1])
    assert res.exit_code == 0 and json.loads((run / "benchmark.json").read_text())["tasks"][-1] == [2, 4]
    builtin = tmp_path / "builtin"
    assert _cli("init", builtin).exit_code == 0
    res = _cli("add-task", builtin, folders[2])
    assert res.exit_code == 1 and "benchmark.name=stream" in res.stderr


def test_a_held_out_split_depends_only_on_the_class_its_files_and_the_seed(tmp_path):
    from clpt.data.readers import read_class_folders

    for c, n in (("p", 10), ("q", 5)):
        (tmp_path / c).mkdir()
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / c / f"{i}.png")
    raw = read_class_folders(tmp_path, test_fraction=0.2, split_seed=3)
    assert list(np.bincount(raw.test.labels)) == [2, 1] and list(np.bincount(raw.train.labels)) == [8, 4]
    (tmp_path / "a_first").mkdir()  # a class sorted before the others: their splits do not move
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / "a_first" / f"{i}.png")
    again = read_class_folders(tmp_path, test_fraction=0.2, split_seed=3)
    assert set(raw.test.paths) <= set(again.test.paths)
    assert read_class_folders(tmp_path, test_fraction=0.2, split_seed=4).test.paths != again.test.paths
