"""The package's layering: no import cycle, a config that imports no torch, registries that take extensions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import import_graph  # noqa: E402


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_no_module_is_part_of_an_import_cycle_even_through_imports_inside_functions():
    graph = import_graph.edges()
    assert len(graph) > 100  # the walk found the package's imports
    assert import_graph.cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    assert import_graph.cycles(
        {("a", "b"): False, ("b", "c"): True, ("c", "a"): True, ("c", "d"): False}
    ) == [["a", "b", "c"]]


def test_every_module_imports_first_alone():
    """Each module imported first, by itself, with no module of the package loaded before it: a
    module-level cycle fails on a partly initialised module. One interpreter, the package's modules
    dropped from sys.modules before each import (third-party modules stay loaded: that keeps it fast)."""
    names = sorted(n for n in import_graph.modules() if not n.endswith("__main__"))
    code = (
        "import importlib, sys, warnings\n"
        "warnings.simplefilter('ignore')\n"
        f"names = {names!r}\n"
        "ours = ('clpt', 'clpt_kernels', 'clpt_cli')\n"
        "bad = []\n"
        "for n in names:\n"
        "    for m in [m for m in sys.modules if m.split('.')[0] in ours]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except Exception as e:\n"
        "        bad.append((n, f'{type(e).__name__}: {e}'))\n"
        "print(bad)\n"
    )
    assert _python(code).strip() == "[]"


def test_config_imports_without_torch_and_builds_its_defaults():
    out = _python(
        "import sys, json, clpt.config as C\n"
        "cfg = C.RunConfig()\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'problems': cfg.problems(),"
        " 'method': cfg.method}))"
    )
    doc = json.loads(out)
    assert doc == {"torch": False, "problems": [], "method": "slca"}


def test_resolving_a_config_and_every_registry_import_no_numerical_package():
    """issue 23, item 12: the registries name their code lazily, so resolving a run's config (presets, every
    head's, drift method's and reader's settings) and the run machinery load none of torch, zarr, timm, numpy."""
    out = _python(
        "import sys, json\n"
        "import clpt.run\n"
        "from clpt.stages.resolve import resolve\n"
        "from clpt.heads import HEADS\n"
        "from clpt.drift_methods import DRIFT_METHODS\n"
        "from clpt.data.registry import READERS\n"
        "cfg = resolve(None, ['method=slca_pp', 'drift.method=linear', 'benchmark.name=imagenet-r',"
        " 'benchmark.root=/nowhere'])\n"
        "heavy = [m for m in ('torch', 'zarr', 'timm', 'numpy', 'safetensors') if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'heads': len(HEADS.names()), 'drift': len(DRIFT_METHODS.names()),"
        " 'readers': len(READERS.names()), 'shrink1': cfg.heads.of('fecam').shrink1}))"
    )
    doc = json.loads(out)
    assert doc == {"heavy": [], "heads": 6, "drift": 5, "readers": 8, "shrink1": 10.0}  # imagenet-r's preset


def test_a_lazily_registered_head_fits_and_restores_through_its_module():
    import torch

    from clpt.config import RunConfig
    from clpt.heads import HEADS, InMemoryCache, restore_state
    from clpt.heads.ncm import CosineScores

    spec = HEADS.get("ncm")
    assert spec.state_class() is CosineScores and HEADS.get("ca").state_class().__name__ == "TaskHeadScores"
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 8, generator=g), torch.arange(40) % 4
    state = spec.fit(InMemoryCache(x, y, [[0, 4]], 0, RunConfig()), spec.config_cls())
    again = restore_state("ncm", state.tensors(), state.meta())
    assert torch.equal(again(x), state(x))


def test_each_section_checks_its_own_fields():
    from clpt import config as C

    train = C.TrainConfig(epochs=0, lr=-1.0, milestones=[3])
    assert train.problems() == [
        "epochs: must be >= 1",
        "lr: must be > 0",
        "milestones: [3] must be increasing epochs in 1..0",
    ]
    assert C.SystemConfig(device="tpu").problems() == ["device: 'tpu' is not one of auto, cpu, cuda, cuda:N"]
    cfg = C.RunConfig()
    cfg.align.tau = 0.0
    cfg.lora.targets = ["ffn"]
    assert cfg.problems() == ["lora.targets: ['ffn'] not among: qkv, mlp", "align.tau: must be > 0"]


def test_library_messages_carry_the_stage_and_the_wiring_writes_the_command(tmp_path):
    from clpt import artifacts
    from clpt.errors import MissingInputError
    from clpt.stages import explain

    with pytest.raises(MissingInputError) as e:
        artifacts.open_features(tmp_path, 2, "train")
    assert e.value.redo is not None and e.value.redo.stage == "extract" and e.value.redo.task == 2
    assert "clpt" not in (e.value.hint or "")  # the library names no command ...
    line = explain(e.value).one_line()  # ... the stage graph writes it from the stage's declaration
    assert line.endswith(f"fix: run `clpt extract {tmp_path} --task 2`")


def test_no_library_module_writes_a_stage_command_into_a_message():
    """Stage commands are declared once (clpt.stages.graph); library and storage code name stages instead."""
    from clpt.stages import TASK_STAGES

    verbs = {TASK_STAGES.get(s).command.split()[1] for s in TASK_STAGES.names()} | {"heads"}
    wiring = {"stages/graph.py", "run.py"}
    found = []
    for path in sorted((ROOT / "clpt").rglob("*.py")):
        rel = path.relative_to(ROOT / "clpt").as_posix()
        if rel in wiring:
            continue
        text = path.read_text()
        # a command with a run filled in: `clpt VERB {root} ...` in an f-string
        found += [f"{rel}: clpt {v}" for v in verbs if re.search(rf"clpt {v} \{{", text)]
    assert found == []


def test_a_learner_a_reader_and_a_stage_are_registrations(tmp_path):
    """What the README promises a newcomer: each extension point is a registry that names the valid choices."""
    from clpt.data.registry import READERS
    from clpt.heads import HEADS
    from clpt.learners import LEARNERS
    from clpt.methods import METHODS
    from clpt.stages import TASK_STAGES

    assert {"slow_learner", "mist", "none"} <= set(LEARNERS.names())
    assert {
        "builtin",
        "cifar100",
        "imagenet-r",
        "imagenet-a",
        "cub200",
        "cars196",
        "imagefolder",
        "stream",
    } == set(READERS.names())
    assert list(TASK_STAGES.names()) == ["train", "extract", "stats", "align", "eval", "pairs", "drift"]
    assert {"ca", "linear", "ncm", "lda", "fecam", "ranpac"} <= set(HEADS.names())
    assert all(METHODS.get(m).learner in LEARNERS for m in METHODS.names())
    with pytest.raises(ValueError, match="unknown learner 'nope'; valid: slow_learner"):
        LEARNERS.get("nope")


def test_the_stage_graph_takes_a_learner_s_config_keys_from_its_registration():
    from clpt.stages import get_stage
    from clpt.stages import resolve as R

    keys = get_stage("train").config_keys
    assert "mist" in keys(R.resolve(overrides=["method=ranpac_mist"]))
    assert "mist" not in keys(R.resolve())


def test_file_batches_leave_the_global_rng_alone_and_augment_alike_with_any_worker_count(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from clpt.data.benchmark import Benchmark, Split
    from clpt.data.loader import batches

    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    split = Split(labels=np.arange(6) % 2, paths=paths)
    bench = Benchmark("imagefolder", ["a", "b"], np.arange(2), [range(0, 2)], split, split, 32, family="rrc")

    def epoch(workers: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(7)
        loader = batches(bench, split, np.arange(6), 4, torch.device("cpu"), train=True, generator=gen,
                         num_workers=workers)  # fmt: skip
        return torch.cat([x for x, _ in loader])

    torch.manual_seed(123)
    before = torch.get_rng_state()
    alone = epoch(0)
    assert torch.equal(torch.get_rng_state(), before)  # iterating did not touch the global RNG
    assert torch.equal(epoch(0), alone)  # the loader's generator alone decides
    assert torch.equal(epoch(2), alone)  # and the same with worker processes


def test_reading_a_finished_run_imports_neither_torch_zarr_nor_timm(run_copy):
    """issue 23, item 12: `status`, `config` and `eval --json` of a finished task read JSON only (their speed
    against `clpt --help`: bench/startup.py)."""
    probe = (
        "import sys\n"
        "from clpt_cli.main import main\n"
        "sys.argv = ['clpt'] + sys.argv[1:]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print('HEAVY', [m for m in ('torch', 'zarr', 'timm', 'safetensors') if m in sys.modules], code,"
        " file=sys.stderr)\n"
    )
    for args in (["status", run_copy], ["status", run_copy, "--json"], ["config", run_copy],
                 ["eval", run_copy, "--task", "4", "--json"]):  # fmt: skip
        out = subprocess.run([sys.executable, "-c", probe, *map(str, args)], capture_output=True, text=True,
                             timeout=300)  # fmt: skip
        assert out.stderr.strip().splitlines()[-1] == "HEAVY [] 0", (args, out.stderr[-500:])
        assert out.stdout.strip()
    done = subprocess.run([sys.executable, "-c", probe, "eval", str(run_copy), "--task", "4", "--force",
                           "--json"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert "'torch'" in done.stderr.splitlines()[-1]  # the probe sees work when there is work
