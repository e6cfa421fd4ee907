"""Published numbers, with their source and protocol, to set beside a report's rows.

Each entry is one number of one paper's table: the method (a clpt method or
head), the benchmark, the metric, and the protocol it was measured under, so a
report can flag where ours differs. Sources: docs/methods/slca.md ("Published results")
and docs/methods/heads.md ("Published numbers").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    method: str  # a clpt method name, or "head:NAME"
    benchmark: str
    metric: str  # last_acc | inc_acc | last_acc_task_balanced
    value: float  # percent
    source: str
    backbone: str  # the weights the paper used
    normalization: str  # dataset | imagenet
    split: tuple[int, int]  # (init_classes, increment)
    convention: str  # sample-weighted | task-balanced
    seeds: int
    test_resize: str = "crop"  # benchmark.test_resize of the paper's test transform


_SLCA = "SLCA (ICCV 2023) Table 1 / SLCA++ (arXiv 2408.08295), via docs/methods/slca.md 'Published results'"
_RANPAC = "RanPAC (NeurIPS 2023) Table, via docs/methods/heads.md 'Published numbers'"
_IN21K = "vit_base_patch16_224.augreg_in21k"
# RanPAC's `pretrained_vit_b16_224` is timm 0.6.12's `vit_base_patch16_224`: AugReg on ImageNet-21K,
# fine-tuned on ImageNet-1K (its weight file's name says so)
_IN1K = "vit_base_patch16_224.augreg_in21k_ft_in1k"

# docs/methods/slca.md: ViT-B/16 IN21K, Last-Acc / Inc-Acc, mean over 3 seeds, sample-weighted.
_SLCA_TABLE: dict[str, dict[str, tuple[float, float | None]]] = {
    "seqft": {"cifar100": (41.77, None), "imagenet-r": (26.95, None), "cub200": (40.02, None),
              "cars196": (27.57, None)},
    "seqft_sl": {"cifar100": (88.86, 92.01), "imagenet-r": (71.80, 76.84)},
    "slca": {"cifar100": (91.53, 94.09), "imagenet-r": (77.00, 81.17), "cub200": (84.71, 90.94),
             "cars196": (67.73, 76.93)},
    "slca_pp": {"cifar100": (91.46, 94.20), "imagenet-r": (78.09, 82.95), "cub200": (86.59, 91.63),
                "cars196": (73.97, 79.49)},
}  # fmt: skip
_SLCA_SPLIT = {"cifar100": (10, 10), "imagenet-r": (20, 20), "cub200": (20, 20), "cars196": (20, 20)}
_SLCA_NORM = {"cifar100": "dataset", "imagenet-r": "imagenet", "cub200": "imagenet", "cars196": "imagenet"}

# docs/methods/heads.md: task-balanced final accuracy; IN-21K for CIFAR and Cars, IN-1K otherwise.
_RANPAC_TABLE = {
    "ranpac_mist": None,  # no RanPAC-paper row (MIST's own logs are single-seed, ImageNet-R only)
    "ranpac_frozen": {"cifar100": 89.0, "imagenet-r": 71.8, "imagenet-a": 58.2, "cub200": 88.7, "cars196": 66.0},
    "simplecil": {"cifar100": 83.4, "imagenet-r": 61.2, "imagenet-a": 49.3, "cub200": 85.1, "cars196": 37.7},
}  # fmt: skip
# docs/methods/heads.md, protocol: pixels in [0, 1], no normalisation; splits as docs/methods/slca.md except
# Cars, where RanPAC's args/cars_publish.csv takes 16 classes first, then 9 x 20
_RANPAC_SPLIT = {"cifar100": (10, 10), "imagenet-r": (20, 20), "imagenet-a": (20, 20), "cub200": (20, 20),
                 "cars196": (16, 20)}  # fmt: skip


def _entries() -> list[Published]:
    out = []
    for method, row in _SLCA_TABLE.items():
        for bench, (last, inc) in row.items():
            for metric, value in (("last_acc", last), ("inc_acc", inc)):
                if value is not None:
                    out.append(Published(method, bench, metric, value, source=_SLCA, backbone=_IN21K,
                                         normalization=_SLCA_NORM[bench], split=_SLCA_SPLIT[bench],
                                         convention="sample-weighted", seeds=3))  # fmt: skip
    for method, ranpac_row in _RANPAC_TABLE.items():
        for bench, value in (ranpac_row or {}).items():
            out.append(
                Published(
                    method,
                    bench,
                    "last_acc_task_balanced",
                    value,
                    source=_RANPAC,
                    backbone=_IN21K if bench in ("cifar100", "cars196") else _IN1K,
                    normalization="none",
                    split=_RANPAC_SPLIT[bench],
                    convention="task-balanced",
                    seeds=1,
                    test_resize="full" if bench == "cifar100" else "crop",  # RanPAC: Resize(224) on CIFAR
                )  # fmt: skip
            )
    return out


TABLE: list[Published] = _entries()


def lookup(method: str, benchmark: str) -> list[Published]:
    """The published numbers for a method (or 'head:NAME') on a benchmark."""
    return [p for p in TABLE if p.method == method and p.benchmark == benchmark]


def protocol_flags(p: Published, ours: dict) -> list[str]:
    """Where our runs' protocol differs from the paper's: each a short phrase."""
    flags = []
    if ours.get("backbone") and ours["backbone"] != p.backbone:
        flags.append(f"backbone {ours['backbone']} (paper: {p.backbone})")
    if ours.get("normalization") and ours["normalization"] != p.normalization:
        flags.append(f"normalisation {ours['normalization']} (paper: {p.normalization})")
    if ours.get("split") and tuple(ours["split"]) != p.split:
        flags.append(f"split {ours['split'][0]}+{ours['split'][1]} (paper: {p.split[0]}+{p.split[1]})")
    if ours.get("test_resize") and ours["test_resize"] != p.test_resize:
        flags.append(f"test resize {ours['test_resize']} (paper: {p.test_resize})")
    if ours.get("seeds") is not None and ours["seeds"] != p.seeds:
        flags.append(f"{ours['seeds']} seed(s) (paper: {p.seeds})")
    return flags
