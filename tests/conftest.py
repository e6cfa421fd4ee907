"""Shared fixtures: an isolated weights cache and one finished tiny run to copy from."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Fast settings for end-to-end runs on the built-in benchmark (5 tasks of 10 classes),
# shared with the bad-input matrix script.
from bad_inputs import TINY  # noqa: E402

# No test may read or write the user's real cache: point CLPT_CACHE_DIR at a
# private folder before anything is imported (subprocesses inherit it).
os.environ["CLPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="clpt-test-cache-")


# Triton kernels run in Triton's interpreter where there is no GPU. The variable is
# read when a kernel module is imported, so it is set here, before any test imports one.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def clpt_cache() -> Path:
    """The private cache, holding a built-in backbone pre-trained for one epoch."""
    from clpt.backbone import builtin_weights_path
    from clpt.pretrain import pretrain_builtin

    path = builtin_weights_path()
    if not path.is_file():
        pretrain_builtin(path, epochs=1)
    return path.parent


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, clpt_cache) -> Path:
    """A complete SLCA run on the built-in benchmark with TINY settings (do not modify: copy it)."""
    from typer.testing import CliRunner

    from clpt_cli.main import app

    root = tmp_path_factory.mktemp("runs") / "slca"
    args = ["run", str(root)]
    for o in TINY:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.stderr + res.stdout
    return root


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


# The fast tier (`pytest -m "not slow"`): unit tests only. A test is slow when it trains
# or pre-trains a backbone end to end: it uses one of these fixtures, or is marked itself.
_END_TO_END = {"clpt_cache", "finished_run", "run_copy", "tiny"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _END_TO_END & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
