"""`clpt report`: synthetic finished runs with known numbers, every format parsed back, the PNGs, the
published table, and `clpt run --seeds`."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clpt import artifacts
from clpt.run import create_run
from clpt.stages import resolve as R
from clpt.stages import run_order
from clpt_cli.main import app


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def fake_run(
    root: Path, seed: int, rows: list[list[float]], extra: list[str] = (), finish: bool = True
) -> Path:
    """A run on the built-in benchmark whose stages are marked done through clpt's own marker code,
    with evaluation rows `rows` (row i: accuracy on tasks 0..i after task i); no training happens."""
    cfg = R.resolve(None, [f"seed={seed}", f"benchmark.seed={seed}", "heads.enabled=[]", *extra])
    run = create_run(root, cfg)
    n_tasks = run.info.n_tasks if finish else 1
    for t in range(n_tasks):
        for stage in run_order(run.cfg):
            inputs = run.require(stage, t)
            if stage == "eval":
                per = rows[t]
                out = artifacts.eval_path(root, t)
                artifacts.write_eval(out, {"task": t, "per_task": per, "accuracy": float(np.mean(per)),
                                           "n_test": 400 * (t + 1)})  # fmt: skip
            else:
                out = artifacts.task_dir(run.root, t) / f"{stage}.fake"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text("x")
            run.complete(
                stage, t, inputs, [out], 1.0, {"cost": {"seconds": 1.0, "peak_host_mib": 100.0 + seed}}
            )
    return root


def rows_for(a: float) -> list[list[float]]:
    """Five tasks: task j's accuracy after task i is a - 0.05 (i - j)."""
    return [[a - 0.05 * (i - j) for j in range(i + 1)] for i in range(5)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    for seed, a in ((1993, 0.80), (1996, 0.90), (1997, 0.85)):
        fake_run(root / "slca" / f"seed_{seed}", seed, rows_for(a))
    fake_run(root / "tau" / "seed_1993", 1993, rows_for(0.70), ["align.tau=0.2"])
    fake_run(root / "unfinished", 1993, rows_for(0.5), finish=False)
    return root


def test_groups_mean_std_and_the_unfinished_run(runs):
    res = cli("report", runs, "--format", "json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [s["run"].endswith("unfinished") for s in doc["skipped"]] == [True]
    assert "unfinished: 1 of 5 tasks evaluated" in doc["skipped"][0]["why"]
    by = {r["group"]: r for r in doc["rows"]}
    assert len(by) == 2  # align.tau differs: two groups, each named by what differs
    three = next(r for g, r in by.items() if "align.tau=0.1" in g)
    one = next(r for g, r in by.items() if "align.tau=0.2" in g)
    # Last-Acc of each run: mean of [a - 0.2, a - 0.15, a - 0.1, a - 0.05, a] = a - 0.1
    lasts = np.array([0.70, 0.80, 0.75])  # machine output: fractions
    assert three["last_acc"]["n"] == 3 and three["seeds"] == [1993, 1996, 1997]
    assert three["last_acc"]["mean"] == pytest.approx(lasts.mean())
    assert three["last_acc"]["std"] == pytest.approx(lasts.std(ddof=1))  # 5.0
    # forgetting: max earlier accuracy (a, on the diagonal) minus the last row, averaged over tasks 0..3
    assert three["forgetting"]["mean"] == pytest.approx(np.mean([0.2, 0.15, 0.1, 0.05]))
    assert three["forgetting"]["std"] == pytest.approx(0.0, abs=1e-9)
    assert one["last_acc"] == {"mean": pytest.approx(0.60), "std": 0.0, "n": 1}
    assert three["cost"]["peak_host_mib"] == pytest.approx(100 + np.mean([1993, 1996, 1997]), rel=1e-5)  # 6 digits


def test_every_format_parses_back(runs):
    rows = list(csv.DictReader(io.StringIO(cli("report", runs, "-f", "csv").stdout)))
    assert len(rows) == 2 and {r["n_seeds"] for r in rows} == {"3", "1"}
    assert float(next(r for r in rows if r["n_seeds"] == "3")["last_acc_mean"]) == pytest.approx(0.75)
    md = cli("report", runs, "-f", "markdown").stdout.strip().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert len(table) == 2 + 2 and len({line.count("|") for line in table}) == 1
    assert "75.00 ± 5.00" in table[2] + table[3]
    assert any(line.startswith("- skipped") for line in md)
    tex = cli("report", runs, "-f", "latex").stdout
    assert tex.startswith("\\begin{tabular}") and tex.count("\\\\") == 3 and "75.00 $\\pm$ 5.00" in tex
    assert cli("report", runs, "-f", "yaml").exit_code == 1
    piped = cli("report", runs).stdout  # the terminal table, piped: natural width, a row a line
    if "COLUMNS" not in os.environ:  # an explicit COLUMNS is rich's to honour
        assert sum("75.00 ± 5.00" in line and "slca" in line for line in piped.splitlines()) == 1


def test_plots_are_valid_pngs_with_their_panels(runs, tmp_path):
    res = cli("report", runs, "--plots", tmp_path / "fig", "-f", "json")
    assert res.exit_code == 0 and json.loads(res.stdout)  # stdout stays one JSON document
    files = sorted(p.name for p in (tmp_path / "fig").iterdir())
    heatmaps = [f for f in files if f.startswith("heatmap_")]
    assert files[:2] == ["accuracy_curves.png", "final_per_task.png"] and len(heatmaps) == 4
    assert sorted(f.rsplit("_seed", 1)[1] for f in heatmaps) == [
        "1993.png",
        "1993.png",
        "1996.png",
        "1997.png",
    ]
    tau = 0
    for p in (tmp_path / "fig").iterdir():
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            what = json.loads(im.text["Description"])
        assert what["panels"] == 1
        if what["kind"] == "curves":  # issue 23, item 19: tasks from 0, n = 1 named
            assert what["lines"] == 2 and what["x"] == "after task, from 0"
            assert sum("(n=1)" in label for label in what["labels"]) == 1
        if what["kind"] == "heatmap":  # each names its run's own settings
            assert what["tasks"] == 5 and "heads.enabled=[]" in what["settings"]
            tau += "align.tau=0.2" in what["settings"]
        if what["kind"] == "final_per_task":  # the axis starts near the bars (lowest 50 %), not at 0
            assert what["y_from"] == 40
    assert tau == 1  # the one run with align.tau=0.2 says so on its heatmap


def test_published_entries_carry_sources_and_flag_protocol_differences():
    from clpt import published as P

    assert P.TABLE and all(p.source and p.backbone and p.convention for p in P.TABLE)
    slca = {p.metric: p.value for p in P.lookup("slca", "cifar100")}
    assert slca == {"last_acc": 91.53, "inc_acc": 94.09}
    p = P.lookup("slca", "cifar100")[0]
    same = {"backbone": p.backbone, "normalization": "dataset", "split": [10, 10], "seeds": 3}
    assert P.protocol_flags(p, same) == []
    flags = P.protocol_flags(
        p, {**same, "backbone": "vit_base_patch16_224.augreg2_in21k_ft_in1k", "seeds": 1}
    )
    assert len(flags) == 2 and "augreg2" in flags[0] and "1 seed" in flags[1]


def test_run_seeds_makes_one_run_per_seed_and_continues(tmp_path, tiny, clpt_cache):
    args = ["run", tmp_path / "s", "--seeds", "1993,1996", *sum((["--set", o] for o in tiny), []),
            "--set", "heads.enabled=[]", "--set", "train.batch_size=128"]  # fmt: skip
    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    runs = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert runs == ["seed_1993", "seed_1996"]
    cfgs = [R.load_resolved(tmp_path / "s" / r / "config.yaml") for r in runs]
    assert [(c.seed, c.benchmark.seed) for c in cfgs] == [(1993, 1993), (1996, 1996)]
    again = cli(*args)  # continued, not overwritten
    assert again.exit_code == 0 and "train        done already" in again.stderr
    assert cli("run", tmp_path / "s", "--seeds", "1993,x").exit_code == 1


def test_progress_goes_to_stderr_only_and_quiet_silences_it(capsys, monkeypatch):
    from clpt import progress

    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    progress.configure(enabled=True)  # stderr is not a terminal here: plain lines
    with progress.bar("task 0 train, epoch 1/1", total=10) as shown:
        for _ in range(5):
            shown.advance(2)
    out, err = capsys.readouterr()
    assert out == "" and "task 0 train, epoch 1/1: 10/10 img" in err
    progress.configure(enabled=False)
    with progress.bar("quiet", total=10) as shown:
        shown.advance(10)
    assert capsys.readouterr() == ("", "")
    progress.configure(enabled=True)


def test_top5_and_old_new_accuracy_in_both_conventions():
    import torch

    from clpt.evaluate import accuracy_row, metrics

    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [0, 5, 1, 1, 1, 1], [5, 0, 0, 0, 0, 0]])
    labels = torch.tensor([0, 0, 1, 4])
    row = accuracy_row(logits, labels, [[0, 2], [2, 6]])
    assert row["accuracy"] == 0.5 and row["top5"] == 0.75  # label 0 of row 2 is outside its top 5
    assert row["per_task"] == pytest.approx([2 / 3, 0.0]) and row["per_task_n"] == [3, 1]
    m = metrics([[1.0], [0.5, 0.9], [0.6, 0.3, 0.8]], [1.0, 0.7, 0.55], counts=[100, 300, 100])
    assert m["old_task_acc"] == pytest.approx(0.45)  # task-averaged: (0.6 + 0.3) / 2
    assert m["old_acc"] == pytest.approx((0.6 * 100 + 0.3 * 300) / 400)  # sample-weighted
    assert m["new_acc"] == 0.8 and metrics([[1.0]], [1.0])["old_acc"] is None


def test_test_accuracy_every_n_epochs_is_recorded_and_changes_no_result(tmp_path, tiny, finished_run):
    run = tmp_path / "watch"
    res = cli("run", run, "--json", *sum((["--set", o] for o in tiny), []),
              "--set", "system.eval_every=1", "--set", "heads.enabled=[]")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    marker = json.loads((run / "tasks" / "002" / "train.done.json").read_text())
    during = marker["summary"]["test_acc_during_training"]
    assert [d["epoch"] for d in during] == [1] and 0 < during[0]["test_acc"] <= 1
    assert "test accuracy on classes 0-29" in res.stderr
    ref = json.loads(cli("eval", finished_run, "--task", 4, "--json").stdout)
    assert json.loads(res.stdout)["acc_matrix"] == ref["acc_matrix"]  # monitoring changed nothing


def test_head_fitting_shows_progress_on_stderr_and_json_stays_valid(run_copy, monkeypatch):
    """fit-stats (rows), align (epochs) and a head streaming cached features (rows of each task)."""
    from clpt import progress

    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    stats = cli("fit-stats", run_copy, "--task", 1, "--force")
    assert stats.exit_code == 0, stats.stderr
    assert stats.stdout == "" and "task 1 fit-stats: 1200/1200 row" in stats.stderr
    align = cli("align", run_copy, "--task", 1, "--force")
    assert align.exit_code == 0 and "task 1 align: 2/2 epoch" in align.stderr
    head = cli("heads", run_copy, "--head", "ranpac", "--task", 1, "--force")
    assert head.exit_code == 0, head.stderr
    assert "task 0 head:ranpac, features of task 0: 1200/1200 row" in head.stderr
    # incremental: task 1 continues task 0's Gram and reads task 1's features alone
    assert "task 1 head:ranpac, features of task 1: 1200/1200 row" in head.stderr
    assert "task 1 head:ranpac, features of task 0" not in head.stderr
    res = cli("eval", run_copy, "--task", 1, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["task"] == 1
    quiet = cli("--quiet", "fit-stats", run_copy, "--task", 1, "--force")
    assert quiet.exit_code == 0 and "fit-stats:" not in quiet.stderr


def test_one_seed_shows_no_spread():
    from clpt.report import _pm

    assert _pm({"mean": 80.45, "std": 0.0, "n": 1}) == "80.45"
    assert _pm({"mean": 80.45, "std": 0.0, "n": 2}) == "80.45 ± 0.00"
    assert _pm({"mean": 75.0, "std": 5.0, "n": 2}, latex=True) == "75.00 $\\pm$ 5.00"


def test_ranpac_rows_carry_their_true_backbone_and_cars_split():
    """Issue 23, items 1-2: RanPAC's ImageNet-R / ImageNet-A / CUB rows used AugReg IN-21K fine-tuned on IN-1K,
    and its Cars split is 16 + 9 x 20: a run that differs is flagged, one that follows the row is not."""
    from clpt.published import lookup, protocol_flags
    from clpt.stages import resolve as R

    for bench in ("imagenet-r", "imagenet-a", "cub200"):
        (row,) = lookup("ranpac_frozen", bench)
        assert row.backbone == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    (cars,) = lookup("ranpac_frozen", "cars196")
    assert cars.split == (16, 20) and cars.normalization == "none"
    before = {"backbone": cars.backbone, "normalization": "imagenet", "split": [20, 20], "seeds": 1}
    assert protocol_flags(cars, before) == ["normalisation imagenet (paper: none)", "split 20+20 (paper: 16+20)"]
    # the presets of both rows now follow it on Cars (MIST's keep its own code's normalisation)
    for method in ("ranpac_frozen", "simplecil"):
        cfg = R.resolve(overrides=[f"method={method}", "benchmark.name=cars196", "benchmark.root=/d"])
        ours = {"backbone": cars.backbone, "normalization": cfg.benchmark.normalization,
                "split": [cfg.benchmark.init_classes, cfg.benchmark.increment], "seeds": 1}  # fmt: skip
        assert protocol_flags(cars, ours) == []
    cfg = R.resolve(overrides=["method=ranpac_mist", "benchmark.name=cars196", "benchmark.root=/d"])
    assert cfg.benchmark.normalization == "imagenet"


def test_ranpac_cifar_rows_use_the_whole_image_at_test_and_a_run_that_crops_is_flagged():
    """issue 23, item 4: RanPAC tests CIFAR with Resize(224) + CenterCrop(224) (the whole upsampled image);
    its presets follow the row, SLCA's keep Resize(256) + CenterCrop(224), and a crop is flagged."""
    from clpt.published import lookup, protocol_flags
    from clpt.stages import resolve as R

    (row,) = lookup("ranpac_frozen", "cifar100")
    assert row.test_resize == "full"
    ours = {"backbone": row.backbone, "normalization": "none", "split": [10, 10], "seeds": 1}
    assert protocol_flags(row, {**ours, "test_resize": "crop"}) == ["test resize crop (paper: full)"]
    assert protocol_flags(row, {**ours, "test_resize": "full"}) == []
    for method, want in (("ranpac_frozen", "full"), ("simplecil", "full"), ("slca", "crop")):
        cfg = R.resolve(overrides=[f"method={method}", "benchmark.name=cifar100", "benchmark.root=/d"])
        assert cfg.benchmark.test_resize == want, method
    (slca,) = [p for p in lookup("slca", "cifar100") if p.metric == "last_acc"]
    assert protocol_flags(slca, {**ours, "normalization": "dataset", "backbone": slca.backbone,
                                 "seeds": 3, "test_resize": "crop"}) == []  # fmt: skip


def test_an_identical_curve_is_named_in_the_legend_not_hidden(tmp_path):
    """issue 23, item 19: a method's own line (SLCA's = its ca head) hid an identical head line."""
    from clpt.plots import write_plots

    curve = {"mean": [90.0, 85.0, 80.0], "std": [0.0, 0.0, 0.0]}
    rows = [{"group": "slca on builtin", "classifier": c, "seeds": [1993], "accuracies": curve,
             "final_per_task": {"mean": [80.0, 82.0, 78.0], "std": [0.0] * 3}} for c in ("slca", "head:ca")]  # fmt: skip
    rows.append({**rows[0], "classifier": "head:ncm", "accuracies": {"mean": [91.0, 84.0, 79.0], "std": [0.0] * 3}})
    write_plots(tmp_path, [], rows)
    with Image.open(tmp_path / "accuracy_curves.png") as im:
        labels = json.loads(im.text["Description"])["labels"]
    assert labels[1].endswith("identical to slca") and "identical" not in labels[0] + labels[2]
