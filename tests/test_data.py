"""Dataset readers on tiny files in each published layout; transforms; the split manifest."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from fake_data import (
    _image,
    make_cars_devkit,
    make_cifar100,
    make_cub,
    make_imagefolder,
    make_imagenet_r,
    make_learnable_imagefolder,
    make_presplit,
)
from PIL import Image
from typer.testing import CliRunner

from clpt.config import BenchmarkConfig
from clpt.data import manifest as M
from clpt.data.benchmark import class_order, load_benchmark
from clpt.data.loader import batches
from clpt.data.readers import read_cars196, read_cifar100, read_cub200, read_imagefolder, read_wnid_folders
from clpt.data.registry import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from clpt.errors import DataError
from clpt.stages import resolve as R


def test_cifar100_pickles(tmp_path):
    written = make_cifar100(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-100-python"):  # the parent or the folder itself
        ds = read_cifar100(root, download=False)
        assert len(ds.class_names) == 100 and ds.class_names[7] == "class_07"
        for split in ("train", "test"):
            hwc, labels = written[split]
            raw = getattr(ds, split)
            assert np.array_equal(raw.images, hwc) and np.array_equal(raw.labels, labels)
            assert raw.images.dtype == np.uint8 and raw.images.shape[1:] == (32, 32, 3)


def test_cifar100_missing_without_download(tmp_path):
    with pytest.raises(DataError, match="CIFAR-100") as e:
        read_cifar100(tmp_path, download=False)
    assert "cifar-100-python.tar.gz" in e.value.hint


def test_imagenet_r_split_is_deterministic_and_80_20(tmp_path):
    wnids = make_imagenet_r(tmp_path, n_classes=4, per_class=10)
    a = read_wnid_folders(tmp_path, "imagenet-r", split_seed=0)
    b = read_wnid_folders(tmp_path / "imagenet-r", "imagenet-r", split_seed=0)
    assert a.class_names == sorted(wnids)
    assert a.train.paths == b.train.paths and np.array_equal(a.train.labels, b.train.labels)
    assert np.bincount(a.train.labels).tolist() == [8] * 4 and np.bincount(a.test.labels).tolist() == [2] * 4
    assert not set(a.train.paths) & set(a.test.paths)
    assert len(set(a.train.paths) | set(a.test.paths)) == 40
    for p, y in zip(a.train.paths, a.train.labels, strict=True):
        assert os.path.basename(os.path.dirname(p)) == a.class_names[y]
    other = read_wnid_folders(tmp_path, "imagenet-r", split_seed=1)
    assert other.train.paths != a.train.paths  # the seed is what fixes the split
    assert "seed 0" in a.info["split"]


def test_cub200(tmp_path):
    make_cub(tmp_path, n_classes=3, per_class=4)
    ds = read_cub200(tmp_path)
    assert ds.class_names == ["001.Bird_1", "002.Bird_2", "003.Bird_3"]
    assert np.bincount(ds.train.labels).tolist() == [2, 2, 2] and np.bincount(ds.test.labels).tolist() == [
        2,
        2,
        2,
    ]
    assert all(
        f"Bird_{y + 1}_" in os.path.basename(p) for p, y in zip(ds.train.paths, ds.train.labels, strict=True)
    )
    assert all(
        int(os.path.basename(p).split("_")[-1][0]) % 2 == 0 for p in ds.train.paths
    )  # is_training_image=1


def test_cars196_devkit_and_folders(tmp_path):
    written = make_cars_devkit(tmp_path / "a", n_classes=3)
    for root in (tmp_path / "a", tmp_path / "a" / "stanford_cars"):
        ds = read_cars196(root)
        assert ds.class_names == ["Make Model 0 2012", "Make Model 1 2012", "Make Model 2 2012"]
        assert ds.train.labels.tolist() == written["train"] and ds.test.labels.tolist() == written["test"]
        assert all(os.path.isfile(p) for p in ds.train.paths + ds.test.paths)
    make_imagefolder(tmp_path / "b", classes=("audi", "bmw"))
    ds = read_cars196(tmp_path / "b")
    assert ds.class_names == ["audi", "bmw"] and len(ds.train.paths) == 12 and len(ds.test.paths) == 4
    (tmp_path / "c").mkdir()
    with pytest.raises(DataError, match="Stanford Cars"):
        read_cars196(tmp_path / "c")


def test_imagefolder_train_and_val(tmp_path):
    make_imagefolder(tmp_path, test_dir="val")
    ds = read_imagefolder(tmp_path)
    assert ds.class_names == ["cat", "dog", "eel"]
    assert np.bincount(ds.train.labels).tolist() == [6, 6, 6] and np.bincount(ds.test.labels).tolist() == [
        2,
        2,
        2,
    ]
    (tmp_path / "val" / "fox").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "fox" / "x.png")
    with pytest.raises(DataError, match="different class folders"):
        read_imagefolder(tmp_path)


def test_benchmark_applies_the_class_order(tmp_path):
    make_imagenet_r(tmp_path, n_classes=4, per_class=10)
    cfg = BenchmarkConfig(name="imagenet-r", root=str(tmp_path), init_classes=2, increment=1, seed=5)
    b = load_benchmark(cfg)
    raw = b.raw
    order = class_order(4, 5)
    assert np.array_equal(b.order, order) and b.class_names == [raw.class_names[i] for i in order]
    assert np.array_equal(order[b.train.labels], raw.train.labels)  # remapped label i is class order[i]
    assert [len(r) for r in b.tasks] == [2, 1, 1]
    assert (b.family, b.image_size, b.mean, b.std) == ("rrc", 224, IMAGENET_MEAN, IMAGENET_STD)


def _constant_batch(bench, split, train, value):
    gen = torch.Generator().manual_seed(0)
    x, _ = next(iter(batches(bench, split, np.arange(len(split))[:4], 4, torch.device("cpu"), train, gen)))
    return x


@pytest.mark.parametrize("name,family", [("imagenet-r", "rrc"), ("cub200", "fixed_resize")])
def test_file_transforms_shapes_and_normalisation(tmp_path, name, family):
    if name == "imagenet-r":
        root = tmp_path / "imagenet-r" / "n01"
        root.mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (60 + i, 45), (200, 100, 50)).save(root / f"{i}.jpg", quality=100)
    else:
        make_cub(tmp_path, n_classes=2, per_class=4)
        for p in (tmp_path / "CUB_200_2011" / "images").rglob("*.jpg"):
            Image.new("RGB", (50, 70), (200, 100, 50)).save(p, quality=100)
    b = load_benchmark(
        BenchmarkConfig(name=name, root=str(tmp_path), init_classes=1, increment=1, image_size=48)
    )
    assert b.family == family
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for train in (True, False):
        x = _constant_batch(b, b.train, train, None)
        assert x.shape[1:] == (3, 48, 48) and x.dtype == torch.float32
        torch.testing.assert_close(x.mean(dim=(0, 2, 3)), expected, atol=0.03, rtol=0)


def test_cifar_transforms_on_the_device(tmp_path):
    make_cifar100(tmp_path)
    b = load_benchmark(BenchmarkConfig(name="cifar100", root=str(tmp_path), download=False))
    assert (b.family, b.image_size, b.mean, b.std) == ("cifar", 224, CIFAR_MEAN, CIFAR_STD)
    b.train.images[:4] = (120, 60, 30)  # constant images: normalisation is checkable
    expected = (torch.tensor([120, 60, 30]) / 255 - torch.tensor(CIFAR_MEAN)) / torch.tensor(CIFAR_STD)
    x_test = _constant_batch(b, b.train, False, None)
    assert x_test.shape == (4, 3, 224, 224)
    torch.testing.assert_close(x_test, expected.view(1, 3, 1, 1).expand_as(x_test), atol=1e-4, rtol=0)
    x_train = _constant_batch(b, b.train, True, None)  # brightness jitter scales each image by one factor
    assert x_train.shape == (4, 3, 224, 224)
    raw = x_train * torch.tensor(CIFAR_STD).view(1, 3, 1, 1) + torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    ratio = raw[:, 0] / raw[:, 2]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 4.0), atol=1e-3, rtol=0)
    f = raw[:, 2].mean(dim=(1, 2)) / (30 / 255)
    assert f.min() >= 1 - 63 / 255 - 1e-4 and f.max() <= 1 + 63 / 255 + 1e-4


def test_manifest_reports_changed_missing_and_added_files(tmp_path):
    make_imagefolder(tmp_path)
    raw = read_imagefolder(tmp_path)
    man = M.build_manifest(raw)
    assert man["counts"] == {"train": 18, "test": 6} and len(man["digest"]) == 64
    M.verify(raw, man)  # unchanged
    p = tmp_path / "train" / "dog" / "dog_1.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(p)
    with pytest.raises(DataError, match="1 files changed"):
        M.verify(read_imagefolder(tmp_path), man)
    p.unlink()
    with pytest.raises(DataError, match="1 files missing"):
        M.verify(read_imagefolder(tmp_path), man)
    Image.new("RGB", (4, 4)).save(tmp_path / "test" / "eel" / "new.png")
    with pytest.raises(DataError, match="added"):
        M.verify(read_imagefolder(tmp_path), man)


def test_full_run_on_a_tiny_image_folder(tmp_path, clpt_cache):
    from clpt_cli.main import app

    data = tmp_path / "data"
    make_learnable_imagefolder(data, n_classes=6)
    root = tmp_path / "run"
    sets = [
        "benchmark.name=imagefolder",
        f"benchmark.root={data}",
        "benchmark.init_classes=2",
        "benchmark.increment=2",
        "benchmark.image_size=32",
        "backbone.name=clpt_vit_micro",
        "train.epochs=2",
        "train.milestones=[2]",
        "train.batch_size=8",
        "system.num_workers=2",
        "align.samples_per_class=16",
    ]
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(root), "--json", *sum((["--set", s] for s in sets), [])])
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["n_tasks"] == 3 and rep["task"] == 2 and rep["last_acc"] > 1 / 6
    man = json.loads((root / "manifest.json").read_text())
    assert man["dataset"] == "imagefolder" and man["counts"] == {"train": 72, "test": 24}
    record = json.loads((root / "backbone.json").read_text())
    assert record["resolved"] == "clpt_vit_micro.builtin" and len(record["sha256"]) == 64
    # a changed image is reported, and nothing is overwritten
    before = (root / "tasks" / "002" / "train.done.json").read_text()
    Image.new("RGB", (36, 36), (9, 9, 9)).save(data / "train" / "class_0" / "0.png")
    res = runner.invoke(app, ["train-task", str(root), "--task", "2", "--force"])
    assert (
        res.exit_code == 4
        and "differs from the run's manifest" in res.stderr
        and "1 files changed" in res.stderr
    )
    assert (root / "tasks" / "002" / "train.done.json").read_text() == before


def test_cifar100_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.utils as tv_utils

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", no_network)
    with pytest.raises(DataError, match="could not be downloaded") as e:
        read_cifar100(tmp_path, download=True)
    assert "cifar-100-python.tar.gz" in e.value.hint


def test_imagenet_a_flat_and_pre_split_layouts(tmp_path):
    from clpt.data.benchmark import load_benchmark
    from clpt.data.readers import read_dataset

    wnids = make_imagenet_r(tmp_path / "flat", n_classes=3, per_class=10, name="imagenet-a")
    a = read_dataset("imagenet-a", str(tmp_path / "flat"), False, 0)
    assert a.name == "imagenet-a" and a.class_names == sorted(wnids)
    assert np.bincount(a.train.labels).tolist() == [8] * 3 and "seed 0" in a.info["split"]
    make_presplit(tmp_path / "pre", "imagenet-a", n_classes=3, train=4, test=2)
    b = read_dataset("imagenet-a", str(tmp_path / "pre"), False, 0)
    assert np.bincount(b.train.labels).tolist() == [4] * 3 and np.bincount(b.test.labels).tolist() == [2] * 3
    assert b.info["split"] == "as distributed" and all("/train/" in p for p in b.train.paths)
    make_presplit(tmp_path / "prer", "imagenet-r", n_classes=2)  # ImageNet-R's pre-split folders too
    assert read_dataset("imagenet-r", str(tmp_path / "prer"), False, 0).info["split"] == "as distributed"
    bench = load_benchmark(
        BenchmarkConfig(name="imagenet-a", root=str(tmp_path / "pre"), init_classes=2, increment=1)
    )
    assert bench.family == "rrc" and bench.n_tasks == 2


def test_a_methods_protocol_sets_normalisation_and_the_training_crop(tmp_path):
    from clpt.data.benchmark import load_benchmark
    from clpt.data.transforms import file_transform

    make_presplit(tmp_path, "imagenet-a", n_classes=2)
    sets = [
        "benchmark.name=imagenet-a",
        f"benchmark.root={tmp_path}",
        "benchmark.init_classes=1",
        "benchmark.increment=1",
    ]
    mist = R.resolve(overrides=["method=ranpac_mist", *sets])
    assert (mist.benchmark.normalization, mist.benchmark.train_crop_scale) == ("none", [0.05, 1.0])
    assert mist.backbone.reset_final_norm is False and mist.mist.batch_size == 56
    bench = load_benchmark(mist.benchmark)
    assert bench.mean == (0.0, 0.0, 0.0) and bench.std == (1.0, 1.0, 1.0)  # pixels in [0, 1]
    rrc = file_transform(
        bench.family, True, 224, bench.train_crop_scale, bench.train_interpolation
    ).transforms[1]
    assert rrc.scale == (0.05, 1.0) and rrc.interpolation.value == "bilinear"
    slca = load_benchmark(R.resolve(overrides=sets).benchmark)
    assert slca.mean == IMAGENET_MEAN and slca.train_crop_scale is None
    # Cars: RanPAC's rows (simplecil, ranpac_frozen) without normalisation, MIST's code with ImageNet's;
    # both with SLCA's Cars transforms (issue 23, item 3)
    cars = R.resolve(overrides=["method=simplecil", "benchmark.name=cars196", "benchmark.root=x"])
    assert cars.benchmark.normalization == "none" and cars.benchmark.train_crop_scale is None
    cars = R.resolve(overrides=["method=simplecil_mist", "benchmark.name=cars196", "benchmark.root=x"])
    assert cars.benchmark.normalization == "imagenet" and cars.benchmark.train_crop_scale is None
    assert R.resolve(overrides=["method=simplecil_mist"]).mist.frozen_quantile == 1.0


def test_presplit_cub_reads_under_its_preset_with_cubs_transforms(tmp_path):
    """`cub_200/{train,val}/<class>/` (the authors' instructions) is CUB, not a generic image folder."""
    from clpt.data.benchmark import load_benchmark
    from clpt.data.readers import read_dataset
    from clpt.data.transforms import file_transform

    rng = np.random.default_rng(0)
    for c in range(3):
        for split, n in (("train", 4), ("val", 2)):
            for i in range(n):
                _image(tmp_path / "cub_200" / split / f"{c + 1:03d}.Bird_{c}" / f"{i}.jpg", rng)
    raw = read_dataset("cub200", str(tmp_path), False, 0)
    assert raw.name == "cub200" and raw.class_names == ["001.Bird_0", "002.Bird_1", "003.Bird_2"]
    assert (
        np.bincount(raw.train.labels).tolist() == [4] * 3 and np.bincount(raw.test.labels).tolist() == [2] * 3
    )
    assert raw.info["split"] == "as distributed"
    bench = load_benchmark(BenchmarkConfig(name="cub200", root=str(tmp_path), init_classes=2, increment=1))
    assert bench.family == "fixed_resize" and bench.mean == IMAGENET_MEAN
    steps = file_transform(bench.family, True, 224).transforms
    assert type(steps[1]).__name__ == "Resize" and steps[1].size == [
        300,
        300,
    ]  # Resize(300) + RandomCrop(224)
    assert type(steps[2]).__name__ == "RandomCrop"


def _authors_cars(root, names, train=3, val=2, seed=0):
    """`cars196/{train,val}/<name>/` and `label_map.txt` beside it, as the authors' split_car.py leaves them."""
    rng = np.random.default_rng(seed)
    for name in names:
        for split, n in (("train", train), ("val", val)):
            for i in range(n):
                _image(root / "cars196" / split / name / f"{i:06d}.jpg", rng)
    (root / "label_map.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))


def test_presplit_cars_with_a_label_map_reads_under_its_preset(tmp_path):
    from clpt.data import readers
    from clpt.data.readers import read_dataset
    from clpt.data.transforms import file_transform

    names = ["Acura_TL_Sedan_2012", "AM_General_Hummer_SUV_2000", "Audi_S4_Sedan_2012"]
    _authors_cars(tmp_path, names)
    raw = read_dataset("cars196", str(tmp_path), False, 0)
    # numbered as ImageFolder numbers the folders (the authors' class order), not as the map lists them
    assert raw.name == "cars196" and raw.class_names == sorted(names)
    assert (
        np.bincount(raw.train.labels).tolist() == [3] * 3 and np.bincount(raw.test.labels).tolist() == [2] * 3
    )
    assert all(
        f"/cars196/val/{raw.class_names[y]}/" in p
        for p, y in zip(raw.test.paths, raw.test.labels, strict=True)
    )
    assert raw.info["label_map"] == str(tmp_path / "label_map.txt") and raw.info["split"] == "as distributed"
    bench = load_benchmark(BenchmarkConfig(name="cars196", root=str(tmp_path), init_classes=2, increment=1))
    assert bench.family == "fixed_resize" and bench.mean == IMAGENET_MEAN  # Cars' own transforms
    steps = file_transform(bench.family, True, 224).transforms
    assert type(steps[1]).__name__ == "Resize" and type(steps[2]).__name__ == "RandomCrop"

    # the sizes of the official test and training sets, swapped: said, and recorded with the split
    import logging

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("clpt").addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(readers, "CARS_OFFICIAL", (6, 9))
            swapped = read_dataset("cars196", str(tmp_path), False, 0)
    finally:
        logging.getLogger("clpt").removeHandler(handler)
    assert any("swapped" in m for m in seen) and "swapped" in swapped.info["split"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda r: (r / "label_map.txt").write_text("1 Acura\n2 Audi\n"),
            r"class folder\(s\) under .* are not in",
        ),
        (lambda r: (r / "label_map.txt").write_text("1 Acura\n2 Audi\n3 BMW\n4 Fiat\n"), "have no folder"),
        (lambda r: (r / "label_map.txt").write_text("1 Acura\nAudi\n3 BMW\n"), "line 2 is not"),
        (lambda r: (r / "label_map.txt").write_bytes(b"\xff\xfe\x00"), "cannot read"),
    ],
)
def test_presplit_cars_label_map_that_disagrees_is_one_clear_error(tmp_path, edit, message):
    from clpt.data.readers import read_dataset

    _authors_cars(tmp_path, ["Acura", "Audi", "BMW"], train=1, val=1)
    edit(tmp_path)
    with pytest.raises(DataError, match=message) as e:
        read_dataset("cars196", str(tmp_path), False, 0)
    assert e.value.hint and "\n" not in str(e.value)


def test_cifar_test_resize_matches_pil_bicubic_within_one_level():
    """The on-device test transform of CIFAR-100 against torchvision's Resize(256) + CenterCrop(224) on PIL."""
    from torchvision.transforms import InterpolationMode, v2

    from clpt.data import transforms as T

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    tv = v2.Compose([v2.Resize(256, interpolation=InterpolationMode.BICUBIC), v2.CenterCrop(224)])
    ref = np.stack([np.asarray(tv(Image.fromarray(im))) for im in a]).astype(np.float64)
    ours = T.resize_center_crop(T.to_float(torch.from_numpy(a)), 256, 224)
    ours = (ours * 255).permute(0, 2, 3, 1).numpy()
    assert ours.shape == ref.shape and np.abs(ours - ref).max() <= 1.0 + 1e-6


def test_a_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    """PIL's convert("RGB") clips 16-bit values at 255 (a white image); clpt scales them to 8 bits, in
    training batches and in the test transform of prediction alike."""
    from clpt.data.transforms import EvalTransform, to_rgb

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
        assert np.asarray(im.convert("RGB")).mean() > 250  # what PIL alone gives
        rgb = np.asarray(to_rgb(im))
    want = np.rint(ramp * (255 / 65535)).astype(np.uint8)
    assert rgb.shape == (32, 32, 3) and (rgb == want[:, :, None]).all()
    t = EvalTransform("builtin", 32, (0.0,) * 3, (1.0,) * 3)
    with Image.open(tmp_path / "g16.png") as im:
        x = t(im)
    assert torch.allclose(x, torch.from_numpy(want).float().div(255)[None].expand(3, -1, -1))
    im8 = Image.fromarray((ramp >> 8).astype(np.uint8))  # an 8-bit greyscale image is unchanged by it
    assert (np.asarray(to_rgb(im8))[:, :, 0] == (ramp >> 8)).all()


def test_a_file_changed_after_the_manifest_check_stops_the_loader(tmp_path):
    """The run checks the dataset against its manifest once per process; the loader then checks each
    file it read against the manifest's size and time, so a file replaced mid-run is not used."""
    import dataclasses

    make_imagefolder(tmp_path)
    cfg = BenchmarkConfig(name="imagefolder", root=str(tmp_path), image_size=16, init_classes=1, increment=1)
    bench = load_benchmark(cfg)
    recorded = M.build_manifest(bench.raw)
    st = M.stamps(bench.raw, recorded)
    split = dataclasses.replace(bench.train, stamps=st["train"])
    assert len(split.stamps) == len(split) == 18
    idx = np.arange(len(split))
    n = sum(len(y) for _, y in batches(bench, split, idx, 4, torch.device("cpu"), train=False))
    assert n == 18
    victim = split.paths[7]
    os.utime(victim, ns=(os.stat(victim).st_atime_ns, os.stat(victim).st_mtime_ns + 10**9))
    with pytest.raises(DataError, match="changed while the run was reading it") as e:
        for _ in batches(bench, split, idx, 4, torch.device("cpu"), train=False):
            pass
    assert os.path.basename(victim) in str(e.value)


class _Payload:  # unpickled by a plain pickle.load, this would call print: a stand-in for any code
    def __reduce__(self):
        return (print, ("a crafted pickle ran code",))


def test_cifar100_pickles_are_read_without_running_code(tmp_path, capsys):
    """issue 23, item 8: the reader admits only the containers and arrays the format has."""
    import pickle

    make_cifar100(tmp_path)
    meta = tmp_path / "cifar-100-python" / "meta"
    meta.write_bytes(pickle.dumps({"fine_label_names": _Payload()}))
    with pytest.raises(DataError, match=r"not a CIFAR-100 python pickle \(it names builtins.print") as e:
        read_cifar100(tmp_path, download=False)
    assert "ran code" not in capsys.readouterr().out and "cifar-100-python.tar.gz" in e.value.hint
    meta.write_bytes(pickle.dumps([1, 2]))  # a pickle of another shape
    with pytest.raises(DataError, match="does not hold the keys fine_label_names"):
        read_cifar100(tmp_path, download=False)
    meta.write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="not a CIFAR-100 python pickle"):
        read_cifar100(tmp_path, download=False)


@pytest.mark.parametrize(
    "row, message",
    [("1 ../../elsewhere.png", "outside CUB_200_2011/images"), ("1 /etc/passwd", "outside CUB_200_2011/images"),
     ("x 001.Bird_1/Bird_1_0.jpg", "line 1")],
)  # fmt: skip
def test_cub_index_files_that_leave_the_root_or_do_not_parse(tmp_path, row, message):
    make_cub(tmp_path, n_classes=2, per_class=2)
    f = tmp_path / "CUB_200_2011" / "images.txt"
    f.write_text("\n".join([row, *f.read_text().splitlines()[1:]]) + "\n")
    with pytest.raises(DataError, match=message):
        read_cub200(tmp_path)


def test_the_full_test_resize_keeps_the_whole_image_in_batches_and_prediction_alike(tmp_path):
    """issue 23, item 4: `benchmark.test_resize: full` is Resize(size) + CenterCrop(size) (RanPAC's CIFAR
    test transform); the default crops Resize(size * 256/224). Batches and the one-image transform of
    prediction agree in both modes."""
    import dataclasses

    from PIL import Image as PILImage

    from clpt.data import transforms as T

    make_cifar100(tmp_path)
    for mode in ("crop", "full"):
        cfg = BenchmarkConfig(name="cifar100", root=str(tmp_path), image_size=48, download=False, test_resize=mode)
        bench = load_benchmark(cfg)
        assert bench.test_resize == mode
        x, _ = next(iter(batches(bench, bench.test, np.arange(2), 2, torch.device("cpu"), train=False)))
        tf = T.EvalTransform.for_family(bench.family, 48, bench.mean, bench.std, mode)
        one = tf(PILImage.fromarray(bench.test.images[0]))
        assert torch.allclose(one, x[0], atol=1e-5)
        assert T.EvalTransform.from_dict(tf.to_dict()) == tf
        if mode == "full":  # the whole image: a 32 px image upsampled to 48, nothing cut away
            img = T.to_float(torch.from_numpy(bench.test.images[:1]))  # (1, 3, 32, 32)
            whole = T.normalize(T.resize_center_crop(img, 48, 48), bench.mean, bench.std)
            assert torch.allclose(whole[0], x[0], atol=1e-5)
    full = dataclasses.replace(bench, test_resize="crop")
    y, _ = next(iter(batches(full, full.test, np.arange(2), 2, torch.device("cpu"), train=False)))
    assert not torch.allclose(x, y)  # the two modes differ
