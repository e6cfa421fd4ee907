"""Tiny datasets written in the published layouts, for the reader tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def _image(path: Path, rng: np.random.Generator, size=(40, 30), color=None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (
        rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        if color is None
        else (np.full((size[1], size[0], 3), color, dtype=np.uint8))
    )
    Image.fromarray(arr).save(path)
    return arr


def make_cifar100(root: Path, train_per_class: int = 2, test_per_class: int = 1, seed: int = 0) -> dict:
    """cifar-100-python/{train,test,meta}; returns the arrays written (HWC) and labels."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    out = {}
    for split, k in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), k)
        rng.shuffle(labels)
        hwc = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
        data = hwc.transpose(0, 3, 1, 2).reshape(len(labels), 3072)  # rows of R, G, B planes
        with open(base / split, "wb") as f:
            pickle.dump(
                {
                    "data": data,
                    "fine_labels": labels.tolist(),
                    "coarse_labels": (labels // 5).tolist(),
                    "filenames": [f"img_{i}.png" for i in range(len(labels))],
                },
                f,
            )
        out[split] = (hwc, labels)
    with open(base / "meta", "wb") as f:
        pickle.dump(
            {
                "fine_label_names": [f"class_{i:02d}" for i in range(100)],
                "coarse_label_names": [f"super_{i}" for i in range(20)],
            },
            f,
        )
    return out


def make_imagenet_r(
    root: Path, n_classes: int = 4, per_class: int = 10, seed: int = 0, name: str = "imagenet-r"
) -> list[str]:
    """`<name>/<wnid>/*.jpg` (ImageNet-R, and ImageNet-A with name="imagenet-a")."""
    rng = np.random.default_rng(seed)
    wnids = [f"n0{1000000 + 37 * c}" for c in range(n_classes)]
    for w in wnids:
        for i in range(per_class):
            _image(root / name / w / f"art_{i}.jpg", rng)
    return wnids


def make_presplit(
    root: Path, name: str, n_classes: int = 3, train: int = 4, test: int = 2, seed: int = 0
) -> None:
    """`<name>/train/<class>/`, `<name>/test/<class>/`: the PILOT-family distribution."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        for split, n in (("train", train), ("test", test)):
            for i in range(n):
                _image(root / name / split / f"n0{2000000 + c}" / f"{i}.jpg", rng)


def make_cub(root: Path, n_classes: int = 3, per_class: int = 4, seed: int = 0) -> None:
    """CUB_200_2011 with images.txt, image_class_labels.txt, train_test_split.txt, classes.txt."""
    rng = np.random.default_rng(seed)
    base = root / "CUB_200_2011"
    images, labels, split, classes = [], [], [], []
    img_id = 0
    for c in range(1, n_classes + 1):
        name = f"{c:03d}.Bird_{c}"
        classes.append(f"{c} {name}")
        for i in range(per_class):
            img_id += 1
            rel = f"{name}/Bird_{c}_{i}.jpg"
            _image(base / "images" / rel, rng)
            images.append(f"{img_id} {rel}")
            labels.append(f"{img_id} {c}")
            split.append(f"{img_id} {1 if i % 2 == 0 else 0}")
    for fname, rows in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("classes.txt", classes),
    ):
        (base / fname).write_text("\n".join(rows) + "\n")


def make_cars_devkit(
    root: Path, n_classes: int = 3, train_per_class: int = 3, test_per_class: int = 2, seed: int = 0
):
    """stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, ...}."""
    import scipy.io as sio

    rng = np.random.default_rng(seed)
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    dt = [
        ("bbox_x1", "O"),
        ("bbox_y1", "O"),
        ("bbox_x2", "O"),
        ("bbox_y2", "O"),
        ("class", "O"),
        ("fname", "O"),
    ]
    written = {}
    for split, k, folder, mat in (
        ("train", train_per_class, "cars_train", base / "devkit" / "cars_train_annos.mat"),
        ("test", test_per_class, "cars_test", base / "cars_test_annos_withlabels.mat"),
    ):
        rows = [(c, i) for c in range(n_classes) for i in range(k)]
        ann = np.zeros((1, len(rows)), dtype=dt)
        for j, (c, _) in enumerate(rows):
            fname = f"{j + 1:05d}.jpg"
            _image(base / folder / fname, rng)
            ann[0, j] = (1, 1, 20, 20, c + 1, fname)  # classes are 1-based in the devkit
        sio.savemat(mat, {"annotations": ann})
        written[split] = [c for c, _ in rows]
    names = np.array([f"Make Model {c} 2012" for c in range(n_classes)], dtype=object)
    sio.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    return written


def make_imagefolder(
    root: Path, classes=("cat", "dog", "eel"), per_class=(6, 2), test_dir="test", seed=0, size=(40, 30)
) -> None:
    rng = np.random.default_rng(seed)
    for split, k in (("train", per_class[0]), (test_dir, per_class[1])):
        for c in classes:
            for i in range(k):
                _image(root / split / c / f"{c}_{i}.png", rng, size=size)


def make_learnable_imagefolder(
    root: Path, n_classes: int = 6, train: int = 12, test: int = 4, seed: int = 0
) -> None:
    """Class c is a plain colour (plus noise): a tiny image-folder benchmark a model can learn."""
    rng = np.random.default_rng(seed)
    colors = rng.integers(0, 256, size=(n_classes, 3))
    for split, k in (("train", train), ("test", test)):
        for c in range(n_classes):
            for i in range(k):
                arr = np.clip(colors[c] + rng.normal(0, 12, size=(36, 36, 3)), 0, 255).astype(np.uint8)
                p = root / split / f"class_{c}" / f"{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(p)
