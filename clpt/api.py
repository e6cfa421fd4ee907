"""The library's front door for using what a run learned (README "Use what it learned").

    import clpt
    model = clpt.classifier("runs/demo")               # the method's own classifier after the last task
    rows = clpt.predict(model, ["photos/"], k=3)       # one row per image: top-k classes and scores
    scores = model(torch.stack([model.preprocess(im) for im in images]))   # tensors in, (B, C) scores out
    clpt.add_task("runs/stream", "arrivals/2026-12")   # then clpt.run_one("runs/stream") trains it
    clpt.export("runs/demo", "exports/demo")           # self-contained; clpt.load_model("exports/demo")

Each function is what the command of the same name does (`clpt predict`, `clpt add-task`,
`clpt export`), with the same checks and one-line errors (`clpt.errors.ClptError`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from clpt.exports import load_model, write_export
from clpt.inference import Classifier, expand_inputs, predict_files


def classifier(run_dir: str | Path, task: int | None = None, head: str | None = None,
               device: str | torch.device = "cpu") -> Classifier:  # fmt: skip
    """The classifier of a run folder (task: default the last fitted; head: default the method's own)
    or of an export folder (`clpt export`)."""
    from clpt.stages.predict import open_source

    model, _, _ = open_source(Path(run_dir), task, head, torch.device(device))
    return model


def predict(model: Classifier, inputs: list[str | Path], k: int = 5, batch_size: int = 256,
            device: str | torch.device = "cpu", precision: str = "fp32") -> list[dict]:  # fmt: skip
    """Rows for image files and folders (searched recursively): {"path", "top": [{"class", "label", "score"}]},
    or {"path", "error"} for an image that cannot be read."""
    paths = expand_inputs([str(p) for p in inputs])
    return list(predict_files(model, paths, torch.device(device), precision, batch_size, k))


def add_task(run_dir: str | Path, folder: str | Path, test_fraction: float = 0.2, wait: bool = False) -> dict:
    """Append the classes under `folder` as the run's next task (see `clpt add-task`)."""
    from clpt.lock import run_lock
    from clpt.run import open_run
    from clpt.stages.grow import add_task as grow

    run = open_run(Path(run_dir))  # not a run folder: that line, before any lock is taken
    with run_lock(run.root, wait):
        return grow(open_run(run.root), Path(folder), test_fraction)  # read again under the lock


def export(run_dir: str | Path, out: str | Path, task: int | None = None, head: str | None = None,
           program: bool = True, onnx: bool = False) -> dict:  # fmt: skip
    """Write a self-contained export of the run's classifier (see `clpt export`); returns its model.json."""
    from clpt.run import open_run
    from clpt.stages.predict import open_classifier

    model, record = open_classifier(open_run(Path(run_dir)), task, head)
    return write_export(
        Path(out), model, record["backbone"], record["head"], record["provenance"], program, onnx
    )


__all__ = ["Classifier", "add_task", "classifier", "export", "load_model", "predict"]
