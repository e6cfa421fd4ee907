"""Self-contained exports of a `Classifier`, and `load_model` to read one back.

An export folder holds everything prediction needs, and nothing of the run:

    model.json            format clpt-export: backbone architecture (timm name and
                          arguments), head (name, settings, what rebuilds it), class
                          names, the test transform, provenance (clpt version, config
                          digest, sha256 of each weights file, task, head)
    backbone.safetensors  the backbone's weights (LoRA included)
    head.safetensors      the fitted head's tensors (RanPAC's projection included)
    model.pt2             a `torch.export` program of the whole model, preprocessed
                          images (B, 3, S, S) -> scores (B, C): needs torch only
                          (`torch.export.load(path).module()`)
    model.onnx            (with `onnx=True`) the same model as ONNX, input `images`,
                          output `scores`, batch dynamic: for onnxruntime and others

`load_model(folder)` rebuilds the `Classifier` (timm and clpt needed) from the
first three; `clpt predict FOLDER IMAGE...` works on it as on a run folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from clpt.data.transforms import EvalTransform
from clpt.errors import ClptError, DataError, MissingInputError
from clpt.heads.base import restore_state
from clpt.inference import Classifier
from clpt.io import write_bytes, write_json

FORMAT, VERSION = "clpt-export", 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clpt")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_export(out: Path, model: Classifier, backbone: dict, head: dict, provenance: dict,
                 program: bool = True, onnx: bool = False) -> dict:  # fmt: skip
    """Write `model` to folder `out` (created; must be empty or absent). Returns the model.json document.

    `backbone`: {"name", "image_size", "reset_final_norm", "lora": {targets, rank, scale}};
    `head`: {"name", "base", "meta", "settings"}. `program=False` skips model.pt2; `onnx=True` adds
    model.onnx (needs the packages onnx and onnxscript)."""
    out = Path(out)
    if onnx:
        try:
            import onnx as _onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise ClptError("ONNX export needs the packages onnx and onnxscript",
                            hint="pip install onnx onnxscript, or leave out --onnx") from None  # fmt: skip
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ClptError(f"{out} exists and is not an empty folder", hint="choose a new folder for the export")
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    bb = safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()})
    write_bytes(out / "backbone.safetensors", bb)
    files["backbone.safetensors"] = _sha256(bb)
    tensors = model.head.tensors(with_projection=True) if head["base"] == "ranpac" else model.head.tensors()  # type: ignore[call-arg]
    hd = safetensors_bytes(tensors)
    write_bytes(out / "head.safetensors", hd)
    files["head.safetensors"] = _sha256(hd)
    if program:
        size = model.preprocess.size
        example = torch.zeros(2, 3, size, size)
        cpu = model.to("cpu").eval()
        batch = torch.export.Dim("batch", min=1, max=4096)
        prog = torch.export.export(cpu, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(prog, str(out / "model.pt2"))
        files["model.pt2"] = _sha256((out / "model.pt2").read_bytes())
    if onnx:
        size = model.preprocess.size
        cpu = model.to("cpu").eval()
        head_state = cpu.head.portable()  # ONNX lacks some operators a head may score with
        if head_state is not cpu.head:
            cpu = Classifier(cpu.backbone, head_state, cpu.classes, cpu.preprocess, cpu.info).eval()
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(cpu, (torch.zeros(2, 3, size, size),), str(out / "model.onnx"), input_names=["images"],
                          output_names=["scores"], dynamic_shapes=({0: batch},), dynamo=True, verbose=False)  # fmt: skip
        files["model.onnx"] = _sha256((out / "model.onnx").read_bytes())
    doc = {
        "format": FORMAT,
        "format_version": VERSION,
        "backbone": backbone,
        "head": head,
        "score": model.score,
        "classes": model.classes,
        "preprocess": model.preprocess.to_dict(),
        "provenance": {
            "clpt_version": _version(),
            "torch_version": torch.__version__,
            **provenance,
            "sha256": files,
        },  # fmt: skip
    }
    write_json(out / "model.json", doc)  # written last: a folder without it is not an export
    return doc


def is_export(path: Path) -> bool:
    return (Path(path) / "model.json").is_file() and not (Path(path) / "config.yaml").exists()


def read_export_doc(folder: Path) -> dict:
    p = Path(folder) / "model.json"
    if not p.is_file():
        raise MissingInputError(f"{folder} is not a clpt export (no model.json)",
                                hint="write one with `clpt export RUN OUT`")  # fmt: skip
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{p} is damaged: not JSON", hint="export the run again") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("format_version") != VERSION:
        raise DataError(
            f"{p} is not a clpt export of this version", hint="export the run again with this clpt"
        )
    return doc


def load_model(folder: str | Path, check: bool = True) -> Classifier:
    """The `Classifier` of an export folder: preprocessed images -> scores, with `.classes` and `.preprocess`.

    `check`: verify the weights files against the sha256 recorded at export."""
    from clpt.backbone import create_backbone
    from clpt.config import BackboneConfig
    from clpt.lora import apply_lora

    folder = Path(folder)
    doc = read_export_doc(folder)
    tensors = {}
    for name in ("backbone.safetensors", "head.safetensors"):
        path = folder / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MissingInputError(f"{path} is missing", hint="export the run again") from None
        if check and _sha256(data) != doc["provenance"]["sha256"].get(name):
            raise DataError(f"{path} does not match its sha256 in model.json (changed after export)",
                            hint="export the run again")  # fmt: skip
        try:
            tensors[name] = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise DataError(f"cannot read {path} ({type(e).__name__})", hint="export the run again") from None
    b = doc["backbone"]
    backbone = create_backbone(BackboneConfig(name=b["name"], pretrained=False, reset_final_norm=b["reset_final_norm"]),
                               pretrained=False, image_size=int(b["image_size"]))  # fmt: skip
    lora = b.get("lora") or {}
    if lora.get("targets"):
        apply_lora(backbone, lora["targets"], int(lora["rank"]), float(lora["scale"]), svd_init=False)
    backbone.load_state_dict(tensors["backbone.safetensors"], strict=True)
    h = doc["head"]
    head = restore_state(h["base"], tensors["head.safetensors"], h["meta"])
    info = {"export": str(folder), **doc["provenance"], "head": h["name"]}
    return Classifier(backbone, head, doc["classes"], EvalTransform.from_dict(doc["preprocess"]), info).eval()
