"""Golden numbers: the built-in demo configuration's accuracy matrices, pinned for the build they came from.

`clpt run` with the demo's settings (the built-in benchmark and its preset, the
fully pre-trained built-in backbone) is deterministic for one torch build, thread
count and CPU, so every figure of the method's and each head's accuracy matrix
is compared exactly: a change that moves any figure is noticed, not only one
that lowers accuracy. On another build (BLAS kernels sum in other orders and
training amplifies the last bits) the test says which build the figures hold
for and checks the invariants instead.

Regenerate after an intended change of the figures, on the recorded machine:
`CLPT_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py`.
"""

from __future__ import annotations

import json
import os
import platform
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

GOLDEN = Path(__file__).parent / "golden" / "builtin_demo.json"


def build() -> dict:
    """What the figures depend on: torch build, thread count, CPU and the instruction set torch's CPU
    kernels use (two 'AMD EPYC' machines, one with AVX-512 and one without, give other figures)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu,
            "capability": torch.backends.cpu.get_cpu_capability()}  # fmt: skip


def matrices(report: dict) -> dict:
    out = {"slca": report["acc_matrix"]}
    out.update({name: h["acc_matrix"] for name, h in report["heads"].items()})
    return out


def _dump(where: dict, got: dict) -> str:
    """The golden file: one matrix row a line."""
    blocks = [
        f'  "{name}": [\n' + ",\n".join(f"   {json.dumps(row)}" for row in m) + "\n  ]"
        for name, m in got.items()
    ]
    return '{\n "build": ' + json.dumps(where) + ',\n "acc_matrix": {\n' + ",\n".join(blocks) + "\n }\n}\n"


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory) -> dict:
    """`clpt run` on the demo's settings, with a built-in backbone pre-trained as the demo does (full length)."""
    from clpt_cli.main import app

    cache = tmp_path_factory.mktemp("demo-cache")
    old = os.environ.get("CLPT_CACHE_DIR")
    os.environ["CLPT_CACHE_DIR"] = str(cache)
    try:
        root = tmp_path_factory.mktemp("demo") / "run"
        res = CliRunner().invoke(app, ["--quiet", "run", str(root), "--json"])
        assert res.exit_code == 0, res.stderr + res.stdout
        return json.loads(res.stdout)
    finally:
        if old is None:
            del os.environ["CLPT_CACHE_DIR"]
        else:
            os.environ["CLPT_CACHE_DIR"] = old


@pytest.mark.slow
def test_demo_figures_are_those_pinned_for_this_build(demo_report):
    got = matrices(demo_report)
    # invariants, on every build
    assert set(got) == {"slca", "ca", "linear", "ncm", "lda", "fecam", "ranpac"}
    for name, m in got.items():
        assert [len(row) for row in m] == [1, 2, 3, 4, 5], name  # lower-triangular: 5 tasks
        assert all(0.0 <= v <= 1.0 for row in m for v in row), name
    assert got["slca"] == got["ca"]  # SLCA's own classifier is the aligned heads
    assert demo_report["last_acc"] > 0.6  # far above chance (0.02) on this benchmark
    if os.environ.get("CLPT_WRITE_GOLDEN"):
        GOLDEN.write_text(_dump(build(), got))
    pinned = json.loads(GOLDEN.read_text())
    if pinned["build"] != build():
        warnings.warn(
            f"golden figures hold for {pinned['build']}, this is {build()}: invariants checked only",
            stacklevel=1,
        )
        return
    from clpt.units import machine

    for name, m in pinned["acc_matrix"].items():  # `--json` gives 6 significant digits (clpt.units)
        assert got[name] == machine(m), f"{name}: the accuracy matrix moved (pinned for {pinned['build']})"
