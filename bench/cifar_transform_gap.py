"""How far CIFAR-100's on-device transforms are from torchvision's PIL pipeline, in 8-bit levels.

    python bench/cifar_transform_gap.py [--images 64] [--seed 0]

Test path: `resize_center_crop` (on device) against torchvision's Resize(256, bicubic) +
CenterCrop(224) on PIL images. Training crop: `random_resized_crop_flip` (on device)
against torchvision's `resized_crop` + flip on PIL with the same boxes. Random-noise
32-pixel images: the worst case for interpolation differences.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from clpt.data import transforms as T


def stats(d: np.ndarray) -> str:
    return f"mean {d.mean():.2f}/255, 99th percentile {np.percentile(d, 99):.1f}/255, max {d.max():.1f}/255"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    a = np.random.default_rng(args.seed).integers(0, 256, size=(args.images, 32, 32, 3), dtype=np.uint8)
    x = T.to_float(torch.from_numpy(a))

    tv = v2.Compose([v2.Resize(256, interpolation=InterpolationMode.BICUBIC), v2.CenterCrop(224)])
    ref = np.stack([np.asarray(tv(Image.fromarray(im))) for im in a]).astype(np.float64)
    ours = (T.resize_center_crop(x, 256, 224) * 255).permute(0, 2, 3, 1).numpy()
    print(f"test path (Resize 256 + CenterCrop 224): {stats(np.abs(ours - ref))}")

    g = torch.Generator().manual_seed(args.seed)
    state = g.get_state()
    x0, y0, cw, ch = T._rrc_boxes(len(a), 32, 32, g)
    flip = torch.rand(len(a), generator=g) < 0.5
    g.set_state(state)  # the on-device crop draws the same boxes and flips
    ours = (T.random_resized_crop_flip(x, 224, g) * 255).permute(0, 2, 3, 1).numpy()
    refs = []
    for i in range(len(a)):
        im = TF.resized_crop(Image.fromarray(a[i]), int(y0[i]), int(x0[i]), int(ch[i]), int(cw[i]), [224, 224],
                             interpolation=InterpolationMode.BICUBIC)  # fmt: skip
        refs.append(np.asarray(TF.horizontal_flip(im) if flip[i] else im))
    print(f"training crop (RandomResizedCrop 224 + flip): {stats(np.abs(ours - np.stack(refs)))}")


if __name__ == "__main__":
    main()
