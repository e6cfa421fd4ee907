from pathlib import Path

import pytest

from clpt import config as C
from clpt.errors import ConfigError
from clpt.stages import resolve as R


def test_defaults_are_the_published_settings():
    cfg = R.resolve(overrides=["benchmark.name=cifar100", "benchmark.root=/data"])
    assert (cfg.train.epochs, cfg.train.milestones, cfg.train.batch_size) == (20, [18], 128)
    assert (cfg.train.lr, cfg.train.backbone_lr_scale, cfg.train.momentum, cfg.train.weight_decay) == (
        0.01,
        0.01,
        0.9,
        5e-4,
    )
    assert cfg.backbone.name == "vit_base_patch16_224.augreg_in21k" and cfg.backbone.reset_final_norm
    assert (cfg.align.epochs, cfg.align.lr, cfg.align.samples_per_class, cfg.align.tau) == (5, 0.01, 256, 0.1)
    assert cfg.align_enabled and cfg.align_weight_decay == 5e-4 and cfg.stats.ridge == 1e-4
    assert cfg.benchmark.seed == 1993
    cars = R.resolve(overrides=["benchmark.name=cars196", "benchmark.root=/d"])
    assert (cars.train.epochs, cars.train.milestones, cars.align.tau) == (50, [40], 0.05)
    assert (cars.benchmark.init_classes, cars.benchmark.increment) == (20, 20)


@pytest.mark.parametrize(
    "method,scale,align",
    [("slca", 0.01, True), ("seqft", 1.0, False), ("seqft_sl", 0.01, False), ("frozen_ca", 0.0, True)],
)
def test_method_presets(method, scale, align):
    cfg = R.resolve(overrides=[f"method={method}"])
    assert cfg.train.backbone_lr_scale == scale and cfg.align_enabled is align


def test_file_then_overrides_take_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("method: seqft\ntrain:\n  lr: 0.05\n  epochs: 3\n  milestones: [2]\n")
    cfg = R.resolve(y, ["train.lr=0.02"])
    assert cfg.method == "seqft" and cfg.train.lr == 0.02 and cfg.train.epochs == 3
    assert cfg.train.backbone_lr_scale == 1.0  # method preset, not overridden
    t = tmp_path / "c.toml"
    t.write_text('method = "frozen_ca"\n[train]\nepochs = 2\nmilestones = [1]\n')
    cfg = R.resolve(t)
    assert cfg.method == "frozen_ca" and cfg.train.epochs == 2 and cfg.train.backbone_lr_scale == 0.0


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        R.resolve(
            overrides=[
                "train.lrr=1",
                "train.epochs=x",
                "method=foo",
                "align.tau=-1",
                "bogus.key=1",
                "train.milestones=[50]",
            ]
        )
    probs = "\n".join(e.value.problems)
    for needle in (
        "train.lrr: unknown key",
        "train.epochs: expected an integer",
        "method: 'foo' is not one of",
        "align.tau: must be > 0",
        "bogus: unknown key",
    ):
        assert needle in probs
    assert len(e.value.problems) == 5
    assert "fix:" in e.value.one_line() and "\n" not in e.value.one_line()


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        R.resolve(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        R.resolve(bad)
    with pytest.raises(ConfigError, match="section.key=value"):
        R.resolve(overrides=["train.lr"])


def test_real_benchmarks_need_a_root():
    with pytest.raises(ConfigError, match="benchmark.root: required"):
        R.resolve(overrides=["benchmark.name=cub200"])


def test_resolved_config_round_trips(tmp_path):
    cfg = R.resolve(overrides=["method=seqft_sl", "train.epochs=7", "train.milestones=[3,6]"])
    p = tmp_path / "config.yaml"
    p.write_text(C.dump_yaml(cfg))
    assert R.load_resolved(p) == cfg


CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_are_shipped_for_every_benchmark_and_method():
    names = {p.stem for p in CONFIGS}
    for bench in ("cifar100", "imagenet-r", "cub200", "cars196"):
        for method in ("seqft", "slca", "slca_pp"):
            assert f"{bench}_{method}" in names
    for bench in (
        "cifar100",
        "imagenet-r",
        "imagenet-a",
        "cub200",
        "cars196",
    ):  # docs/methods/heads.md's protocol
        for method in ("simplecil", "simplecil_mist", "ranpac_frozen", "ranpac_mist"):
            assert f"{bench}_{method}" in names
    for bench in ("imagenet-r", "imagenet-a", "cub200"):  # RanPAC's published rows' backbone there
        for method in ("simplecil", "ranpac_frozen"):
            assert f"{bench}_{method}_in21k_ft_in1k" in names
    for bench in (
        "cifar100",
        "imagenet-r",
        "cub200",
        "cars196",
    ):  # docs/methods/drift.md: SLCA(++) with compensation
        for method in ("slca", "slca_pp"):
            assert f"{bench}_{method}_drift" in names
        for method in ("sldc", "sldc_kd"):  # SLDC's own recipe, alpha and beta
            assert f"{bench}_{method}" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_is_valid_and_equals_the_presets(path):
    cfg = R.resolve(path)
    preset = R.resolve(
        overrides=[
            f"benchmark.name={cfg.benchmark.name}",
            f"benchmark.root={cfg.benchmark.root}",
            f"method={cfg.method}",
            *MOCOV3.get((path.stem.endswith("_mocov3"), cfg.method), []),
            *(["drift.method=linear"] if path.stem.endswith("_drift") else []),
            *([f"backbone.name={IN21K_FT_IN1K}"] if path.stem.endswith("_in21k_ft_in1k") else []),
        ]
    )
    assert cfg == preset  # the file spells out exactly the published defaults


IN21K_FT_IN1K = "vit_base_patch16_224.augreg_in21k_ft_in1k"  # RanPAC's rows for ImageNet-R, ImageNet-A, CUB


# The papers' MoCo v3 setting: 90 epochs, SLCA milestone 80, SLCA++ milestones [60, 80] (multistep).
_MOCO = ["backbone.name=vit_base_patch16_224", "backbone.checkpoint=checkpoints/mocov3-vit-base-300ep.pth",
         "train.epochs=90"]  # fmt: skip
MOCOV3 = {
    (True, "slca"): [*_MOCO, "train.milestones=[80]"],
    (True, "slca_pp"): [*_MOCO, "train.milestones=[60,80]", "train.schedule=multistep"],
}


def test_mocov3_configs_for_the_four_benchmarks():
    names = {p.stem for p in CONFIGS}
    for bench in ("cifar100", "imagenet-r", "cub200", "cars196"):
        for method in ("slca", "slca_pp"):
            assert f"{bench}_{method}_mocov3" in names


def test_slca_pp_published_settings_per_benchmark():
    def pp(bench):
        return R.resolve(overrides=["method=slca_pp", f"benchmark.name={bench}", "benchmark.root=/d"])

    for bench, wd, ab in (
        ("cifar100", 5e-4, (1.0, 0.1)),
        ("cub200", 5e-4, (1.0, 0.1)),
        ("imagenet-r", 0.0, (0.5, 0.5)),
        ("cars196", 0.0, (0.5, 0.5)),
    ):
        cfg = pp(bench)
        assert cfg.train.weight_decay == wd and (cfg.train.sce_alpha, cfg.train.sce_beta) == ab
        assert cfg.align_weight_decay == wd
        assert cfg.lora.targets == ["qkv"] and (cfg.lora.rank, cfg.lora.scale) == (4, 0.8)
        assert cfg.train.trainable == C.Trainable.peft and cfg.train.schedule == C.Schedule.cosine
        assert not cfg.align.mean_shrink and cfg.align.sample_scale and cfg.align.head_scale
    assert pp("cars196").align.tau == 0.05


def test_a_saved_config_without_a_newer_section_takes_the_presets(tmp_path):
    cfg = R.resolve(overrides=["train.epochs=2", "train.milestones=[2]"])
    saved = C.to_dict(cfg)
    assert R.load_resolved(_write(tmp_path / "full.yaml", saved)) == cfg  # a full file reads back unchanged
    del saved["heads"]  # as written by a clpt without classifier heads
    old = R.load_resolved(_write(tmp_path / "old.yaml", saved))
    assert (
        old.heads.of("ranpac").dim == 2048 and old.train.epochs == 2
    )  # the built-in preset, the file's values


def _write(path, doc):
    import yaml

    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lr=1e400", "train.lr: must be a finite number"),
        ("train.lr=.inf", "train.lr: must be a finite number"),
        ("heads.fecam.shrink1=.nan", "heads.fecam.shrink1: must be a finite number"),
        ("heads.ranpac.lambdas=[.nan]", "heads.ranpac.lambdas[0]: must be a finite number"),
        ("lora.scale=.nan", "lora.scale: must be a finite number"),
        ("benchmark.seed=-1", "benchmark.seed: must be in [0, 2**32 - 1]"),
        ("seed=1099511627776", "seed: must be in [0, 2**32 - 1]"),
    ],
)
def test_non_finite_numbers_and_seeds_out_of_range_are_config_errors(override, message):
    with pytest.raises(ConfigError) as e:
        R.resolve(overrides=[override])
    assert any(p.startswith(message) for p in e.value.problems), e.value.problems
    assert e.value.exit_code == 2


def test_files_are_written_with_the_mode_a_plain_open_gives(tmp_path):
    import os
    import stat

    from clpt.io import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


def test_epochs_alone_scale_milestones_that_would_not_fit():
    """issue 23, item 17: `--set train.epochs=2` alone failed on the preset's milestone at epoch 5."""
    import logging

    from clpt.stages import resolve as R

    base = R.resolve(overrides=[])
    assert base.train.epochs == 6 and base.train.milestones == [5]
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("clpt")  # a CLI test may have set it not to propagate to caplog
    logger.addHandler(handler)
    try:
        cfg = R.resolve(overrides=["train.epochs=2"])
    finally:
        logger.removeHandler(handler)
    assert cfg.train.milestones == [2] and any("scaled to [2]" in m for m in seen)
    assert R.resolve(overrides=["train.epochs=12"]).train.milestones == [5]  # still fits: kept as given
    assert R.resolve(overrides=["train.epochs=2", "train.milestones=[1]"]).train.milestones == [1]
