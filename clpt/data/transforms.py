"""Batched image transforms that run where the batch lives (CPU or GPU).

In-memory uint8 datasets (the built-in benchmark, CIFAR-sized images) are
augmented a whole batch at a time on the compute device, so no worker process
has to decode or crop single images. Randomness comes from a CPU
`torch.Generator`, so a seed gives the same crops on any device.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F


def to_float(x_uint8_nhwc: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1]."""
    return x_uint8_nhwc.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def pad_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop of the input size from a reflect-padded batch, then random h-flip.

    x: (B, C, H, W) float. Each image gets its own offset and flip.
    """
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (B, C, H+2p, W+2p)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    iy = (oy[:, None] + ar_h[None, :])[:, :, None]  # (B, H, 1)
    ix = ox[:, None] + ar_w[None, :]  # (B, W)
    ix = torch.where(flip[:, None], ix.flip(-1), ix)[:, None, :]  # (B, 1, W)
    bi = torch.arange(b, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bi, iy, ix]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


# --- in-memory small images (CIFAR-100), batched on the device --------------------


def _rrc_boxes(b: int, h: int, w: int, generator: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop box sampling, vectorised: 10 tries per image, then a centre crop."""
    area = h * w
    tries = 10
    s = torch.empty(b, tries).uniform_(scale[0], scale[1], generator=generator) * area
    log_r = torch.empty(b, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(log_r)
    cw = torch.sqrt(s * r).round()
    ch = torch.sqrt(s / r).round()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1))
    # fallback: the whole image clamped to the ratio range (torchvision's centre crop)
    in_ratio = w / h
    fw, fh = (
        (w, round(w / ratio[0]))
        if in_ratio < ratio[0]
        else ((round(h * ratio[1]), h) if in_ratio > ratio[1] else (w, h))
    )
    idx = first.clamp(min=0)
    cw = torch.where(first >= 0, cw.gather(1, idx[:, None])[:, 0], torch.full((b,), float(fw)))
    ch = torch.where(first >= 0, ch.gather(1, idx[:, None])[:, 0], torch.full((b,), float(fh)))
    u = torch.rand(b, 2, generator=generator)
    x0 = torch.where(first >= 0, torch.floor(u[:, 0] * (w - cw + 1)), (w - cw) // 2)
    y0 = torch.where(first >= 0, torch.floor(u[:, 1] * (h - ch + 1)), (h - ch) // 2)
    return x0, y0, cw, ch


def random_resized_crop_flip(
    x: torch.Tensor, size: int, generator: torch.Generator, scale=(0.08, 1.0), mode: str = "bicubic"
) -> torch.Tensor:
    """RandomResizedCrop(size, scale, mode) + RandomHorizontalFlip on a (B, C, H, W) float batch, on its device."""
    b, _, h, w = x.shape
    x0, y0, cw, ch = _rrc_boxes(b, h, w, generator, scale=tuple(scale))
    flip = torch.rand(b, generator=generator) < 0.5
    sx = (cw / w) * torch.where(flip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (x0 + cw / 2) / w * 2 - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (y0 + ch / 2) / h * 2 - 1
    grid = F.affine_grid(theta.to(x.device, x.dtype), [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False).clamp_(0, 1)


def brightness_jitter(x: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """ColorJitter(brightness=amount): each image times a factor drawn from U[max(0, 1 - a), 1 + a]."""
    f = torch.empty(x.shape[0]).uniform_(max(0.0, 1 - amount), 1 + amount, generator=generator)
    return (x * f.to(x.device, x.dtype).view(-1, 1, 1, 1)).clamp_(0, 1)


def _to_8bit(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_(0, 1).mul_(255).round_().div_(255)


def pil_bicubic_resize(x: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """PIL's `Image.resize(BICUBIC)` on a (B, C, H, W) batch in [0, 1] at 8-bit levels, on its device.

    PIL resamples horizontally, then vertically, with its bicubic kernel (a = -0.5, support widened
    when downscaling) and rounds to 8 bits after each pass. torch's antialiased bicubic is that
    kernel, so two passes with the same rounding match PIL within 1/255 (tests/test_data.py).
    """
    h, w = x.shape[-2:]
    if nw != w:
        x = _to_8bit(F.interpolate(x, size=(h, nw), mode="bicubic", align_corners=False, antialias=True))
    if nh != h:
        x = _to_8bit(F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True))
    return x


def test_resize(size: int, mode: str = "crop") -> int:
    """The shorter side the test transform resizes to before CenterCrop(size): size * 256/224 (`crop`,
    SLCA's and most codes'), or size itself (`full`: the whole image, RanPAC's CIFAR test transform)."""
    return size if mode == "full" else round(size * 256 / 224)


def resize_center_crop(x: torch.Tensor, resize: int, size: int) -> torch.Tensor:
    """Resize(resize, bicubic) of the shorter side, then CenterCrop(size): torchvision's test transform
    on a PIL image (sizes as torchvision computes them), within 1/255."""
    h, w = x.shape[-2:]
    nh, nw = (
        (resize, max(resize, int(resize * w / h))) if h <= w else (max(resize, int(resize * h / w)), resize)
    )
    x = pil_bicubic_resize(x, nh, nw)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return x[..., top : top + size, left : left + size]


# --- files: per-image torchvision pipelines in DataLoader workers (uint8 out) -----


def file_transform(family: str, train: bool, size: int, crop_scale=None, interpolation: str = "bicubic",
                   test_mode: str = "crop"):  # fmt: skip
    """docs/methods/slca.md's table. Outputs uint8 CHW; normalisation happens on the device.

    `crop_scale` set (a method's protocol, e.g. MIST's (0.05, 1) bilinear): training
    is RandomResizedCrop(size, crop_scale, interpolation) + flip for every dataset.
    """
    from torchvision.transforms import InterpolationMode, v2

    bicubic = InterpolationMode.BICUBIC
    resize = test_resize(size, test_mode)
    if train and crop_scale is not None:
        mode = InterpolationMode.BILINEAR if interpolation == "bilinear" else bicubic
        steps = [
            v2.RandomResizedCrop(size, scale=tuple(crop_scale), interpolation=mode, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    elif not train:
        steps = [v2.Resize(resize, interpolation=bicubic, antialias=True), v2.CenterCrop(size)]
    elif family == "fixed_resize":  # CUB-200, Cars-196
        big = round(size * 300 / 224)
        steps = [
            v2.Resize((big, big), interpolation=bicubic, antialias=True),
            v2.RandomCrop(size),
            v2.RandomHorizontalFlip(),
        ]
    else:  # ImageNet-R, image folders
        steps = [v2.RandomResizedCrop(size, interpolation=bicubic, antialias=True), v2.RandomHorizontalFlip()]
    return v2.Compose([v2.ToImage(), *steps, v2.ToDtype(torch.uint8)])


# --- decoding ---------------------------------------------------------------------------------

_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image):
    """An 8-bit RGB PIL image of any PIL image. Greyscale of 16 bits (a 16-bit PNG or TIFF opens as
    "I;16" or "I") is scaled to 8 bits, value * 255 / 65535 rounded: PIL's own `convert("RGB")` clips
    such values at 255, which turns nearly every pixel white. A 32-bit "I" image whose values all lie in
    [0, 255] is taken as 8-bit. Every other mode goes through `convert`."""
    if image.mode not in _WIDE_GREY:
        return image.convert("RGB")
    import numpy as np
    from PIL import Image

    a = np.asarray(image, dtype=np.float64)
    top = 255.0 if image.mode == "I" and a.size and a.min() >= 0 and a.max() <= 255 else 65535.0
    grey = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


# --- the test transform, one image at a time (prediction and exports) ----------------------------


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """A run's test transform for one PIL image: (3, size, size) float32, normalised.

    `kind` is the pipeline the run's evaluation used, so a file of a test image gives
    the tensor its evaluation saw: `files` (image-file benchmarks: torchvision
    Resize(round(size * 256 / 224), bicubic) + CenterCrop(size) on uint8),
    `arrays` (in-memory CIFAR-sized images: the tensor resize and center crop
    above), `builtin` (resized only when the image is not already `size`).
    """

    kind: str
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: str = "crop"  # benchmark.test_resize

    KINDS = ("files", "arrays", "builtin")

    @classmethod
    def for_family(cls, family: str, size: int, mean, std, resize_mode: str = "crop") -> EvalTransform:
        kind = {"builtin": "builtin", "cifar": "arrays"}.get(family, "files")
        return cls(kind, int(size), tuple(float(v) for v in mean), tuple(float(v) for v in std), resize_mode)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "size": self.size, "mean": list(self.mean), "std": list(self.std),
                "resize": test_resize(self.size, self.resize_mode) if self.kind != "builtin" else self.size,
                "resize_mode": self.resize_mode,
                "interpolation": "bicubic", "crop": "center"}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> EvalTransform:
        if d.get("kind") not in cls.KINDS:
            raise ValueError(f"unknown test transform kind {d.get('kind')!r}")
        return cls(d["kind"], int(d["size"]), tuple(d["mean"]), tuple(d["std"]), d.get("resize_mode", "crop"))

    def __call__(self, image) -> torch.Tensor:
        import numpy as np

        rgb = to_rgb(image)
        if self.kind == "files":
            x = _file_test_transform(self.size, self.resize_mode)(rgb)[None].float().div_(255.0)  # (1, 3, S, S)
        else:
            x = to_float(torch.from_numpy(np.asarray(rgb).copy())[None])  # (1, 3, H, W)
            if self.kind == "arrays":
                x = resize_center_crop(x, test_resize(self.size, self.resize_mode), self.size)
            elif x.shape[-1] != self.size or x.shape[-2] != self.size:
                x = resize_center_crop(x, self.size, self.size)
        return normalize(x, self.mean, self.std)[0]


@functools.lru_cache(maxsize=4)
def _file_test_transform(size: int, mode: str = "crop"):
    return file_transform("files", train=False, size=size, test_mode=mode)
