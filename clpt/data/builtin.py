"""The built-in benchmark: procedurally drawn images, nothing to download.

Every class is a combination of three visual factors: a shape, a foreground hue
and a background texture (8 x 6 x 5 = 240 combinations). A fixed draw of 90
combinations is split into two disjoint sets of classes:

- 40 *pre-training* classes, used once to pre-train the built-in backbone
  (`clpt.pretrain`), and never seen by the benchmark;
- 50 *benchmark* classes, split into tasks like any other benchmark.

The two sets share the factors (a red disk on stripes is pre-training, a red
square on a checkerboard is benchmark) but no class, so the backbone arrives with
transferable features and no knowledge of the benchmark's classes: the
pre-trained setting of the paper, in miniature. Images are 32 x 32 RGB uint8,
with random position, scale, rotation, colour jitter and pixel noise.
"""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 32
SHAPES = ("disk", "square", "triangle", "ring", "cross", "diamond", "bar", "pair")
HUES = (0.0, 0.08, 0.17, 0.33, 0.55, 0.75)  # red, orange, yellow, green, cyan-blue, violet
TEXTURES = ("plain", "hstripes", "vstripes", "checker", "diagonal")

N_PRETRAIN_CLASSES = 40
N_BENCHMARK_CLASSES = 50
DEFINITION_SEED = 20230917  # fixes which combinations are classes; not the run seed

# Images per class in each split. Pre-training images come from their own seed
# stream, so they never coincide with benchmark images.
BENCHMARK_TRAIN_PER_CLASS = 120
BENCHMARK_TEST_PER_CLASS = 40
PRETRAIN_PER_CLASS = 200


def class_definitions() -> list[tuple[str, float, str]]:
    """All 90 class definitions: 40 pre-training classes, then 50 benchmark classes."""
    combos = [(s, h, t) for s in SHAPES for h in HUES for t in TEXTURES]
    rng = np.random.default_rng(DEFINITION_SEED)
    pick = rng.permutation(len(combos))[: N_PRETRAIN_CLASSES + N_BENCHMARK_CLASSES]
    return [combos[i] for i in pick]


def class_names(which: str) -> list[str]:
    defs = _defs(which)
    return [f"{shape}-h{HUES.index(hue)}-{tex}" for shape, hue, tex in defs]


def _defs(which: str) -> list[tuple[str, float, str]]:
    defs = class_definitions()
    if which == "pretrain":
        return defs[:N_PRETRAIN_CLASSES]
    if which == "benchmark":
        return defs[N_PRETRAIN_CLASSES:]
    raise ValueError(f"unknown class set {which!r}: expected 'pretrain' or 'benchmark'")


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB for arrays of shape (n,); returns (n, 3)."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack(
        [
            np.stack([v, t, p], -1),
            np.stack([q, v, p], -1),
            np.stack([p, v, t], -1),
            np.stack([p, q, v], -1),
            np.stack([t, p, v], -1),
            np.stack([v, p, q], -1),
        ],
        0,
    )  # (6, n, 3)
    return table[i, np.arange(len(h))]


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Boolean masks (n, H, W) of a shape of half-size s in rotated coordinates x, y."""
    ax, ay = np.abs(x), np.abs(y)
    if shape == "disk":
        return x**2 + y**2 < s**2
    if shape == "square":
        return np.maximum(ax, ay) < 0.85 * s
    if shape == "diamond":
        return ax + ay < 1.15 * s
    if shape == "ring":
        r = np.sqrt(x**2 + y**2)
        return np.abs(r - 0.7 * s) < 0.25 * s
    if shape == "cross":
        return ((ax < 0.3 * s) & (ay < s)) | ((ay < 0.3 * s) & (ax < s))
    if shape == "bar":
        return (ax < s) & (ay < 0.35 * s)
    if shape == "pair":
        d1 = (x - 0.55 * s) ** 2 + y**2
        d2 = (x + 0.55 * s) ** 2 + y**2
        return np.minimum(d1, d2) < (0.42 * s) ** 2
    if shape == "triangle":
        # equilateral triangle pointing up, centred at the origin
        k = np.sqrt(3.0)
        return (y > -0.5 * s) & (k * x - y < s) & (-k * x - y < s)
    raise ValueError(shape)


def _texture(texture: str, x: np.ndarray, y: np.ndarray, freq: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Texture intensity in [0, 1] of shape (n, H, W)."""
    if texture == "plain":
        return np.zeros(np.broadcast_shapes(x.shape, freq.shape), dtype=np.float64)
    if texture == "hstripes":
        return (np.sin(freq * y + phase) > 0).astype(np.float64)
    if texture == "vstripes":
        return (np.sin(freq * x + phase) > 0).astype(np.float64)
    if texture == "checker":
        return ((np.sin(freq * x + phase) > 0) ^ (np.sin(freq * y + phase) > 0)).astype(np.float64)
    if texture == "diagonal":
        return (np.sin(freq * (x + y) / np.sqrt(2) + phase) > 0).astype(np.float64)
    raise ValueError(texture)


def render_class(defn: tuple[str, float, str], n: int, rng: np.random.Generator) -> np.ndarray:
    """n images (n, H, W, 3) uint8 of one class definition."""
    shape, hue, texture = defn
    size = IMAGE_SIZE
    lin = (np.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    gy, gx = np.meshgrid(lin, lin, indexing="ij")
    gx, gy = gx[None], gy[None]  # (1, H, W)

    def per_image(lo, hi):
        return rng.uniform(lo, hi, size=(n, 1, 1))

    cx, cy = per_image(-0.25, 0.25), per_image(-0.25, 0.25)
    scale = per_image(0.35, 0.65)
    theta = per_image(-0.5, 0.5)  # radians, about +-30 degrees
    xr = np.cos(theta) * (gx - cx) + np.sin(theta) * (gy - cy)
    yr = -np.sin(theta) * (gx - cx) + np.cos(theta) * (gy - cy)
    mask = _shape_mask(shape, xr, yr, scale)[..., None]  # (n, H, W, 1)

    fg_h = (hue + rng.normal(0, 0.02, size=n)) % 1.0
    fg = _hsv_to_rgb(fg_h, rng.uniform(0.65, 1.0, n), rng.uniform(0.7, 1.0, n))  # (n, 3)

    bg_h = rng.uniform(0, 1, n)
    bg_a = _hsv_to_rgb(bg_h, rng.uniform(0.0, 0.3, n), rng.uniform(0.15, 0.35, n))
    bg_b = _hsv_to_rgb(bg_h, rng.uniform(0.0, 0.3, n), rng.uniform(0.5, 0.7, n))
    freq = per_image(7.0, 11.0)
    phase = per_image(0.0, 2 * np.pi)
    tex = _texture(texture, gx, gy, freq, phase)[..., None]  # (n, H, W, 1)
    background = bg_a[:, None, None, :] * (1 - tex) + bg_b[:, None, None, :] * tex

    img = np.where(mask, fg[:, None, None, :], background)
    img = img + rng.normal(0, 0.06, size=img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def make_split(which: str, split: str, per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 3) uint8 and labels (N,) int64 for a class set and split.

    Deterministic: the same arguments always give the same arrays.
    """
    defs = _defs(which)
    if per_class is None:
        per_class = {
            ("benchmark", "train"): BENCHMARK_TRAIN_PER_CLASS,
            ("benchmark", "test"): BENCHMARK_TEST_PER_CLASS,
            ("pretrain", "train"): PRETRAIN_PER_CLASS,
            ("pretrain", "test"): PRETRAIN_PER_CLASS // 4,
        }[(which, split)]
    stream = {"pretrain": 1, "benchmark": 2}[which] * 10 + {"train": 1, "test": 2}[split]
    images, labels = [], []
    for c, defn in enumerate(defs):
        rng = np.random.default_rng([DEFINITION_SEED, stream, c])
        images.append(render_class(defn, per_class, rng))
        labels.append(np.full(per_class, c, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)
