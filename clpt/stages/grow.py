"""Growing a run with classes that arrive later: `clpt add-task RUN FOLDER`.

A folder of new classes (`train/<class>/` and `test/<class>/`, or `<class>/` with a
held-out test share) becomes the run's next task. Its images are checked (each
decodes) and recorded with checksums in `manifest.json` under `additions`; then
`benchmark.json` gets the classes, the task range and the addition's record
(the folder, the split, the seed). `benchmark.json` is written last: it is the
commit, so an add killed before it leaves the run as it was (a stale manifest
entry is replaced by the next add). No artifact of an earlier task changes;
`clpt run RUN` then trains the new task and fits everything after it.

`extend(bench, info, manifest)` is how every later stage sees the grown
benchmark: the base benchmark's images, then each addition's, labels offset to
the task's range, each addition checked against its manifest record.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from clpt import artifacts
from clpt.data import manifest as M
from clpt.data.benchmark import Benchmark, Split
from clpt.data.readers import read_class_folders
from clpt.errors import ClptError, ConfigError, DataError


def _read(addition: dict):
    return read_class_folders(Path(addition["root"]), "stream", int(addition["split_seed"]),
                              float(addition["test_fraction"]))  # fmt: skip


def extend(bench: Benchmark, info, recorded: dict | None) -> Benchmark:
    """`bench` (as the reader builds it) with the run's added tasks, checked against the manifest."""
    additions = getattr(info, "additions", None) or []
    if not additions:
        return bench
    entries = (recorded or {}).get("additions", [])
    train, test = bench.train, bench.test
    paths = {"train": list(train.paths or []), "test": list(test.paths or [])}
    labels = {"train": [train.labels], "test": [test.labels]}
    stamps = {"train": dict(train.stamps or {}), "test": dict(test.stamps or {})}
    for i, a in enumerate(additions):
        raw = _read(a)
        if i >= len(entries):
            raise DataError(f"the manifest has no record of added task {a['task']} ({a['root']})",
                            hint="restore manifest.json from a copy of the run")  # fmt: skip
        if list(raw.class_names) != list(a["classes"]):
            raise DataError(f"the classes under {a['root']} changed since task {a['task']} was added",
                            hint="restore the folder as it was when it was added")  # fmt: skip
        M.verify(raw, entries[i])
        for s, st in M.stamps(raw, entries[i]).items():
            stamps[s].update(st)
        for s in ("train", "test"):
            split = getattr(raw, s)
            paths[s] += list(split.paths)
            labels[s].append(split.labels + int(a["start"]))
    return dataclasses.replace(
        bench,
        class_names=list(info.class_names),
        order=np.asarray(info.class_order),
        tasks=[range(a, b) for a, b in info.tasks],
        train=Split(labels=np.concatenate(labels["train"]), paths=paths["train"], stamps=stamps["train"]),
        test=Split(labels=np.concatenate(labels["test"]), paths=paths["test"], stamps=stamps["test"]),
    )


def add_task(run, folder: Path, test_fraction: float = 0.2, split_seed: int | None = None) -> dict:
    """Append the classes under `folder` as the run's next task (the caller holds the run's lock)."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist or is not a folder",
                        hint="pass the folder of the new classes (train/<class>/ and test/<class>/, or <class>/)")  # fmt: skip
    if not 0 < test_fraction < 1:
        raise ConfigError([f"--test-fraction: {test_fraction} must be in (0, 1)"], source="add-task")
    bench = run.benchmark()
    if bench.train.images is not None:
        raise ClptError(
            f"run {run.root} holds in-memory images ({run.info.benchmark}); added tasks are image folders",
            hint="start a run from a folder to grow it: --set benchmark.name=stream --set benchmark.root=FOLDER",
        )
    seed = run.cfg.benchmark.split_seed if split_seed is None else split_seed
    addition = {"root": str(folder), "test_fraction": test_fraction, "split_seed": seed}
    raw = _read(addition)
    clash = sorted(set(raw.class_names) & set(run.info.class_names))
    if clash:
        raise DataError(f"{len(clash)} class(es) under {folder} are already in the run (e.g. {clash[0]!r})",
                        hint="rename those folders, or leave them out of the new task")  # fmt: skip
    no_test = [c for i, c in enumerate(raw.class_names) if not (raw.test.labels == i).any()]
    if no_test:
        raise DataError(f"class {no_test[0]!r} under {folder} has no test image",
                        hint="put at least one image into its test/ folder")  # fmt: skip
    splits = {s: M.split_entries(getattr(raw, s), raw.root, check=True) for s in ("train", "test")}
    n, t = run.info.n_classes, run.info.n_tasks
    k = len(raw.class_names)
    addition.update(task=t, start=n, classes=list(raw.class_names), layout=raw.info.get("layout", ""))
    recorded = artifacts.read_record(run.root, "clpt-manifest")
    prior = [e for e in recorded.get("additions", [])][
        : len(run.info.additions)
    ]  # a killed add's entry is dropped
    entry = {"root": str(folder), "classes": list(raw.class_names), "counts": {s: len(v) for s, v in splits.items()},
             "digest": M.digest(splits), "splits": splits}  # fmt: skip
    artifacts.write_record(run.root, "clpt-manifest", {**recorded, "additions": [*prior, entry]})
    info = dataclasses.replace(
        run.info,
        n_classes=n + k,
        tasks=[*run.info.tasks, [n, n + k]],
        class_order=[*run.info.class_order, *range(n, n + k)],
        class_names=[*run.info.class_names, *raw.class_names],
        additions=[*run.info.additions, addition],
    )
    artifacts.write_record(run.root, "clpt-benchmark", dataclasses.asdict(info))  # the commit
    return {"task": t, "classes": k, "range": [n, n + k], "train_images": len(splits["train"]),
            "test_images": len(splits["test"]), "root": str(folder), "split": raw.info.get("split", raw.info.get("layout"))}  # fmt: skip
