"""Using what a run learned: `clpt predict`, `clpt export`, `clpt.load_model` (README "Use what it learned")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clpt.data.transforms import EvalTransform
from clpt.inference import expand_inputs
from clpt_cli.main import app


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_the_test_transform_of_a_file_is_the_tensor_the_arrays_pipeline_sees():
    """A PNG of an in-memory test image gives exactly the tensor the evaluation's batch transform gives."""
    from clpt.data import transforms as T

    g = np.random.default_rng(0)
    img = g.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    batch = T.to_float(torch.from_numpy(img)[None])
    for kind, size, want in (
        ("builtin", 32, batch),
        ("arrays", 48, T.resize_center_crop(batch, round(48 * 256 / 224), 48)),
    ):
        tf = EvalTransform(kind, size, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
        got = tf(Image.fromarray(img))
        assert torch.equal(got, T.normalize(want, tf.mean, tf.std)[0])
        assert EvalTransform.from_dict(tf.to_dict()) == tf


def test_inputs_are_files_folders_and_stdin(tmp_path):
    import io

    (tmp_path / "a" / "b").mkdir(parents=True)
    for p in ("a/x.png", "a/b/y.JPG", "a/notes.txt", "z.png"):
        (tmp_path / p).write_bytes(b"")
    got = expand_inputs(
        [str(tmp_path / "a"), str(tmp_path / "z.png"), "-"], io.StringIO("q.jpg\n\n r.png \n")
    )
    assert got == [
        tmp_path / "a/b/y.JPG",
        tmp_path / "a/x.png",
        tmp_path / "z.png",
        Path("q.jpg"),
        Path("r.png"),
    ]


def _write_test_images(run_root: Path, folder: Path, task: int) -> None:
    """The run's test images of the classes seen by `task`, as PNG files in the cached row order."""
    from clpt.data.benchmark import load_benchmark
    from clpt.run import open_run
    from clpt.stages.extract import rows_of

    run = open_run(run_root)
    bench = load_benchmark(run.cfg.benchmark)
    folder.mkdir()
    for k, r in enumerate(rows_of(bench.test, range(run.info.tasks[task][1]))):
        name = run.info.class_names[int(bench.test.labels[r])]
        Image.fromarray(bench.test.images[r]).save(folder / f"{k:05d}_{name}.png")


def _accuracy(doc: dict) -> float:
    rows = doc["predictions"]
    return sum(r["top"][0]["class"] == Path(r["path"]).stem.split("_", 1)[1] for r in rows) / len(rows)


def test_predicting_the_test_images_as_files_gives_the_recorded_accuracy_of_every_head(
    finished_run, tmp_path
):
    """The invariant: for the method's own classifier and every head, `clpt predict` on the run's test
    images (PNG files) scores exactly the accuracy `clpt eval` / `clpt heads` recorded for that task."""
    from clpt import artifacts
    from clpt.heads import HEADS

    t = 4
    _write_test_images(finished_run, tmp_path / "imgs", t)
    before = sorted((p, p.stat().st_mtime_ns) for p in finished_run.rglob("*") if p.is_file())
    recorded = {"own": json.loads(artifacts.eval_path(finished_run, t).read_text())["accuracy"]}
    for name in HEADS.names():
        recorded[name] = json.loads(artifacts.head_eval_path(finished_run, name, t).read_text())["accuracy"]
    for name, acc in recorded.items():
        res = _cli("predict", finished_run, tmp_path / "imgs", "--head", name, "--format", "json", "-k", "2")
        assert res.exit_code == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["task"] == t and len(doc["predictions"]) == 2000  # 40 test images of each of 50 classes
        assert _accuracy(doc) == pytest.approx(acc, abs=1e-6), name
    after = sorted((p, p.stat().st_mtime_ns) for p in finished_run.rglob("*") if p.is_file())
    assert before == after  # read-only
    res = _cli(
        "predict", finished_run, "--split", "test", "--format", "json"
    )  # the generated images themselves
    assert res.exit_code == 0 and _accuracy_split(json.loads(res.stdout)) == pytest.approx(
        recorded["own"], abs=1e-6
    )


def _accuracy_split(doc: dict) -> float:
    rows = doc["predictions"]
    return sum(r["top"][0]["class"] == r["true"] for r in rows) / len(rows)


def test_an_export_predicts_as_the_run_does_with_clpt_torch_export_and_without_the_run(
    finished_run, tmp_path
):
    import clpt

    imgs = tmp_path / "imgs"
    _write_test_images(finished_run, imgs, 1)
    for head in ("own", "fecam", "ranpac"):
        out = tmp_path / f"export-{head}"
        onnx = ["--onnx"] if head == "fecam" else []  # the slowest head to convert: once is enough
        res = _cli("export", finished_run, out, "--task", "1", "--head", head, "--json", *onnx)
        assert res.exit_code == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["provenance"]["task"] == 1 and set(doc["provenance"]["sha256"]) == {
            "backbone.safetensors", "head.safetensors", "model.pt2", *(["model.onnx"] if onnx else [])}  # fmt: skip
        from_run = json.loads(
            _cli("predict", finished_run, imgs, "--task", "1", "--head", head, "-f", "json").stdout
        )
        from_export = json.loads(_cli("predict", out, imgs, "-f", "json").stdout)
        assert [r["top"] for r in from_export["predictions"]] == [r["top"] for r in from_run["predictions"]]
        model = clpt.load_model(out)
        x = torch.stack([model.preprocess(Image.open(p)) for p in sorted(imgs.iterdir())[:40]])
        with torch.no_grad():
            scores = model(x)
            program = torch.export.load(str(out / "model.pt2")).module()
            torch.testing.assert_close(program(x), scores, rtol=1e-4, atol=1e-4)
        assert scores.shape == (40, 20) and len(model.classes) == 20
        assert torch.equal(program(x).argmax(1), scores.argmax(1))
        if onnx:
            import onnxruntime

            sess = onnxruntime.InferenceSession(str(out / "model.onnx"))
            (got,) = sess.run(["scores"], {"images": x.numpy()})
            np.testing.assert_allclose(got, scores.numpy(), rtol=1e-3, atol=1e-3)
            assert (got.argmax(1) == scores.argmax(1).numpy()).all()
    (out / "head.safetensors").write_bytes(b"x" + (out / "head.safetensors").read_bytes()[1:])
    res = _cli("predict", out, imgs)
    assert res.exit_code == 4 and "does not match its sha256" in res.stderr


def test_predict_and_export_say_what_is_wrong(finished_run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(good)
    res = _cli("predict", finished_run, good, bad, tmp_path / "missing.jpg", "-f", "jsonl")
    assert res.exit_code == 4
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert "top" in rows[0] and "cannot decode" in rows[1]["error"] and rows[2]["error"] == "no such file"
    assert res.stderr.count("error:") == 3  # each bad image, then the summary line
    for args, code, needle in (
        (["--head", "nope"], 1, "choose --head among"),
        (["--task", "7"], 1, "does not exist"),
        (["--format", "xml"], 2, "--format"),
        (["--split", "test", "--head", "ncm+drift"], 1, "no head 'ncm+drift'"),
    ):
        res = _cli("predict", finished_run, *([] if "--split" in args else [good]), *args)
        assert res.exit_code == code and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, (
            res.stderr
        )
    res = _cli("export", finished_run, good)
    assert res.exit_code == 1 and "not an empty folder" in res.stderr
