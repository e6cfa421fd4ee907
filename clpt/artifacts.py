"""Every artifact of a run folder: its path, its format (with a version) and its reader and writer.

    RUN/config.yaml                      the resolved configuration                 (clpt.config)
    RUN/benchmark.json                   class order, task ranges, class names     format clpt-benchmark
    RUN/manifest.json                    every image read, with a checksum         format clpt-manifest
    RUN/backbone.json                    the weights the run started from          format clpt-backbone-record
    RUN/tasks/003/model.pt               backbone + heads after the Slow Learner   format clpt-model
    RUN/tasks/003/heads_aligned.pt       heads after Classifier Alignment          format clpt-heads
    RUN/features.zarr/task_003/{train,test}/{feats,labels}                         format clpt-features
    RUN/stats.zarr/task_003/{classes,count,mean,m2}                                format clpt-stats
    RUN/tasks/003/eval.json              row 3 of the method's accuracy matrix     format clpt-eval
    RUN/tasks/003/heads/<name>.json      row 3 of head <name>'s accuracy matrix    format clpt-head-eval
    RUN/tasks/003/<stage>.done.json      stage markers                              (clpt.run)

This module only stores: it builds no model and computes nothing. It imports
numpy, torch, zarr and safetensors inside the functions that use them, so that checking a
run's state (`clpt status`) loads none of them. The stages
(`clpt.stages`) read and write files only through it; models are rebuilt from
what it reads by `clpt.checkpoint`. Every artifact records its format and
`format_version`; a file of another format or version is a one-line `DataError`
whose `Redo` names the stage that rebuilds it (the wiring formats its command).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from clpt import progress
from clpt.errors import DataError, MissingInputError, Redo, from_os_error
from clpt.io import read_json, torch_save, write_bytes, write_json

if TYPE_CHECKING:  # imported where used: reading a run's state needs none of them
    from collections.abc import Callable

    import numpy as np
    import torch
    import zarr

# format name -> current version. A reader accepts exactly this version.
# versions a reader still accepts besides the current one (features 1: without checksums)
READABLE = {"clpt-features": {1}, "clpt-head-state": {1}}

FORMATS = {
    "clpt-benchmark": 1,  # RUN/benchmark.json
    "clpt-manifest": 1,  # RUN/manifest.json
    "clpt-backbone-record": 1,  # RUN/backbone.json
    "clpt-model": 1,
    "clpt-heads": 1,
    "clpt-features": 2,  # 2: crc32c checksums on every chunk
    "clpt-stats": 2,  # 2: sufficient statistics (count, mean, M2); 1 stored covariance + ridge
    "clpt-eval": 1,
    "clpt-head-eval": 1,
    "clpt-drift-map": 1,  # tasks/003/drift.safetensors
    # tasks/003/heads/NAME.safetensors: a fitted head, ready to score; 2: or the part of it fitted at task 3
    # (a per-class head's new classes), continuing task 2's file
    "clpt-head-state": 2,
    "clpt-head-carry": 1,  # tasks/003/heads/NAME.carry.safetensors: what the next task's fit continues from
}


# --- paths ------------------------------------------------------------------------


def task_dir(root: Path, t: int) -> Path:
    return Path(root) / "tasks" / f"{t:03d}"


def marker_path(root: Path, stage: str, t: int) -> Path:
    return task_dir(root, t) / f"{stage.replace(':', '.')}.done.json"


def model_path(root: Path, t: int) -> Path:
    return task_dir(root, t) / "model.pt"


def aligned_path(root: Path, t: int) -> Path:
    return task_dir(root, t) / "heads_aligned.pt"


def eval_path(root: Path, t: int) -> Path:
    return task_dir(root, t) / "eval.json"


def head_eval_path(root: Path, head: str, t: int) -> Path:
    return task_dir(root, t) / "heads" / f"{head}.json"


def head_state_path(root: Path, head: str, t: int) -> Path:
    return task_dir(root, t) / "heads" / f"{head}.safetensors"


def head_carry_path(root: Path, head: str, t: int) -> Path:
    """What head `head`'s fit at task t + 1 continues from (a Gram, a pooled scatter): kept for the
    latest task only, not an output of the stage (without it the next fit starts from scratch)."""
    return task_dir(root, t) / "heads" / f"{head}.carry.safetensors"


def features_path(root: Path) -> Path:
    return Path(root) / "features.zarr"


PAIRS = "pairs"  # the feature split of task t's training rows under the previous backbone (stage pairs)


def drift_path(root: Path) -> Path:
    """The compensated statistics of the old classes, per task (stage drift)."""
    return Path(root) / "drift.zarr"


def drift_map_path(root: Path, t: int) -> Path:
    return task_dir(root, t) / "drift.safetensors"


def stats_path(root: Path) -> Path:
    return Path(root) / "stats.zarr"


def feature_group(t: int, split: str) -> str:
    return f"task_{t:03d}/{split}"


def stats_group(t: int) -> str:
    return f"task_{t:03d}"


def _codecs() -> dict:
    """zstd, then a crc32c checksum of every chunk, verified by zarr on each read."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    # every chunk is written, even one equal to the fill value, so that a missing chunk file is damage
    return {"compressors": [ZstdCodec(), Crc32cCodec()], "config": {"write_empty_chunks": True}}


EVERY_CHUNK = "every_chunk_written"  # array attribute: a missing chunk file is damage, not fill values


def _chunk_keys(meta: dict, start: int, stop: int) -> list[str]:
    """Chunk keys ("c/i/j") of rows [start, stop) of an array, from its zarr.json (default chunk encoding)."""
    import itertools

    shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
    if stop <= start:
        return []
    axes = [range(start // chunks[0], (stop - 1) // chunks[0] + 1)]
    axes += [range(-(-s // c)) for s, c in zip(shape[1:], chunks[1:], strict=True)]
    return ["c/" + "/".join(map(str, idx)) for idx in itertools.product(*axes)]


def _missing_in(folder: Path, meta: dict, start: int, stop: int) -> str | None:
    return next((k for k in _chunk_keys(meta, start, stop) if not (folder / k).is_file()), None)


def check_chunks(arr: zarr.Array, sel, what: str, redo: Redo) -> None:
    """A DataError naming `redo` if a chunk file under rows `sel` of `arr` is missing (arrays written
    with every chunk; older arrays are not checked)."""
    if not arr.attrs.get(EVERY_CHUNK, False) or not hasattr(arr.store, "root") or not arr.shape:
        return
    rows = sel if isinstance(sel, slice) else slice(None)
    start, stop, _ = rows.indices(arr.shape[0])
    meta = {"shape": list(arr.shape), "chunk_grid": {"configuration": {"chunk_shape": list(arr.chunks)}}}
    folder = Path(arr.store.root) / arr.path
    missing = _missing_in(folder, meta, start, stop)
    if missing is not None:
        raise DataError(f"{what} is damaged (chunk file {missing} is missing)", redo=redo)


def _array_metas(path: Path) -> dict[Path, dict | None]:
    """Every array's zarr.json under a store folder, each read once: {array folder: metadata}, None where
    it cannot be read (damaged metadata of an array that is there: found when the store is opened)."""
    out: dict[Path, dict | None] = {}
    for m in sorted(Path(path).rglob("zarr.json")):
        try:
            meta = json.loads(m.read_text())
        except (OSError, ValueError):
            out[m.parent] = None
            continue
        if isinstance(meta, dict) and meta.get("node_type") == "array":
            out[m.parent] = meta
    return out


def _rows_done(meta: dict | None) -> int | None:
    """A feature array's committed rows (`rows_done`, shared by its labels), None where not recorded."""
    try:
        return int((meta.get("attributes") or {})["rows_done"])  # type: ignore[union-attr]
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def inspect_store(path: Path, root: Path) -> tuple[list[str], str | None]:
    """(its arrays, paths below `path`, sorted; what is wrong with them, paths relative to `root`, or None)
    of a finished stage's zarr store folder, from one read of its metadata. Wrong: a feature array with
    fewer committed rows than its shape (an extraction cut short, yet marked done), or a missing chunk
    file (arrays written with every chunk; a feature array and its labels count their committed rows)."""
    path = Path(path)
    if not path.is_dir():
        return [], None
    metas = _array_metas(path)
    arrays = sorted(str(a.relative_to(path)) for a in metas if a != path)
    for folder, meta in metas.items():
        done = _rows_done(meta) if folder.name == "feats" else None
        if meta is not None and done is not None and meta.get("shape") and done != int(meta["shape"][0]):
            return arrays, f"its store {folder.relative_to(root)} holds {done} of its {meta['shape'][0]} rows"
    for folder, meta in metas.items():
        attrs = (meta or {}).get("attributes") or {}
        if meta is None or not attrs.get(EVERY_CHUNK) or not meta.get("shape"):
            continue
        n = meta["shape"][0]
        if folder.name in ("feats", "labels"):
            done = _rows_done(metas.get(folder.parent / "feats"))
            n = n if done is None else done
        key = _missing_in(folder, meta, 0, n)
        if key is not None:
            return arrays, f"its store's chunk file {(folder / key).relative_to(root)} is missing"
    return arrays, None


# What zarr raises for metadata it cannot parse: JSON errors are ValueErrors, a valid JSON
# document of the wrong shape gives TypeError, KeyError or AttributeError on the way in.
_BAD_METADATA = (ValueError, TypeError, AttributeError, KeyError)


def _group(node: zarr.Group | zarr.Array) -> zarr.Group:
    import zarr

    if not isinstance(node, zarr.Group):
        raise TypeError(f"{node} is an array where a group belongs")  # read as damaged metadata
    return node


def _array(node: zarr.Group | zarr.Array) -> zarr.Array:
    import zarr

    if not isinstance(node, zarr.Array):
        raise TypeError(f"{node} is a group where an array belongs")  # read as damaged metadata
    return node


def rows_done(feats: zarr.Array, default: int = 0) -> int:
    """The committed row count of a feature array (its `rows_done` attribute)."""
    value = feats.attrs.get("rows_done", default)
    return int(value) if isinstance(value, int | float) else default


def open_node(
    store: Path, path: str, keys: tuple[str, ...], what: str, redo: Redo, missing: MissingInputError
):
    """The arrays `keys` of the group `path` in `store` for reading, with their group's attributes.

    A store or group that is absent raises `missing`; metadata that is damaged
    (a garbled or truncated `zarr.json` anywhere on the way) is a one-line
    DataError whose Redo names the stage that rebuilds it.
    """
    import zarr

    if not (Path(store) / path).is_dir():
        raise missing
    try:
        g = _group(zarr.open_group(store, mode="r")[path])
        return g, [_array(g[k]) for k in keys]
    except FileNotFoundError:
        raise missing from None
    except _BAD_METADATA as e:
        if isinstance(e, KeyError) and not _metadata_damaged(Path(store), path, keys):
            raise missing from None
        raise DataError(
            f"{what} is damaged (unreadable zarr metadata: {str(e).splitlines()[0][:60] if str(e) else type(e).__name__})",
            redo=redo,
        ) from None


def _metadata_path(store: Path, path: str, keys: tuple[str, ...] = ()) -> list[Path]:
    """The `zarr.json` files from the store's root down to group `path`, then those of its arrays `keys`."""
    parts = path.split("/")
    nodes = [store] + [store.joinpath(*parts[: i + 1]) for i in range(len(parts))]
    return [n / "zarr.json" for n in nodes + [store.joinpath(*parts, k) for k in keys]]


def _metadata(meta: Path) -> dict | None:
    """A zarr.json's document; None if it is not a JSON object (damaged)."""
    import json

    try:
        doc = json.loads(meta.read_bytes())
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _metadata_damaged(store: Path, path: str, keys: tuple[str, ...]) -> bool:
    """Whether a zarr.json on the way to the arrays exists but is not a valid JSON object."""
    return any(meta.exists() and _metadata(meta) is None for meta in _metadata_path(store, path, keys))


def writable_group(store: Path, path: str) -> zarr.Group:
    """The group `path` of `store` for writing, created if needed.

    Group metadata on the way that cannot be read (a damaged `zarr.json` of the
    store's root or of a task's group: they hold no data) is written afresh, so a
    `--force` re-run repairs what a reader reported as damaged.
    """
    import zarr

    store = Path(store)
    try:
        return zarr.open_group(store, mode="a").require_group(path)
    except _BAD_METADATA:
        pass
    for meta in _metadata_path(store, path):
        if meta.exists() and (_metadata(meta) or {}).get("node_type") != "group":
            write_json(meta, {"attributes": {}, "zarr_format": 3, "node_type": "group"})
    return zarr.open_group(store, mode="a").require_group(path)


def read_checked(arr: zarr.Array, sel, what: str, redo: Redo) -> np.ndarray:
    """arr[sel], with a failed checksum or undecodable chunk as a one-line DataError naming the stage to redo."""
    import numpy as np

    check_chunks(arr, sel, what, redo)
    try:
        return np.asarray(arr[sel])
    except (ValueError, RuntimeError, OSError) as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        detail = "a chunk's crc32c checksum does not match" if "checksum" in text.lower() else text[:80]
        raise DataError(f"{what} is damaged ({detail})", redo=redo) from None


# --- JSON records of the run: benchmark, manifest, backbone ------------------------------


def run_record_path(root: Path, kind: str) -> Path:
    return Path(root) / {"clpt-benchmark": "benchmark.json", "clpt-manifest": "manifest.json",
                         "clpt-backbone-record": "backbone.json"}[kind]  # fmt: skip


def write_record(root: Path, kind: str, obj: dict) -> None:
    # `record`, not `format`: a record's own fields (the manifest's `format`) stay untouched
    write_json(run_record_path(root, kind), {"record": kind, "format_version": FORMATS[kind], **obj})


def read_record(root: Path, kind: str) -> dict:
    """A run record without its format fields (records from before versioning count as version 1)."""
    path = run_record_path(root, kind)
    hint = f"restore {path.name} from a backup or a copy of the run, or create the run again in a new folder"
    try:
        obj = read_json(path)
    except FileNotFoundError:
        raise MissingInputError(f"{root} has no {path.name}", hint=hint) from None
    except ValueError as e:  # truncated, garbled, not UTF-8
        raise DataError(f"{path} is damaged ({type(e).__name__})", hint=hint) from None
    if not isinstance(obj, dict) or obj.pop("record", kind) != kind:
        raise DataError(f"{path} is not a clpt {kind} record", hint=hint)
    version = obj.pop("format_version", 1)
    if version != FORMATS[kind]:
        raise DataError(f"{path} has format version {version}, this clpt reads {FORMATS[kind]}", hint=hint)
    return obj


# --- torch files: model checkpoints and heads (built and read back by clpt.checkpoint) ----------


def write_torch(path: Path, fmt: str, payload: dict) -> None:
    """A clpt torch file of format `fmt`, tagged with its current version (atomic)."""
    torch_save(path, {"format": fmt, "format_version": FORMATS[fmt], **payload})


def read_torch(path: Path, fmt: str, redo: Redo) -> dict:
    """A clpt torch file of format `fmt` at its current version, or a one-line error naming `redo`."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(
            f"{path} does not exist", redo=Redo(redo.stage, redo.task, redo.root, force=False)
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unpickling errors all mean an unreadable file
        raise DataError(f"cannot read {path} ({type(e).__name__})", redo=redo) from None
    if not isinstance(obj, dict) or obj.get("format") not in (fmt, f"{fmt}-v1"):
        raise DataError(f"{path} is not a clpt {fmt} file", redo=redo)
    version = obj.get("format_version", 1)
    if version != FORMATS[fmt]:
        raise DataError(
            f"{path} has {fmt} format version {version}, this clpt reads {FORMATS[fmt]}", redo=redo
        )
    return obj


# --- features ---------------------------------------------------------------------------


class FeatureWriter:
    """Rows of one feature store group, written chunk by chunk; `rows_done` committed after the data.

    `commit_each`: commit after every chunk (one process writes in order); under
    several ranks chunks land out of order, and rank 0 commits once at `finish`.
    """

    def __init__(self, feats: zarr.Array, labels: zarr.Array, rows_done: int, commit_each: bool = True):
        self.feats, self.labels, self.rows_done, self.commit_each = feats, labels, rows_done, commit_each

    def write(self, start: int, x: np.ndarray, y: np.ndarray) -> None:
        stop = start + len(x)
        try:
            self.feats[start:stop] = x
            self.labels[start:stop] = y
        except OSError as e:  # a full disk, a read-only store: nothing past the committed rows counts
            raise from_os_error(
                e, f"cannot write features to {str(self.feats.store).removeprefix('file://')}"
            ) from None
        if self.commit_each:
            self.feats.attrs["rows_done"] = stop  # commit after the data

    def finish(self, n: int) -> None:
        self.feats.attrs["rows_done"] = n


def prepare_features(
    root: Path, t: int, split: str, n: int, d: int, chunk_rows: int, source: str, resume: bool,
    expected_labels: np.ndarray | None = None,
) -> tuple[zarr.Array, zarr.Array, int]:  # fmt: skip
    """(feats, labels, rows already committed) for writing; committed rows kept only from the same source.
    `expected_labels` (grouped by class, as extraction writes them) are recorded as their class range and
    per-class counts, which `open_features` checks the stored labels against."""
    import numpy as np

    store, name = features_path(root), feature_group(t, split)
    g = writable_group(store, name)
    if resume:
        try:
            feats, labels = _array(g["feats"]), _array(g["labels"])
            same = (
                feats.shape == (n, d)
                and labels.shape == (n,)
                and feats.attrs.get("source") == source
                and feats.attrs.get("format_version") == FORMATS["clpt-features"]
            )
        except _BAD_METADATA:  # absent, or damaged: written afresh
            same = False
        if same:
            return feats, labels, rows_done(feats)
    for key in ("feats", "labels"):  # damaged array metadata is not read back, only replaced
        if (store / name / key).is_dir():
            shutil.rmtree(store / name / key)
    feats = g.create_array(
        "feats", shape=(n, d), chunks=(chunk_rows, d), dtype="float32", overwrite=True, **_codecs()
    )
    labels = g.create_array(
        "labels", shape=(n,), chunks=(chunk_rows,), dtype="int64", overwrite=True, **_codecs()
    )
    feats.attrs.update(
        {
            "format": "clpt-features",
            "format_version": FORMATS["clpt-features"],
            "source": source,
            "rows_done": 0,
            EVERY_CHUNK: True,
        }
    )
    labels.attrs[EVERY_CHUNK] = True
    if expected_labels is not None and len(expected_labels):
        lo, hi = int(expected_labels.min()), int(expected_labels.max()) + 1
        counts = np.bincount(expected_labels - lo, minlength=hi - lo)
        labels.attrs.update({"classes": [lo, hi], "class_counts": counts.tolist()})
    return feats, labels, 0


def _check_labels(labels: zarr.Array, what: str, redo: Redo) -> None:
    """The stored labels are the classes and counts extraction recorded, grouped by class: a label
    rewritten to another class (checksummed anew) is found when the store is opened, before any work."""
    import numpy as np

    want = labels.attrs.get("class_counts")
    if want is None:  # stores written before the record
        return
    lo, hi = (int(v) for v in labels.attrs["classes"])  # type: ignore[union-attr, arg-type]
    y = read_checked(labels, ..., what, redo)
    bad = ""
    if len(y) and (int(y.min()) < lo or int(y.max()) >= hi):
        bad = f"labels outside the task's classes [{lo}, {hi})"
    elif np.bincount(y - lo, minlength=hi - lo).tolist() != want:
        bad = "per-class counts differ from those extracted"
    elif len(y) > 1 and bool((y[1:] < y[:-1]).any()):
        bad = "rows not grouped by class"
    if bad:
        raise DataError(f"{what} are damaged ({bad})", redo=redo)


def _extract_redo(root: Path, t: int, force: bool = True, split: str = "train") -> Redo:
    """The stage that writes a split: `extract` (train, test), `pairs` (the previous backbone's rows)."""
    return Redo("pairs" if split == PAIRS else "extract", t, str(root), force)


def open_features_for_append(root: Path, t: int, split: str) -> tuple[zarr.Array, zarr.Array]:
    import zarr

    g = _group(zarr.open_group(features_path(root), mode="r+")[feature_group(t, split)])
    return _array(g["feats"]), _array(g["labels"])


def open_features(root: Path, t: int, split: str) -> tuple[zarr.Array, zarr.Array]:
    """The cached (feats, labels) arrays of a task and split, checked complete and of this format."""
    missing = MissingInputError(  # an extraction cut short: its stage is not done, so it resumes
        f"no complete {split} features for task {t} in {features_path(root)}",
        redo=_extract_redo(root, t, False, split),
    )
    _, (feats, labels) = open_node(
        features_path(root), feature_group(t, split), ("feats", "labels"),
        f"the cached {split} features of task {t}", _extract_redo(root, t, True, split), missing,
    )  # fmt: skip
    if rows_done(feats, -1) != feats.shape[0]:
        raise missing
    version = feats.attrs.get("format_version", 1)
    if version != FORMATS["clpt-features"] and version not in READABLE["clpt-features"]:
        raise DataError(
            f"{split} features of task {t} have format version {version}",
            redo=_extract_redo(root, t, True, split),
        )
    _check_labels(labels, f"the cached {split} labels of task {t}", _extract_redo(root, t, True, split))
    return feats, labels


def _finite(x: np.ndarray, what: str, redo: Redo) -> np.ndarray:
    import numpy as np

    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{what} contain non-finite values", redo=redo)
    return x


def shard_rows(n: int, chunk: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of n stored rows, cut at the store's chunk boundaries (so no two
    ranks read the same chunk); the shares of ranks 0..world-1 cover [0, n) in order."""
    n_chunks = -(-n // chunk)
    a, b = n_chunks * rank // world, n_chunks * (rank + 1) // world
    return range(min(a * chunk, n), min(b * chunk, n))


def iter_feature_chunks(root: Path, t: int, split: str, rows: int, label: str = "", shard: tuple[int, int] = (0, 1)):
    """(x float32 (n, d), labels int64 (n,)) tensors of a cached split, `rows` at a time (checksums verified).

    `label` names a progress bar over the rows read ("" shows none); it advances as each chunk is read,
    so a split read in one chunk does not sit at 0 while the chunk is used. `shard` (rank, world): only
    that rank's share of the rows (`shard_rows`)."""
    import torch

    feats, labels = open_features(root, t, split)
    what, redo = f"the cached {split} features of task {t}", _extract_redo(root, t, True, split)
    share = shard_rows(feats.shape[0], feats.chunks[0], *shard)
    with progress.bar(label, len(share), unit="row") as shown:
        for start in range(share.start, share.stop, rows):
            sel = slice(start, min(start + rows, share.stop))
            x = torch.from_numpy(_finite(read_checked(feats, sel, what, redo), what, redo))
            y = torch.from_numpy(read_checked(labels, sel, what, redo))
            shown.advance(len(y))
            yield x, y


def read_features(root: Path, t: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    feats, labels = open_features(root, t, split)
    what, redo = f"the cached {split} features of task {t}", _extract_redo(root, t, True, split)
    return (
        torch.from_numpy(_finite(read_checked(feats, ..., what, redo), what, redo)),
        torch.from_numpy(read_checked(labels, ..., what, redo)),
    )


# --- class statistics (sufficient statistics: count, mean, M2) -------------------------------


def save_stats(
    root: Path, t: int, classes: range, count, mean, scatter, source: str, store: str = "stats", pooled=None
) -> Path:
    """Write task t's per-class count (C,), mean (C, d) and scatter, float64, no ridge.

    `scatter`: the full M2 (C, d, d) (an array), or a `clpt.stats.Scatter` in any form; a compact form
    also stores `pooled`, the task's sum_c M2_c (d, d), which the full form gives by summing."""
    import numpy as np
    import torch

    from clpt.stats import Scatter

    if not isinstance(scatter, Scatter):
        scatter = Scatter("full", m2=torch.as_tensor(np.asarray(scatter, dtype=np.float64)))
    path = stats_path(root) if store == "stats" else drift_path(root)
    g = writable_group(path, stats_group(t))
    d = mean.shape[1]
    arrays = [
        ("classes", np.arange(classes.start, classes.stop, dtype=np.int64)),
        ("count", np.asarray(count, dtype=np.int64)),
        ("mean", np.asarray(mean, dtype=np.float64)),
        *((k, v.cpu().numpy().astype(np.float64)) for k, v in scatter.arrays().items()),
    ]
    if scatter.form != "full":
        arrays.append(("pooled", np.asarray(torch.as_tensor(pooled).cpu(), dtype=np.float64)[None]))
    for key, value in arrays:
        if key in ("m2", "pooled"):
            chunks = (1, d, d)
        elif key == "basis":
            chunks = (min(len(value), 256), *value.shape[1:])
        else:
            chunks = value.shape
        arr = g.create_array(key, shape=value.shape, dtype=value.dtype, overwrite=True, chunks=chunks, **_codecs())
        arr.attrs[EVERY_CHUNK] = True
        arr[...] = value
    g.attrs.update(
        {
            "format": "clpt-stats",
            "format_version": FORMATS["clpt-stats"] if scatter.form == "full" else 3,
            "covariance": scatter.form,
            "source": source,
            "m2": "sum over the class's rows of (x - mean)(x - mean)^T, float64, exactly symmetric",
        }
    )
    for stale in ({"cov", "m2", "diag", "basis", "eigval", "resid", "pooled"} - {k for k, _ in arrays}) & set(g):
        del g[stale]  # another form's arrays, or a store written by an older clpt (its `cov` is not ours)
    return path / stats_group(t)


def load_stats(root: Path, t: int, store: str = "stats") -> dict:
    """classes, count, mean and the scatter arrays of task t (float64 sufficient statistics, no ridge):
    `covariance` names the form; full: m2; diagonal: diag, pooled; lowrank: basis, eigval, resid, pooled
    (the task's sum_c M2_c)."""
    from clpt.stats import Scatter

    path = stats_path(root) if store == "stats" else drift_path(root)
    what = f"the statistics of task {t}" if store == "stats" else f"the compensated statistics after task {t}"
    redo = Redo(store, t, str(root))
    keys: tuple[str, ...] = ("classes", "count", "mean")
    missing = MissingInputError(f"no statistics of task {t} in {path}", redo=redo)
    g, _ = open_node(path, stats_group(t), (), what, redo, missing)
    form = g.attrs.get("covariance", "full")
    version = g.attrs.get("format_version", 1)
    if form not in Scatter.KEYS or version != (FORMATS["clpt-stats"] if form == "full" else 3):
        raise DataError(f"statistics of task {t} have format version {version} ({form})", redo=redo)
    keys += Scatter.KEYS[form] + (("pooled",) if form != "full" else ())
    g, arrays = open_node(path, stats_group(t), keys, what, redo, missing)
    out: dict = {k: read_checked(a, ..., what, redo) for k, a in zip(keys, arrays, strict=True)}
    out["covariance"] = form
    if "pooled" in out:  # the full form's is the sum of its m2 (`ClassStats.from_tasks`)
        out["pooled"] = out["pooled"][0]
    return out


# --- evaluations ---------------------------------------------------------------------------


def write_eval(path: Path, row: dict, fmt: str = "clpt-eval") -> None:
    write_json(path, {"format": fmt, "format_version": FORMATS[fmt], **row})


def read_eval(path: Path, fmt: str, redo: Redo) -> dict:
    try:
        row = read_json(path)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__})", redo=redo) from None
    if not isinstance(row, dict) or row.get("format", fmt) != fmt or "per_task" not in row:
        raise DataError(f"{path} is not a clpt {fmt} file", redo=redo)
    return row


# --- drift maps (safetensors) ------------------------------------------------------------------


def save_drift_map(path: Path, method: str, task: int, state: dict[str, torch.Tensor], info: dict) -> None:
    """One task's fitted drift map: its tensors, and its method, task and fit summary as metadata (atomic)."""
    from safetensors.torch import save as safetensors_bytes

    meta = {"format": "clpt-drift-map", "format_version": str(FORMATS["clpt-drift-map"]), "method": method,
            "task": str(task), "info": json.dumps(info)}  # fmt: skip
    data = safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata=meta)
    write_bytes(path, data)


def read_drift_map(path: Path, method: str, redo: Redo) -> dict[str, torch.Tensor]:
    """The tensors of a drift map of `method`, or a one-line error naming `redo`."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise MissingInputError(
            f"{path} does not exist", redo=Redo(redo.stage, redo.task, redo.root, force=False)
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__})", redo=redo) from None
    if meta.get("format") != "clpt-drift-map" or meta.get("format_version") != str(FORMATS["clpt-drift-map"]):
        raise DataError(f"{path} is not a clpt drift map of this version", redo=redo)
    if meta.get("method") != method:
        raise DataError(f"{path} holds a {meta.get('method')} map, the run's method is {method}", redo=redo)
    return state


# --- fitted heads (safetensors) ---------------------------------------------------------------


def head_state_bytes(head: str, task: int, n_classes: int, tensors: dict[str, torch.Tensor], meta: dict,
                     settings: dict, info: dict | None = None, carry: str | None = None,
                     first_class: int = 0, base: str | None = None) -> bytes:  # fmt: skip
    """A fitted head as safetensors: its tensors; its name, task, classes [0, n_classes), the state's
    meta (what rebuilding needs), its settings and the fit's choices as metadata; `carry`: the sha256
    of the carry file written with it (`head_carry_path`), which ties the two together. `first_class`
    > 0: the tensors are a part, classes [first_class, n_classes) alone, continuing the previous task's
    state, the file whose sha256 is `base` (`read_head_parts` joins them)."""
    from safetensors.torch import save as safetensors_bytes

    md = {"format": "clpt-head-state", "format_version": str(FORMATS["clpt-head-state"]), "head": head,
          "task": str(task), "n_classes": str(n_classes), "meta": json.dumps(meta),
          "settings": json.dumps(settings), "info": json.dumps(info or {})}  # fmt: skip
    if carry is not None:
        md["carry"] = carry
    if first_class:
        assert base is not None, "a part names the state it continues"
        md["first_class"], md["base"] = str(first_class), base
    return safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=md)


def save_head_state(path: Path, *args, **kwargs) -> None:
    write_bytes(path, head_state_bytes(*args, **kwargs))


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_head_state(path: Path, head: str, redo: Redo | None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata with `meta`, `settings`, `info` decoded, and `first_class`: 0 for a whole state,
    else where its part starts) of one saved head file, or a one-line error."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise MissingInputError(
            f"{path} does not exist", redo=None if redo is None else Redo(redo.stage, redo.task, redo.root)
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            md = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        version = md.get("format_version")
        if md.get("format") != "clpt-head-state" or version not in {
            str(v) for v in (FORMATS["clpt-head-state"], *READABLE["clpt-head-state"])
        }:
            raise DataError(f"{path} is not a clpt head state of this version", redo=redo)
        for k in ("meta", "settings", "info"):
            md[k] = json.loads(md.get(k, "{}"))
        md["task"], md["n_classes"] = int(md["task"]), int(md["n_classes"])
        md["first_class"] = int(md.get("first_class", 0))
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__})", redo=redo) from None
    if md.get("head") != head:
        raise DataError(f"{path} holds head {md.get('head')!r}, not {head!r}", redo=redo)
    return tensors, md


def read_head_parts(
    root: Path, head: str, t: int, redo: Callable[[int], Redo | None]
) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """The tensors of every file the state of `head` after task t is made of, oldest first, and task t's
    metadata. A part (`first_class` > 0, what a per-class head's incremental fit saves) continues the
    state of the task before it, which must be the very file it was saved after (its sha256) and cover
    classes [0, first_class); else a one-line error naming the stage to run again (`redo(task)`)."""
    k = t
    path = head_state_path(root, head, k)
    tensors, md = read_head_state(path, head, redo(k))
    top, parts = md, [tensors]
    while md["first_class"] > 0:
        prev = head_state_path(root, head, k - 1)
        if k == 0 or not prev.is_file() or file_sha256(prev) != md.get("base"):
            raise DataError(f"{path} holds the classes of task {k} after the {head} state of task {k - 1}, "
                            f"which is {'missing' if k == 0 or not prev.is_file() else 'another one now'}",
                            redo=redo(k))  # fmt: skip
        tensors, prev_md = read_head_state(prev, head, redo(k - 1))
        if prev_md["n_classes"] != md["first_class"]:
            raise DataError(f"{path} continues {prev_md['n_classes']} classes of task {k - 1}, not "
                            f"{md['first_class']}", redo=redo(k))  # fmt: skip
        parts.append(tensors)
        path, md, k = prev, prev_md, k - 1
    return parts[::-1], top


def head_carry_bytes(head: str, task: int, tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save as safetensors_bytes

    md = {"format": "clpt-head-carry", "format_version": str(FORMATS["clpt-head-carry"]), "head": head,
          "task": str(task)}  # fmt: skip
    return safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=md)


def read_head_carry(path: Path, sha256: str | None) -> dict[str, torch.Tensor] | None:
    """The carry tensors at `path` if the file is there and its sha256 is `sha256` (the one its head
    state recorded); else None: the next fit starts from scratch, which gives the same result."""
    from safetensors import SafetensorError
    from safetensors.torch import load as safetensors_load

    if sha256 is None or not Path(path).is_file():
        return None
    try:
        data = Path(path).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            return None
        return safetensors_load(data)
    except (SafetensorError, OSError, ValueError):
        return None
