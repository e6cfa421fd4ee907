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


def read_checked(arr: zarr.Array, sel, what: str, command: str) -> np.ndarray:
    """arr[sel], with a failed checksum or undecodable chunk as a one-line DataError naming the stage to redo."""
    try:
        return np.asarray(arr[sel])
    except (ValueError, RuntimeError, OSError) as e:
        raise DataError(
            f"{what} is damaged ({str(e).splitlines()[0][:80]})", hint=f"re-run `{command} --force`"
        ) from None


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
    hint = f"re-create the run with `clpt init {root}`"
    try:
        obj = read_json(path)
    except FileNotFoundError:
        raise MissingInputError(f"{root} has no {path.name}", hint=hint) from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__})", hint=hint) from None
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
    return read_torch(path, "clpt-model", "`clpt train-task RUN --task T --force`")


def save_heads(path: Path, heads, task: int) -> None:
    torch_save(
        path,
        _tagged(
            "clpt-heads",
            {"task": task, "dim": heads.dim, "head_sizes": heads.sizes, "heads": heads.state_dict()},
        ),
    )


def _heads_from(obj: dict):
    from clpt.model import Heads

    heads = Heads(obj["dim"], obj["head_sizes"])
    heads.load_state_dict(obj["heads"])
    return heads


def load_trained_heads(path: Path):
    """The heads of a model checkpoint (as after the Slow Learner, before alignment)."""
    return _heads_from(read_model(path))


def load_aligned_heads(path: Path):
    return _heads_from(read_torch(path, "clpt-heads", "`clpt align RUN --task T --force`"))


def load_model(path: Path, cfg, device: torch.device):
    """Backbone (with LoRA when configured) and heads of a model checkpoint, on `device`."""
    from clpt.backbone import create_backbone
    from clpt.lora import apply_lora
    from clpt.model import CLModel

    ckpt = read_model(path)
    backbone = create_backbone(cfg.backbone, pretrained=False)
    if cfg.lora.targets:  # the LoRA weights come from the checkpoint
        apply_lora(backbone, cfg.lora.targets, cfg.lora.rank, cfg.lora.scale, svd_init=False)
    backbone.load_state_dict(ckpt["backbone"], strict=True)
    return CLModel(backbone, _heads_from(ckpt)).to(device)


# --- features ---------------------------------------------------------------------------


def prepare_features(
    root: Path, t: int, split: str, n: int, d: int, chunk_rows: int, source: str, resume: bool
) -> tuple[zarr.Array, zarr.Array, int]:
    """(feats, labels, rows already committed) for writing; committed rows kept only from the same source."""
    store, name = features_path(root), feature_group(t, split)
    group = zarr.open_group(store, mode="a")
    if resume and name in group:
        g = group[name]
        try:
            feats, labels = g["feats"], g["labels"]
            same = (
                feats.shape == (n, d)
                and labels.shape == (n,)
                and feats.attrs.get("source") == source
                and feats.attrs.get("format_version") == FORMATS["clpt-features"]
            )
        except KeyError:
            same = False
        if same:
            return feats, labels, int(feats.attrs.get("rows_done", 0))
    g = group.require_group(name)
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
    try:
        g = zarr.open_group(features_path(root), mode="r")[feature_group(t, split)]
        feats, labels = g["feats"], g["labels"]
    except (KeyError, FileNotFoundError):
        feats = None
    if feats is None or int(feats.attrs.get("rows_done", -1)) != feats.shape[0]:
        raise MissingInputError(
            f"no complete {split} features for task {t} in {features_path(root)}",
            hint=f"run `clpt extract {root} --task {t}`",
        )
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


def iter_feature_chunks(root: Path, t: int, split: str, rows: int):
    """(x float32 (n, d), labels int64 (n,)) tensors of a cached split, `rows` at a time (checksums verified)."""
    feats, labels = open_features(root, t, split)
    what, cmd = f"the cached {split} features of task {t}", f"clpt extract {root} --task {t}"
    for start in range(0, feats.shape[0], rows):
        sel = slice(start, start + rows)
        yield (
            torch.from_numpy(_finite(read_checked(feats, sel, what, cmd), what, cmd)),
            torch.from_numpy(read_checked(labels, sel, what, cmd)),
        )


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
    group = zarr.open_group(stats_path(root), mode="a")
    g = group.require_group(stats_group(t))
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
    try:
        g = zarr.open_group(stats_path(root), mode="r")[stats_group(t)]
    except (KeyError, FileNotFoundError):
        raise MissingInputError(f"no statistics of task {t} in {stats_path(root)}", hint=hint) from None
    version = g.attrs.get("format_version", 1)
    if version != FORMATS["clpt-stats"]:
        raise DataError(f"statistics of task {t} have format version {version}", hint=hint)
    what, cmd = f"the statistics of task {t}", f"clpt fit-stats {root} --task {t}"
    return {k: read_checked(g[k], ..., what, cmd) for k in ("classes", "count", "mean", "m2")}


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
