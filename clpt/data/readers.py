"""Readers for the published benchmarks, in the layouts they are distributed in.

Each reader returns a `RawDataset`: class names, and for each split either the
uint8 images in memory (CIFAR-100) or file paths, with labels 0..C-1 in the
dataset's own class numbering (the run's class order is applied later).

| name        | layout under `benchmark.root`                                              |
|-------------|----------------------------------------------------------------------------|
| cifar100    | `cifar-100-python/{train,test,meta}` (the python pickles torchvision reads) |
| imagenet-r  | `imagenet-r/<wnid>/*.jpg`, 200 classes; deterministic 80/20 split per class |
| imagenet-a  | `imagenet-a/<wnid>/*.jpg`, 200 classes; the same split machinery            |
|             | (both also read pre-split `<name>/train/<class>/`, `<name>/test/<class>/`) |
| cub200      | `CUB_200_2011/{images.txt,image_class_labels.txt,train_test_split.txt,      |
|             | classes.txt,images/}`                                                      |
| cars196     | `stanford_cars/{devkit/,cars_train/,cars_test/,cars_test_annos_withlabels.mat}` |
|             | (the devkit layout torchvision reads), or pre-split `cars196/{train,val}/<class>/` |
|             | (the authors' split_car.py, folders named by label_map.txt; also train/ test/) |
| imagefolder | `train/<class>/*`, and `test/<class>/*` or `val/<class>/*`                  |

`root` may name the dataset folder itself or its parent.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np

from clpt.data import builtin
from clpt.data.registry import (
    READERS,
    RawDataset,
    RawSplit,
)
from clpt.errors import DataError

log = logging.getLogger("clpt")

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _find(root: Path, *candidates: str) -> Path:
    """The first of root/candidate (or root itself when it is the named folder) that exists."""
    for c in candidates:
        if (root / c).exists():
            return root / c
    return root


def _missing(what: str, root: Path, hint: str) -> DataError:
    return DataError(f"{what} not found under benchmark.root={root}", hint=hint)


# --- CIFAR-100 ------------------------------------------------------------------


# what the CIFAR-100 pickles hold: dicts, lists, strings, numbers and NumPy arrays; nothing else is
# looked up while unpickling (a pickle can name any callable, and calling it runs code)
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which the format never holds")


def _unpickle(path: Path, keys: tuple[str, ...]) -> dict:
    """A CIFAR pickle, read with an unpickler that admits only containers and arrays; DataError naming
    the file when it is not one (damaged, crafted, or another format)."""
    try:
        with open(path, "rb") as f:
            d = _DataUnpickler(f, encoding="latin1").load()
        if not isinstance(d, dict) or any(k not in d for k in keys):
            raise pickle.UnpicklingError(f"it does not hold the keys {', '.join(keys)}")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataError(
            f"{str(path)!r} is not a CIFAR-100 python pickle ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__})",
            hint=f"replace cifar-100-python with a fresh extract of {CIFAR_URL}",
        ) from None
    return d


def read_cifar100(root: Path, download: bool) -> RawDataset:
    base = _find(root, "cifar-100-python")
    if not all((base / f).is_file() for f in ("train", "test", "meta")):
        if download:
            base = _download_cifar(root)
        else:
            raise _missing(
                "CIFAR-100 (cifar-100-python/{train,test,meta})",
                root,
                f"extract {CIFAR_URL} into {root}, or set benchmark.download=true",
            )
    meta = _unpickle(base / "meta", ("fine_label_names",))
    splits = {}
    for split in ("train", "test"):
        d = _unpickle(base / split, ("data", "fine_labels"))
        try:
            x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            if len(x) != len(d["fine_labels"]):
                raise ValueError(f"{len(x)} images but {len(d['fine_labels'])} labels")
        except (ValueError, TypeError) as e:
            raise DataError(f"{str(base / split)!r} does not hold CIFAR-100's arrays ({e})",
                            hint=f"replace cifar-100-python with a fresh extract of {CIFAR_URL}") from None  # fmt: skip
        splits[split] = RawSplit(
            labels=np.asarray(d["fine_labels"], dtype=np.int64), images=np.ascontiguousarray(x)
        )
    return RawDataset(
        "cifar100",
        base,
        list(meta["fine_label_names"]),
        splits["train"],
        splits["test"],
        {"layout": "cifar-100-python pickles"},
    )


def _download_cifar(root: Path) -> Path:
    from torchvision.datasets.utils import download_and_extract_archive

    log.info("CIFAR-100 not found under %s: downloading %s", root, CIFAR_URL)
    try:
        download_and_extract_archive(CIFAR_URL, str(root), md5=CIFAR_MD5)
    except Exception as e:  # URLError, socket errors, HTTP errors: all mean "no download here"
        raise DataError(
            f"CIFAR-100 is not under benchmark.root={root} and could not be downloaded ({type(e).__name__})",
            hint=f"download {CIFAR_URL} elsewhere and extract it into {root}",
        ) from None
    return root / "cifar-100-python"


# --- folder layouts --------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    """The image files under `folder`, sorted, following links to folders. A linked folder that is the
    folder itself or one it lies in (a loop), or a folder reached twice, is a DataError naming the link:
    followed, it would repeat images or pull in other classes' images under this class's label."""
    out: list[Path] = []
    seen: dict[str, str] = {}
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            raise DataError(
                f"the folder {top!r} is reached twice under {str(folder)!r} (it is the same folder as "
                f"{seen[real]!r}; a link loops or two links lead to one folder)",
                hint="remove the link, so each image is read once under its own class",
            )
        seen[real] = top
        dirs.sort()
        out += [Path(top) / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(p for p in out if p.is_file())


def _class_folders(base: Path) -> list[str]:
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_wnid_folders(root: Path, name: str, split_seed: int, train_fraction: float = 0.8) -> RawDataset:
    """ImageNet-R / ImageNet-A as distributed (`<name>/<wnid>/*`), with a deterministic per-class split.

    Per class, files sorted by name are permuted by `np.random.default_rng([split_seed, class])`;
    the first round(train_fraction * n) are training images. A pre-split folder
    (`<name>/train/<class>/` and `<name>/test/<class>/` or `val/`, as the PILOT-family
    code bases distribute them) is read as it is, its split recorded as given.
    """
    base = _find(root, name)
    if (base / "train").is_dir() and any((base / d).is_dir() for d in ("test", "val")):
        raw = read_imagefolder(base, name)
        raw.info.update({"layout": f"{name}/train/, {name}/test/ (pre-split)", "split": "as distributed"})
        return raw
    if not base.is_dir() or not _class_folders(base):
        raise _missing(f"{name} ({name}/<wnid>/*.jpg)", root, f"extract {name}.tar into benchmark.root")
    classes = _class_folders(base)
    empty = [c for c in classes if not _image_files(base / c)]
    if empty:
        raise DataError(
            f"{len(empty)} class folder(s) under {base} hold no images (e.g. {base / empty[0]})",
            hint=f"put images ({', '.join(IMAGE_SUFFIXES)}) into them, or remove the folders",
        )
    tr_p: list[str] = []
    te_p: list[str] = []
    tr_y: list[int] = []
    te_y: list[int] = []
    for c, wnid in enumerate(classes):
        files = _image_files(base / wnid)
        order = np.random.default_rng([split_seed, c]).permutation(len(files))
        n_train = int(round(train_fraction * len(files)))
        for rank, i in enumerate(order):
            (tr_p if rank < n_train else te_p).append(str(files[i]))
            (tr_y if rank < n_train else te_y).append(c)
    return RawDataset(
        name,
        base,
        classes,
        RawSplit(np.asarray(tr_y, dtype=np.int64), paths=tr_p),
        RawSplit(np.asarray(te_y, dtype=np.int64), paths=te_p),
        {"layout": f"{name}/<wnid>/", "split": f"per class {train_fraction:.0%} train, seed {split_seed}"},
    )


def read_imagefolder(root: Path, name: str = "imagefolder") -> RawDataset:
    """`train/<class>/` and `test/<class>/` (or `val/<class>/`), classes matched by folder name."""
    from torchvision.datasets.folder import find_classes, make_dataset

    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise _missing(
            "train/<class>/ and test/<class>/ (or val/<class>/)",
            root,
            "arrange the images as train/<class>/* and test/<class>/*",
        )
    classes, to_idx = find_classes(str(root / "train"))
    test_classes, _ = find_classes(str(test_dir))
    if test_classes != classes:
        extra = sorted(set(test_classes) ^ set(classes))[:5]
        raise DataError(
            f"train/ and {test_dir.name}/ have different class folders (e.g. {extra})",
            hint="give both splits the same class folders",
        )
    splits = []
    for d in (root / "train", test_dir):
        empty = [c for c in classes if not _image_files(d / c)]
        if empty:
            raise DataError(
                f"{len(empty)} class folder(s) under {d} hold no images (e.g. {d / empty[0]})",
                hint=f"put images ({', '.join(IMAGE_SUFFIXES)}) into them, or remove them from every split",
            )
        samples = make_dataset(str(d), to_idx, extensions=IMAGE_SUFFIXES)
        splits.append(
            RawSplit(np.asarray([y for _, y in samples], dtype=np.int64), paths=[p for p, _ in samples])
        )
    return RawDataset(name, root, classes, splits[0], splits[1], {"layout": f"train/, {test_dir.name}/"})


def read_class_folders(root: Path, name: str = "stream", split_seed: int = 0,
                       test_fraction: float = 0.2) -> RawDataset:  # fmt: skip
    """A folder of classes: `train/<class>/` and `test/<class>/` (or `val/`), read as they are; or
    `<class>/` alone, each class split into test (round(test_fraction * n), at least 1) and train.

    The held-out split of a class depends only on its name, its files and `split_seed`:
    files sorted by name, permuted by `np.random.default_rng([split_seed, crc32(name)])`.
    A class needs at least two images to give one to each split.
    """
    import zlib

    root = Path(root)
    if (root / "train").is_dir():
        return read_imagefolder(root, name)
    classes = _class_folders(root) if root.is_dir() else []
    if not classes:
        raise _missing("class folders (<class>/*.jpg, or train/<class>/ and test/<class>/)", root,
                       "arrange the images as <class>/* (a test share is held out) or train/<class>/* and test/<class>/*")  # fmt: skip
    tr_p: list[str] = []
    te_p: list[str] = []
    tr_y: list[int] = []
    te_y: list[int] = []
    for c, cls in enumerate(classes):
        files = _image_files(root / cls)
        if len(files) < 2:
            raise DataError(
                f"class folder {root / cls} holds {len(files)} image(s): a held-out test image needs at least two",
                hint="add images to it, or give the split yourself as train/<class>/ and test/<class>/",
            )
        order = np.random.default_rng([split_seed, zlib.crc32(cls.encode())]).permutation(len(files))
        n_test = min(len(files) - 1, max(1, int(round(test_fraction * len(files)))))
        for rank, i in enumerate(order):
            (te_p if rank < n_test else tr_p).append(str(files[i]))
            (te_y if rank < n_test else tr_y).append(c)
    return RawDataset(name, root, classes, RawSplit(np.asarray(tr_y, dtype=np.int64), paths=tr_p),
                      RawSplit(np.asarray(te_y, dtype=np.int64), paths=te_p),
                      {"layout": "<class>/", "split": f"per class {test_fraction:g} held out for test, seed {split_seed}"})  # fmt: skip


def _presplit(root: Path, *names: str) -> Path | None:
    """The folder among root and root/<name> holding train/ and val/ (or test/) class folders, if any."""
    for base in (root, *(root / n for n in names)):
        if (base / "train").is_dir() and any((base / d).is_dir() for d in ("val", "test")):
            return base
    return None


def read_cub200(root: Path) -> RawDataset:
    """CUB-200-2011 as distributed (the txt files), or pre-split as the authors' instructions produce
    (`cub_200/{train,val}/<class>/`), read under the CUB preset with CUB's transforms either way."""
    pre = _presplit(root, "cub_200", "CUB_200_2011")
    if pre is not None:
        raw = read_imagefolder(pre, name="cub200")
        raw.info.update(
            {"layout": f"{pre.name}/train/, {pre.name}/val/ (pre-split)", "split": "as distributed"}
        )
        return raw
    base = _find(root, "CUB_200_2011")
    need = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "images")
    if not all((base / f).exists() for f in need):
        raise _missing(
            "CUB-200-2011 (images.txt, image_class_labels.txt, train_test_split.txt, images/)",
            root,
            "extract CUB_200_2011.tgz into benchmark.root",
        )

    def table(name: str) -> dict[int, str]:
        out = {}
        for i, line in enumerate((base / name).read_text(errors="replace").splitlines(), 1):
            row = line.split(maxsplit=1)
            if not row:
                continue
            if len(row) != 2 or not row[0].isdigit():
                raise DataError(f"{name}, line {i}: {line[:80]!r} is not '<id> <value>'",
                                hint="restore the file from CUB_200_2011.tgz")  # fmt: skip
            out[int(row[0])] = row[1].strip()
        return out

    images, labels, is_train = (
        table("images.txt"),
        table("image_class_labels.txt"),
        table("train_test_split.txt"),
    )
    if (base / "classes.txt").is_file():
        names_by_id = table("classes.txt")
    else:
        names_by_id = {int(v): f"class_{v}" for v in set(labels.values())}
    ids = sorted(names_by_id)
    index = {cid: i for i, cid in enumerate(ids)}
    out: dict[bool, tuple[list[str], list[int]]] = {True: ([], []), False: ([], [])}
    for img_id, rel in sorted(images.items()):
        if os.path.isabs(rel) or os.path.normpath(rel).split(os.sep)[0] == "..":
            raise DataError(f"images.txt: image {img_id} is {rel!r}, a path outside CUB_200_2011/images",
                            hint="restore images.txt from CUB_200_2011.tgz")  # fmt: skip
        label = labels.get(img_id, "")
        if img_id not in is_train or not label.isdigit() or int(label) not in index:
            raise DataError(f"image {img_id} of images.txt has no valid row in image_class_labels.txt, "
                            "train_test_split.txt or classes.txt", hint="restore the files from CUB_200_2011.tgz")  # fmt: skip
        paths, ys = out[is_train[img_id] == "1"]
        paths.append(str(base / "images" / rel))
        ys.append(index[int(label)])
    split = {k: RawSplit(np.asarray(v[1], dtype=np.int64), paths=v[0]) for k, v in out.items()}
    return RawDataset(
        "cub200",
        base,
        [names_by_id[i] for i in ids],
        split[True],
        split[False],
        {"layout": "CUB_200_2011 txt files", "split": "train_test_split.txt"},
    )


def read_cars196(root: Path) -> RawDataset:
    """Stanford Cars: the devkit layout (through torchvision's StanfordCars), or pre-split folders.

    Pre-split: `train/<class>/` and `val/<class>/` (or `test/`) in root, `root/cars196` or
    `root/stanford_cars`, as the authors' `split_car.py` writes them, its class folders named by
    `label_map.txt`. Classes are numbered by sorted folder name, as torchvision's ImageFolder (and
    so the authors' code) numbers them; the devkit layout numbers them as `cars_meta.mat` lists
    them, which need not be the same order: one seed may give the two layouts different class
    orders. A `label_map.txt` beside the folders (or one level up) is checked against them: every
    folder a class of the map, every class of the map a folder.
    """
    pre = _presplit(root, "cars196", "stanford_cars")
    if pre is not None:
        ds = read_imagefolder(pre, name="cars196")
        ds.info.update(
            {
                "layout": f"{pre.name}/ {ds.info['layout']} (pre-split)",
                "split": "as distributed",
                "class numbering": "class folders sorted by name (torchvision ImageFolder)",
            }
        )
        label_map = next(
            (p for p in (pre / "label_map.txt", pre.parent / "label_map.txt") if p.is_file()), None
        )
        if label_map is not None:
            _check_label_map(label_map, ds.class_names, pre)
            ds.info["label_map"] = str(label_map)
        _warn_if_cars_split_swapped(ds)
        return ds
    from torchvision.datasets import StanfordCars

    parent = root.parent if root.name == "stanford_cars" else root
    try:
        splits = [StanfordCars(str(parent), split=s) for s in ("train", "test")]
    except RuntimeError:
        raise _missing(
            "Stanford Cars (stanford_cars/devkit/, cars_train/, cars_test/, cars_test_annos_withlabels.mat, "
            "or train/<class>/ and test/<class>/)",
            root,
            "extract the devkit, the images and cars_test_annos_withlabels.mat into benchmark.root",
        ) from None
    raws = [
        RawSplit(np.asarray([y for _, y in d._samples], dtype=np.int64), paths=[p for p, _ in d._samples])
        for d in splits
    ]
    return RawDataset(
        "cars196",
        parent / "stanford_cars",
        list(splits[0].classes),
        raws[0],
        raws[1],
        {"layout": "stanford_cars devkit"},
    )


CARS_OFFICIAL = (8144, 8041)  # Stanford Cars: training and test images


def _check_label_map(path: Path, folders: list[str], base: Path) -> None:
    """`<id> <class name>` per line, as `split_car.py` reads it; its names must be the class folders."""
    try:
        rows = [line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"cannot read {path} ({type(e).__name__})", hint="fix or remove the label map"
        ) from None
    bad = next((i for i, r in enumerate(rows) if len(r) != 2), None)
    if bad is not None:
        raise DataError(
            f"{path}: line {bad + 1} is not '<class id> <class name>'",
            hint="use the label_map.txt the folders were made with, or remove it",
        )
    names = {r[1].strip() for r in rows}
    extra = [f for f in folders if f not in names]
    if extra:
        raise DataError(
            f"{len(extra)} class folder(s) under {base / 'train'} are not in {path} (e.g. {extra[0]!r})",
            hint="use the label_map.txt the folders were made with, or remove it",
        )
    missing = sorted(names - set(folders))
    if missing:
        raise DataError(
            f"{len(missing)} class(es) of {path} have no folder under {base / 'train'} (e.g. {missing[0]!r})",
            hint="re-run the split so that every class has its folders, or remove the label map",
        )


def _warn_if_cars_split_swapped(ds: RawDataset) -> None:
    """Pre-split Cars whose train/ holds as many images as the official test set and the reverse."""
    counts = (len(ds.train.paths or []), len(ds.test.paths or []))
    if counts == CARS_OFFICIAL[::-1]:
        note = (
            f"train/ holds {counts[0]} images and the test folder {counts[1]}: the sizes of the official "
            f"test and training sets, swapped"
        )
        log.warning("Stanford Cars: %s (the official split trains on %d images)", note, CARS_OFFICIAL[0])
        ds.info["split"] = f"as distributed; {note}"


def read_dataset(name: str, root: str | None, download: bool, split_seed: int) -> RawDataset:
    """The dataset of the registered reader `name` under `root`."""
    spec = READERS.get(name)
    r = Path(root).expanduser() if root is not None else None
    if spec.needs_root and (r is None or not r.exists()):
        raise DataError(
            f"benchmark.root={r} does not exist", hint="point benchmark.root at the dataset folder"
        )
    return spec.read(r, download, split_seed)


def _rooted(read):
    """A reader of a dataset folder as a registry reader (`read_dataset` has checked that the root exists)."""

    def call(root: Path | None, download: bool, split_seed: int) -> RawDataset:
        assert root is not None
        return read(root, download, split_seed)

    return call


def read_builtin(root: Path | None, download: bool, split_seed: int) -> RawDataset:
    """The built-in benchmark: procedural images, generated in memory (clpt.data.builtin)."""
    x_tr, y_tr = builtin.make_split("benchmark", "train")
    x_te, y_te = builtin.make_split("benchmark", "test")
    return RawDataset("builtin", None, builtin.class_names("benchmark"), RawSplit(y_tr, images=x_tr),
                      RawSplit(y_te, images=x_te), {"source": "built-in procedural images"})  # fmt: skip


# What the registry's entries call (clpt.data.registry names them lazily): (root, download, split_seed)
READ = {
    "builtin": read_builtin,
    "cifar100": _rooted(lambda r, download, s: read_cifar100(r, download)),
    "imagenet-r": _rooted(lambda r, d, s: read_wnid_folders(r, "imagenet-r", s)),
    "imagenet-a": _rooted(lambda r, d, s: read_wnid_folders(r, "imagenet-a", s)),
    "cub200": _rooted(lambda r, d, s: read_cub200(r)),
    "cars196": _rooted(lambda r, d, s: read_cars196(r)),
    "imagefolder": _rooted(lambda r, d, s: read_imagefolder(r)),
    "stream": _rooted(lambda r, d, s: read_class_folders(r, "stream", s)),
}
