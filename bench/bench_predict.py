"""Prediction throughput: images/s of `clpt predict`'s path (decode, test transform, backbone, head, top-k)
against the model alone on tensors already prepared, measured in the same run.

    python bench/bench_predict.py                                        # ViT-B/16 at 224, random weights
    python bench/bench_predict.py --model clpt_vit_micro --image-size 32 --n-images 2000   # a CPU smoke run

The images are JPEG files of about 400x300 (ImageNet-R-sized), written to a temporary folder; the head is an
NCM head over 200 classes (its cost is negligible next to the backbone). The ratio end-to-end / model-only
says what decoding and preprocessing cost (1.0: nothing); decoding runs in the calling process.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

import clpt.backbone  # noqa: F401  (registers clpt_vit_micro)
from clpt.data.transforms import EvalTransform
from clpt.heads.ncm import CosineScores
from clpt.inference import Classifier, expand_inputs, predict_files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    backbone = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=args.image_size)
    d = int(backbone.num_features)
    head = CosineScores(torch.nn.functional.normalize(torch.randn(200, d), dim=1))
    tf = EvalTransform("files", args.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    model = Classifier(backbone, head, [f"c{i}" for i in range(200)], tf).to(device).eval()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.n_images):
            arr = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
            Image.fromarray(arr).save(Path(tmp) / f"{i:05d}.jpg", quality=90)
        paths = expand_inputs([tmp])
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        with torch.no_grad():
            model(x)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(-(-args.n_images // args.batch_size)):
                model(x).topk(5, dim=1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            alone = args.n_images / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        rows = list(predict_files(model, paths, device, "fp32", args.batch_size, 5, label=""))
        e2e = len(rows) / (time.perf_counter() - t0)
    print(f"{args.model} at {args.image_size}, batch {args.batch_size}, {args.n_images} JPEGs of 400x300, "
          f"{device}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"  model alone   {alone:8.1f} images/s")
    print(f"  clpt predict  {e2e:8.1f} images/s   ratio {e2e / alone:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
