"""Prediction with what a run learned: a backbone and a fitted head as one module, over images or tensors.

`Classifier` maps a batch of preprocessed images (B, 3, S, S) to scores over the
classes seen so far (B, C); `.classes` names them and `.preprocess` turns a PIL
image into what it expects (the run's test transform). `predict_files` runs it
over image files in batches and yields one row per image, with the top-k
classes and their scores, or the reason the image could not be read. What a
score is depends on the head (`Classifier.score`).

Library code: it knows nothing of run folders (`clpt.stages.predict` opens one,
`clpt.exports` writes and reads self-contained folders).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from clpt import precision as P
from clpt import progress
from clpt.data.transforms import EvalTransform
from clpt.heads.base import HeadState

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")  # what the readers accept


class Classifier(nn.Module):
    """Preprocessed images -> scores: `head(backbone(x))`, with `.classes` and `.preprocess`."""

    def __init__(self, backbone: nn.Module, head: HeadState, classes: list[str], preprocess: EvalTransform,
                 info: dict | None = None):  # fmt: skip
        super().__init__()
        self.backbone, self.head = backbone.eval(), head.eval()
        self.classes = list(classes)
        self.preprocess = preprocess
        self.info = dict(info or {})  # provenance: run, task, head, ...

    @property
    def score(self) -> str:
        return self.head.score

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, C)
        return self.head(self.backbone(x))

    @torch.no_grad()
    def batch_scores(self, x: torch.Tensor, device: torch.device, prec: str) -> torch.Tensor:
        """(B, C) float32 scores on the CPU: the backbone under `prec` (a resolved precision, as the
        run's extraction), the head on its float32 features (as the run's evaluation)."""
        with P.autocast(prec, device):
            feats = self.backbone(x.to(device))
        return self.head(feats.float()).float().cpu()


def expand_inputs(inputs: Iterable[str], stdin=None) -> list[Path]:
    """Image paths from files, folders (searched recursively, sorted) and `-` (one path per line on stdin).

    A path that does not exist is kept: its row reports it."""
    out: list[Path] = []
    for item in inputs:
        if item == "-":
            lines = (stdin or sys.stdin).read().splitlines()
            out += [Path(line.strip()) for line in lines if line.strip()]
            continue
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


def load_image(path: Path, preprocess: EvalTransform) -> torch.Tensor:
    """The preprocessed tensor of one image file (raises OSError / ValueError when it cannot be read)."""
    from PIL import Image

    with Image.open(path) as im:
        return preprocess(im)


def _read(path: Path, preprocess: EvalTransform) -> tuple[torch.Tensor | None, str | None]:
    from PIL import Image

    try:
        return load_image(path, preprocess), None
    except FileNotFoundError:
        return None, "no such file"
    except IsADirectoryError:
        return None, "a folder, not an image"
    except Image.DecompressionBombError as e:
        return None, f"refused: {str(e).split('.')[0]}"
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated files
        return None, f"cannot decode ({type(e).__name__})"


@torch.no_grad()
def top_k(scores: torch.Tensor, classes: list[str], k: int) -> list[list[dict]]:
    """Per row, the k best classes as {"class", "label", "score"}, best first."""
    k = min(k, scores.shape[1])
    vals, idx = scores.float().topk(k, dim=1)
    return [
        [{"class": classes[int(i)], "label": int(i), "score": float(v)} for v, i in zip(vr, ir, strict=True)]
        for vr, ir in zip(vals, idx, strict=True)
    ]


@torch.no_grad()
def predict_tensor(model: Classifier, x: torch.Tensor, device: torch.device, precision: str = "fp32",
                   batch_size: int = 256) -> torch.Tensor:  # fmt: skip
    """(N, C) float32 scores on the CPU of preprocessed images `x` (N, 3, S, S)."""
    model.to(device).eval()
    prec = P.resolve(precision, device)
    out = [model.batch_scores(x[s : s + batch_size], device, prec) for s in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, len(model.classes))


def predict_files(model: Classifier, paths: list[Path], device: torch.device, precision: str = "fp32",
                  batch_size: int = 256, k: int = 5, label: str = "predict") -> Iterator[dict]:  # fmt: skip
    """One row per path, in order: {"path", "top": [...]} or {"path", "error": why}.

    Images are decoded and preprocessed in the main process, `batch_size` at a time;
    an image that cannot be read is reported in its row and the others go on."""
    with progress.bar(label, len(paths), unit="img") as shown:
        for s in range(0, len(paths), batch_size):
            chunk = paths[s : s + batch_size]
            read = [_read(p, model.preprocess) for p in chunk]
            good = [x for x, _ in read if x is not None]
            rows = iter(top_k(predict_tensor(model, torch.stack(good), device, precision, batch_size),
                              model.classes, k) if good else [])  # fmt: skip
            for p, (x, why) in zip(chunk, read, strict=True):
                yield {"path": str(p), "error": why} if x is None else {"path": str(p), "top": next(rows)}
            shown.advance(len(chunk))
