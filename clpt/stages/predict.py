"""A run's learned classifier, opened read-only: for `clpt predict`, `clpt export` and library users.

`open_classifier(run, task, head)` puts together the backbone of task T (its
model checkpoint), a fitted head (its saved state; by default the method's own
classifier: the aligned task heads, or its statistics head), the class names of
`benchmark.json` and the test transform the run's config records. Nothing is
written and no lock is taken, so it can run while another command works on the run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch

from clpt import artifacts, checkpoint
from clpt.data.registry import IMAGENET_MEAN, IMAGENET_STD, READERS
from clpt.data.transforms import EvalTransform
from clpt.errors import ClptError, MissingInputError, Redo
from clpt.heads import HEADS, HeadState, TaskHeadScores, restore_parts
from clpt.inference import Classifier, top_k
from clpt.stages.graph import classifier, head_name, head_names

OWN = "own"  # the method's own classifier (what `clpt eval` scores)


def test_transform(cfg) -> EvalTransform:
    """The run's test transform, from its config (the reader's family and normalisation)."""
    spec = READERS.get(cfg.benchmark.name)
    mean, std = {"dataset": (spec.mean, spec.std), "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                 "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}[cfg.benchmark.normalization]  # fmt: skip
    return EvalTransform.for_family(spec.family, cfg.benchmark.image_size, mean, std, cfg.benchmark.test_resize)


def resolve_head(run, head: str | None) -> tuple[str, str]:
    """(display name, stage) of `head`: None / "own" is the method's own classifier."""
    own = classifier(run.cfg)
    if head in (None, OWN):
        return (own, f"head:{own}") if own else (run.cfg.method, "align")
    valid = head_names(run.cfg, HEADS.names())
    if head not in valid:
        raise ClptError(f"this run has no head {head!r}",
                        hint=f"choose --head among: {OWN}, {', '.join(valid)}")  # fmt: skip
    return head, f"head:{head}"


def last_done(run, stage: str) -> int | None:
    done = [t for t in range(run.info.n_tasks) if run.state(stage, t) == "done"]
    return done[-1] if done else None


def open_classifier(run, task: int | None = None, head: str | None = None,
                    device: torch.device | None = None) -> tuple[Classifier, dict]:  # fmt: skip
    """The classifier of `head` after task `task` (default: the last task whose head is fitted) and its record."""
    name, stage = resolve_head(run, head)
    if task is None:
        task = last_done(run, stage)
        if task is None:
            raise MissingInputError(f"no task of this run has {name} fitted yet",
                                    redo=Redo(stage, 0, run.root, force=False))  # fmt: skip
    run.check_task(task)
    if run.state(stage, task) != "done":
        raise MissingInputError(f"task {task} has no {name} fitted ({run.state(stage, task)})",
                                redo=Redo(stage, task, run.root, force=run.state(stage, task) == "damaged"))  # fmt: skip
    device = device or torch.device("cpu")
    cfg = run.cfg
    model = checkpoint.load_model(
        artifacts.model_path(run.root, task), cfg, device, Redo("train", task, run.root)
    )
    n_seen = run.info.tasks[task][1]
    if stage == "align":
        heads = checkpoint.load_aligned_heads(
            artifacts.aligned_path(run.root, task), Redo("align", task, run.root)
        )
        state: HeadState = TaskHeadScores(heads)
        base, settings, meta = "ca", {}, state.meta()
    else:
        base = head_name(name)[0]
        path = artifacts.head_state_path(run.root, name, task)
        redo = Redo(stage, task, run.root, force=True)
        parts, md = artifacts.read_head_parts(run.root, name, task, lambda k: Redo(stage, k, run.root, force=True))
        state = restore_parts(base, parts, md["meta"])
        settings, meta = md["settings"], md["meta"]
        if md["n_classes"] != n_seen:
            raise MissingInputError(
                f"{path} covers {md['n_classes']} classes, task {task} has {n_seen}", redo=redo
            )
    clf = Classifier(model.backbone, state.to(device), run.info.class_names[:n_seen], test_transform(cfg),
                     info={"run": str(run.root), "task": task, "head": name})  # fmt: skip
    record = {
        "task": task,
        "head": {"name": name, "base": base, "meta": meta, "settings": settings},
        "backbone": {"name": cfg.backbone.name, "image_size": cfg.benchmark.image_size,
                     "reset_final_norm": cfg.backbone.reset_final_norm,
                     "lora": {"targets": list(cfg.lora.targets), "rank": cfg.lora.rank, "scale": cfg.lora.scale}},
        "provenance": {"run": str(Path(run.root).resolve()), "task": task, "head": name, "method": cfg.method,
                       "config_sha256": hashlib.sha256((Path(run.root) / "config.yaml").read_bytes()).hexdigest()},
    }  # fmt: skip
    return clf.eval(), record


@torch.no_grad()
def predict_split(run, model: Classifier, split: str, task: int, device: torch.device, precision: str,
                  batch_size: int, k: int) -> Iterator[dict]:  # fmt: skip
    """Rows for the run's own `split` images of the classes seen by task `task` (grouped by class, as cached),
    through the benchmark's loader (the built-in benchmark's images are generated, not files)."""
    from clpt import precision as P
    from clpt.data.loader import batches
    from clpt.stages.extract import rows_of

    bench = run.benchmark()
    data = {"train": bench.train, "test": bench.test}[split]
    rows = rows_of(data, range(run.info.tasks[task][1]))
    prec = P.resolve(precision, device)
    model.to(device)
    done = 0
    for x, y in batches(
        bench, data, rows, batch_size, device, train=False, num_workers=run.cfg.system.num_workers
    ):
        scores = model.batch_scores(x, device, prec)
        for i, (top, label) in enumerate(zip(top_k(scores, model.classes, k), y.tolist(), strict=True)):
            r = int(rows[done + i])
            path = data.paths[r] if data.paths is not None else f"{split}[{r}]"
            yield {"path": str(path), "top": top, "true": model.classes[label], "true_label": int(label)}
        done += len(y)


def open_source(source: Path, task: int | None, head: str | None, device: torch.device | None = None):
    """(classifier, record, run or None) of a run folder or an export folder."""
    from clpt.exports import is_export, load_model, read_export_doc

    if is_export(source):
        if task is not None or head not in (None, OWN):
            raise ClptError(f"{source} is an export of one task and head: --task and --head do not apply",
                            hint="leave out --task and --head, or predict with the run folder")  # fmt: skip
        model = load_model(source).to(device or "cpu")
        doc = read_export_doc(source)
        return model, {"task": doc["provenance"].get("task"), "head": doc["head"]}, None
    from clpt.run import open_run

    run = open_run(source)
    model, record = open_classifier(run, task, head, device)
    return model, record, run
