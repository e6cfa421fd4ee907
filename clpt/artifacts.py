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

Stages read and write files only through this module: training, extraction,
alignment, the heads and evaluation import no other stage's code to read a file.
Every artifact records its format and `format_version`; a file of another
format or version is a one-line `DataError` naming the command that rebuilds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from clpt.errors import DataError, MissingInputError
from clpt.io import read_json, torch_save, write_json

# format name -> current version. A reader accepts exactly this version.
# versions a reader still accepts besides the current one (features 1: without checksums)
READABLE = {"clpt-features": {1}}

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


def features_path(root: Path) -> Path:
    return Path(root) / "features.zarr"


def stats_path(root: Path) -> Path:
    return Path(root) / "stats.zarr"


def feature_group(t: int, split: str) -> str:
    return f"task_{t:03d}/{split}"


def stats_group(t: int) -> str:
    return f"task_{t:03d}"


def _rebuild_hint(command: str) -> str:
    return f"rebuild it with `{command}`"


def _codecs() -> dict:
    """zstd, then a crc32c checksum of every chunk, verified by zarr on each read."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return {"compressors": [ZstdCodec(), Crc32cCodec()]}


# What zarr raises for metadata it cannot parse: JSON errors are ValueErrors, a valid JSON
# document of the wrong shape gives TypeError, KeyError or AttributeError on the way in.
_BAD_METADATA = (ValueError, TypeError, AttributeError, KeyError)


def open_node(
    store: Path, path: str, keys: tuple[str, ...], what: str, command: str, missing: MissingInputError
):
    """The arrays `keys` of the group `path` in `store` for reading, with their group's attributes.

    A store or group that is absent raises `missing`; metadata that is damaged
    (a garbled or truncated `zarr.json` anywhere on the way) is a one-line
    DataError naming the command that rebuilds it.
    """
    if not (Path(store) / path).is_dir():
        raise missing
    try:
        g = zarr.open_group(store, mode="r")[path]
        return g, [g[k] for k in keys]
    except FileNotFoundError:
        raise missing from None
    except _BAD_METADATA as e:
        if isinstance(e, KeyError) and not _metadata_damaged(Path(store), path, keys):
            raise missing from None
        raise DataError(
            f"{what} is damaged (unreadable zarr metadata: {str(e).splitlines()[0][:60] if str(e) else type(e).__name__})",
            hint=f"re-run `{command} --force`",
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
    store = Path(store)
    try:
        return zarr.open_group(store, mode="a").require_group(path)
    except _BAD_METADATA:
        pass
    for meta in _metadata_path(store, path):
        if meta.exists() and (_metadata(meta) or {}).get("node_type") != "group":
            write_json(meta, {"attributes": {}, "zarr_format": 3, "node_type": "group"})
    return zarr.open_group(store, mode="a").require_group(path)


def read_checked(arr: zarr.Array, sel, what: str, command: str) -> np.ndarray:
    """arr[sel], with a failed checksum or undecodable chunk as a one-line DataError naming the stage to redo."""
    try:
        return np.asarray(arr[sel])
    except (ValueError, RuntimeError, OSError) as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        detail = "a chunk's crc32c checksum does not match" if "checksum" in text.lower() else text[:80]
        raise DataError(f"{what} is damaged ({detail})", hint=f"re-run `{command} --force`") from None


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
    hint = (
        f"restore {path.name} from a backup or a copy of the run, or start a new run folder with `clpt init`"
    )
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


# --- torch files: model checkpoints and heads ------------------------------------------


def _tagged(fmt: str, payload: dict) -> dict:
    return {"format": fmt, "format_version": FORMATS[fmt], **payload}


def read_torch(path: Path, fmt: str, command: str = "the stage that wrote it, with --force") -> dict:
    """A clpt torch file of format `fmt` at its current version, or a one-line DataError."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path} does not exist", hint=f"run {command}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unpickling errors all mean an unreadable file
        raise DataError(f"cannot read {path} ({type(e).__name__})", hint=f"re-run {command}") from None
    if not isinstance(obj, dict) or obj.get("format") not in (fmt, f"{fmt}-v1"):
        raise DataError(f"{path} is not a clpt {fmt} file", hint=f"re-run {command}")
    version = obj.get("format_version", 1)
    if version != FORMATS[fmt]:
        raise DataError(
            f"{path} has {fmt} format version {version}, this clpt reads {FORMATS[fmt]}",
            hint=f"re-run {command}",
        )
    return obj


def save_model(
    path: Path, backbone: torch.nn.Module, heads, backbone_cfg, task: int, extra: dict | None = None
):
    torch_save(
        path,
        _tagged(
            "clpt-model",
            {
                "task": task,
                "backbone_name": backbone_cfg.name,
                "reset_final_norm": backbone_cfg.reset_final_norm,
                "dim": heads.dim,
                "head_sizes": heads.sizes,
                "backbone": backbone.state_dict(),
                "heads": heads.state_dict(),
                **(extra or {}),
            },
        ),
    )


def read_model(path: Path) -> dict:
    return read_torch(path, "clpt-model", _redo("train-task", path))


def save_heads(path: Path, heads, task: int) -> None:
    torch_save(
        path,
        _tagged(
            "clpt-heads",
            {"task": task, "dim": heads.dim, "head_sizes": heads.sizes, "heads": heads.state_dict()},
        ),
    )


def load_error_detail(e: Exception) -> str:
    """The telling line of a failed `load_state_dict`: its first size mismatch, else its first line."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return next((ln.strip() for ln in lines if "size mismatch" in ln), lines[0].strip())


def _wrong_content(path: Path, e: Exception, command: str) -> DataError:
    """A checkpoint that reads but does not fit: missing entries, wrong shapes, sizes that disagree."""
    return DataError(
        f"{path} does not fit this run ({type(e).__name__}: {load_error_detail(e)[:160]})",
        hint=f"re-run {command}",
    )


def _heads_from(obj: dict, path: Path, command: str):
    from clpt.model import Heads

    try:
        heads = Heads(int(obj["dim"]), [int(s) for s in obj["head_sizes"]])
        heads.load_state_dict(obj["heads"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise _wrong_content(path, e, command) from None
    return heads


def _redo(command: str, path: Path) -> str:
    """`clpt COMMAND RUN --task T --force` for a file RUN/tasks/T/<file>."""
    path = Path(path)
    try:
        t = int(path.parent.name)
        return f"`clpt {command} {path.parent.parent.parent} --task {t} --force`"
    except ValueError:
        return f"`clpt {command} RUN --task T --force`"


def load_trained_heads(path: Path):
    """The heads of a model checkpoint (as after the Slow Learner, before alignment)."""
    return _heads_from(read_model(path), path, _redo("train-task", path))


def load_aligned_heads(path: Path):
    cmd = _redo("align", path)
    return _heads_from(read_torch(path, "clpt-heads", cmd), path, cmd)


def load_model(path: Path, cfg, device: torch.device):
    """Backbone (with LoRA when configured) and heads of a model checkpoint, on `device`."""
    from clpt.backbone import create_backbone
    from clpt.lora import apply_lora
    from clpt.model import CLModel

    ckpt = read_model(path)
    backbone = create_backbone(cfg.backbone, pretrained=False, image_size=cfg.benchmark.image_size)
    if cfg.lora.targets:  # the LoRA weights come from the checkpoint
        apply_lora(backbone, cfg.lora.targets, cfg.lora.rank, cfg.lora.scale, svd_init=False)
    try:
        backbone.load_state_dict(ckpt["backbone"], strict=True)
    except (KeyError, TypeError, RuntimeError) as e:
        raise _wrong_content(path, e, _redo("train-task", path)) from None
    return CLModel(backbone, _heads_from(ckpt, path, _redo("train-task", path))).to(device)


# --- features ---------------------------------------------------------------------------


def prepare_features(
    root: Path, t: int, split: str, n: int, d: int, chunk_rows: int, source: str, resume: bool
) -> tuple[zarr.Array, zarr.Array, int]:
    """(feats, labels, rows already committed) for writing; committed rows kept only from the same source."""
    store, name = features_path(root), feature_group(t, split)
    g = writable_group(store, name)
    if resume:
        try:
            feats, labels = g["feats"], g["labels"]
            same = (
                feats.shape == (n, d)
                and labels.shape == (n,)
                and feats.attrs.get("source") == source
                and feats.attrs.get("format_version") == FORMATS["clpt-features"]
            )
        except _BAD_METADATA:  # absent, or damaged: written afresh
            same = False
        if same:
            return feats, labels, int(feats.attrs.get("rows_done", 0))
    for key in ("feats", "labels"):  # damaged array metadata is not read back, only replaced
        if (store / name / key).is_dir():
            import shutil

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
        }
    )
    return feats, labels, 0


def open_features_for_append(root: Path, t: int, split: str) -> tuple[zarr.Array, zarr.Array]:
    g = zarr.open_group(features_path(root), mode="r+")[feature_group(t, split)]
    return g["feats"], g["labels"]


def open_features(root: Path, t: int, split: str) -> tuple[zarr.Array, zarr.Array]:
    """The cached (feats, labels) arrays of a task and split, checked complete and of this format."""
    missing = MissingInputError(
        f"no complete {split} features for task {t} in {features_path(root)}",
        hint=f"run `clpt extract {root} --task {t}`",
    )
    _, (feats, labels) = open_node(
        features_path(root), feature_group(t, split), ("feats", "labels"),
        f"the cached {split} features of task {t}", f"clpt extract {root} --task {t}", missing,
    )  # fmt: skip
    if int(feats.attrs.get("rows_done", -1)) != feats.shape[0]:
        raise missing
    version = feats.attrs.get("format_version", 1)
    if version != FORMATS["clpt-features"] and version not in READABLE["clpt-features"]:
        raise DataError(
            f"{split} features of task {t} have format version {version}",
            hint=f"re-run `clpt extract {root} --task {t} --force`",
        )
    return feats, labels


def _finite(x: np.ndarray, what: str, command: str) -> np.ndarray:
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{what} contain non-finite values", hint=f"re-run `{command} --force`")
    return x


def iter_feature_chunks(root: Path, t: int, split: str, rows: int, label: str = ""):
    """(x float32 (n, d), labels int64 (n,)) tensors of a cached split, `rows` at a time (checksums verified).

    `label` names a progress bar over the rows ("" shows none)."""
    from clpt import progress

    feats, labels = open_features(root, t, split)
    what, cmd = f"the cached {split} features of task {t}", f"clpt extract {root} --task {t}"
    with progress.bar(label, feats.shape[0], unit="row") as shown:
        for start in range(0, feats.shape[0], rows):
            sel = slice(start, start + rows)
            x = torch.from_numpy(_finite(read_checked(feats, sel, what, cmd), what, cmd))
            y = torch.from_numpy(read_checked(labels, sel, what, cmd))
            yield x, y
            shown.advance(len(y))


def read_features(root: Path, t: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = open_features(root, t, split)
    what, cmd = f"the cached {split} features of task {t}", f"clpt extract {root} --task {t}"
    return (
        torch.from_numpy(_finite(read_checked(feats, ..., what, cmd), what, cmd)),
        torch.from_numpy(read_checked(labels, ..., what, cmd)),
    )


# --- class statistics (sufficient statistics: count, mean, M2) -------------------------------


def save_stats(root: Path, t: int, classes: range, count, mean, m2, source: str) -> Path:
    """Write task t's per-class count (C,), mean (C, d) and scatter M2 (C, d, d), float64, no ridge."""
    g = writable_group(stats_path(root), stats_group(t))
    d = mean.shape[1]
    for key, value in (
        ("classes", np.arange(classes.start, classes.stop, dtype=np.int64)),
        ("count", np.asarray(count, dtype=np.int64)),
        ("mean", np.asarray(mean, dtype=np.float64)),
        ("m2", np.asarray(m2, dtype=np.float64)),
    ):
        arr = g.create_array(
            key,
            shape=value.shape,
            dtype=value.dtype,
            overwrite=True,
            chunks=(1, d, d) if key == "m2" else value.shape,
            **_codecs(),
        )
        arr[...] = value
    g.attrs.update(
        {
            "format": "clpt-stats",
            "format_version": FORMATS["clpt-stats"],
            "source": source,
            "m2": "sum over the class's rows of (x - mean)(x - mean)^T, float64, exactly symmetric",
        }
    )
    if "cov" in g:  # a store written by an older clpt: its covariance is not ours
        del g["cov"]
    return stats_path(root) / stats_group(t)


def load_stats(root: Path, t: int) -> dict[str, np.ndarray]:
    """classes, count, mean, m2 of task t (float64 sufficient statistics, no ridge)."""
    hint = f"re-run `clpt fit-stats {root} --task {t} --force`"
    what, cmd = f"the statistics of task {t}", f"clpt fit-stats {root} --task {t}"
    keys = ("classes", "count", "mean", "m2")
    missing = MissingInputError(f"no statistics of task {t} in {stats_path(root)}", hint=hint)
    g, arrays = open_node(stats_path(root), stats_group(t), keys, what, cmd, missing)
    version = g.attrs.get("format_version", 1)
    if version != FORMATS["clpt-stats"]:
        raise DataError(f"statistics of task {t} have format version {version}", hint=hint)
    return {k: read_checked(a, ..., what, cmd) for k, a in zip(keys, arrays, strict=True)}


def covariance(count: torch.Tensor, m2: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """(C, d, d) unbiased covariance M2 / (n - 1) + ridge * I; classes with < 2 rows get ridge * I alone."""
    count = count.to(m2.dtype)
    denom = (count - 1).clamp(min=1)[:, None, None]
    cov = torch.where((count >= 2)[:, None, None], m2 / denom, torch.zeros_like(m2))
    if ridge:
        cov = cov + ridge * torch.eye(m2.shape[-1], dtype=m2.dtype, device=m2.device)
    return cov


# --- evaluations ---------------------------------------------------------------------------


def write_eval(path: Path, row: dict, fmt: str = "clpt-eval") -> None:
    write_json(path, {"format": fmt, "format_version": FORMATS[fmt], **row})


def read_eval(path: Path, fmt: str = "clpt-eval", command: str = "`clpt eval RUN --task T --force`") -> dict:
    try:
        row = read_json(path)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__})", hint=f"re-run {command}") from None
    if not isinstance(row, dict) or row.get("format", fmt) != fmt or "per_task" not in row:
        raise DataError(f"{path} is not a clpt {fmt} file", hint=f"re-run {command}")
    return row


def artifact_info() -> dict[str, Any]:
    """The formats and versions this clpt writes (for `clpt status --json` and the docs)."""
    return dict(FORMATS)
