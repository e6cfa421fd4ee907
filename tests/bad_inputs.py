"""The bad-input matrix: every way a user (or a disk) can hand clpt something broken.

Each case prepares a workspace (a copy of a finished tiny run, a small image
folder, a read-only or full file system), runs one clpt command, and records
its exit code, whether stderr was exactly one `error: ...` line (no traceback),
and whether the failed command lost anything: a finished stage that is no
longer done, or a file of the run that it changed or removed.

    python tests/bad_inputs.py            # the table, every command in a subprocess
    python tests/bad_inputs.py --kill9 10 # and 10 trials of kill -9 during `clpt run`, resumed

`tests/test_bad_inputs.py` runs the same cases in-process and asserts each.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TINY = [
    "train.epochs=1",
    "train.milestones=[1]",
    "align.epochs=2",
    "align.samples_per_class=32",
    "system.feature_chunk_rows=256",
]


def sets(*overrides: str) -> list[str]:
    out = []
    for o in overrides:
        out += ["--set", o]
    return out


# --- the workspace ------------------------------------------------------------------------


@dataclass
class Workspace:
    """Where a case works: a scratch folder and a finished run to copy."""

    tmp: Path
    finished: Path
    n: int = 0

    def fresh(self, name: str) -> Path:
        self.n += 1
        return self.tmp / f"{self.n:02d}-{name}"

    def run(self, name: str = "run") -> Path:
        dst = self.fresh(name)
        shutil.copytree(self.finished, dst, ignore=shutil.ignore_patterns(".clpt.lock"))
        return dst

    def folder(self, name: str = "images", classes: int = 3, train: int = 4, test: int = 2) -> Path:
        """`train/<class>/*.png`, `test/<class>/*.png`: a small image folder."""
        from PIL import Image

        root = self.fresh(name)
        rng = np.random.default_rng(self.n)
        for split, k in (("train", train), ("test", test)):
            for c in range(classes):
                (root / split / f"class_{c}").mkdir(parents=True)
                for i in range(k):
                    arr = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
                    Image.fromarray(arr).save(root / split / f"class_{c}" / f"{i}.png")
        return root


def folder_run_args(run: Path, folder: Path, *extra: str) -> list[str]:
    return [
        "init",
        str(run),
        *sets(
            "benchmark.name=imagefolder",
            f"benchmark.root={folder}",
            "benchmark.init_classes=2",
            "benchmark.increment=1",
            "backbone.name=clpt_vit_micro",
            *extra,
        ),
    ]


# --- faults of the file system ------------------------------------------------------------


def can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", d], capture_output=True)
        if ok.returncode != 0:
            return False
        subprocess.run(["umount", d], check=True)
    return True


@contextlib.contextmanager
def small_disk(ws: Workspace, size_kb: int):
    """A folder on a tmpfs of `size_kb` KiB (real ENOSPC); unmounted afterwards."""
    mnt = ws.fresh("disk")
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path, leave_kb: int = 0) -> None:
    """Fill the file system holding `folder` to the last byte, then free `leave_kb` KiB."""
    path = folder / "filler"
    with open(path, "wb", buffering=0) as f:
        block = b"\0" * 65536
        with contextlib.suppress(OSError):
            while True:
                f.write(block)
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
    if leave_kb:
        os.truncate(path, max(0, path.stat().st_size - leave_kb * 1024))


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- what a case is -------------------------------------------------------------------------


@dataclass
class Prepared:
    args: list[str]
    run: Path | None = None  # the run whose finished stages and files must survive
    fsize: int | None = None  # RLIMIT_FSIZE for the command (a stand-in for a full disk)
    cleanup: Callable[[], None] | None = None
    after: Callable[[], str | None] | None = None  # a further check; returns a problem or None
    expect_files_changed: set[str] = field(default_factory=set)  # files the failed command may change


@dataclass
class Case:
    name: str
    group: str
    code: int  # the exit code a correct clpt gives
    prepare: Callable[[Workspace], Prepared]
    needs: str | None = None  # "mount": needs a tmpfs (root)
    needle: str = ""  # a word the one-line error must contain


CASES: list[Case] = []


def case(name: str, group: str, code: int, needs: str | None = None, needle: str = ""):
    def register(fn):
        CASES.append(Case(name, group, code, fn, needs, needle))
        return fn

    return register


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# datasets (exit 4 at `clpt init`, naming the file)


@case("empty train class folder", "dataset", 4, needle="class_1")
def _(ws):
    f = ws.folder()
    for p in (f / "train" / "class_1").iterdir():
        p.unlink()
    return Prepared(folder_run_args(ws.fresh("run"), f))


@case("empty test class folder", "dataset", 4, needle="class_2")
def _(ws):
    f = ws.folder()
    for p in (f / "test" / "class_2").iterdir():
        p.unlink()
    return Prepared(folder_run_args(ws.fresh("run"), f))


@case("a class folder with a link to the folder above it (a loop)", "dataset", 4, needle="reached twice")
def _(ws):
    f = ws.folder()
    (f / "train" / "class_0" / "up").symlink_to("..", target_is_directory=True)
    return Prepared(folder_run_args(ws.fresh("run"), f))


@case("a link from one class folder into another's", "dataset", 4, needle="two classes")
def _(ws):
    f = ws.folder()
    (f / "train" / "class_0" / "more").symlink_to("../class_1", target_is_directory=True)
    return Prepared(folder_run_args(ws.fresh("run"), f))


@case("an image over the pixel limit (a decompression bomb; issue 23, item 7)", "dataset", 4,
      needle="max_image_pixels")  # fmt: skip
def _(ws):
    f = ws.folder()
    return Prepared(folder_run_args(ws.fresh("run"), f, "benchmark.max_image_pixels=100"))


@case("a file name that is not UTF-8 (issue 23, item 7)", "dataset", 4, needle="UTF-8")
def _(ws):
    f = ws.folder()
    src = f / "train" / "class_0" / "1.png"
    os.rename(os.fsencode(src), os.path.join(os.fsencode(src.parent), b"caf\xe9.png"))
    return Prepared(folder_run_args(ws.fresh("run"), f))


@case("truncated image", "dataset", 4, needle="1.png")
def _(ws):
    f = ws.folder()
    _truncate(f / "train" / "class_0" / "1.png")
    return Prepared(folder_run_args(ws.fresh("run"), f))


@case("zero-byte image", "dataset", 4, needle="2.png")
def _(ws):
    f = ws.folder()
    (f / "test" / "class_1" / "2.png").write_bytes(b"")
    return Prepared(folder_run_args(ws.fresh("run"), f))


@case("text file named .png", "dataset", 4, needle="notes.png")
def _(ws):
    f = ws.folder()
    (f / "train" / "class_2" / "notes.png").write_text("not an image\n")
    return Prepared(folder_run_args(ws.fresh("run"), f))


# checkpoints (exit 4)


@case("backbone.checkpoint with a wrong-shaped tensor", "checkpoint", 4, needle="pos_embed")
def _(ws):
    import torch

    from clpt.backbone import builtin_weights_path

    sd = torch.load(builtin_weights_path(), map_location="cpu", weights_only=True)
    sd["pos_embed"] = torch.zeros(1, 3, sd["pos_embed"].shape[-1])
    ck = ws.fresh("weights.pth")
    torch.save(sd, ck)
    run = ws.fresh("run")
    args = ["run", str(run), *sets(*TINY, f"backbone.checkpoint={ck}")]
    return Prepared(args)


def _edit_model(ws, edit) -> Prepared:
    import torch

    run = ws.run()
    path = run / "tasks" / "002" / "model.pt"
    obj = torch.load(path, map_location="cpu", weights_only=True)
    edit(obj, path)
    return Prepared(["extract", str(run), "--task", "2", "--force"], run=run)


@case("model.pt with a wrong-shaped tensor", "checkpoint", 4, needle="model.pt")
def _(ws):
    import torch

    def edit(obj, path):
        k = next(k for k in obj["backbone"] if k.endswith("qkv.weight"))
        obj["backbone"][k] = obj["backbone"][k][:-3]
        torch.save(obj, path)

    return _edit_model(ws, edit)


@case("model.pt head sizes disagree with its heads", "checkpoint", 4, needle="model.pt")
def _(ws):
    import torch

    def edit(obj, path):
        obj["head_sizes"] = [s + 1 for s in obj["head_sizes"]]
        torch.save(obj, path)

    return _edit_model(ws, edit)


@case("model.pt replaced by text", "checkpoint", 4, needle="model.pt")
def _(ws):
    return _edit_model(ws, lambda obj, path: path.write_text("this is not a checkpoint\n"))


@case("model.pt replaced by random bytes", "checkpoint", 4, needle="model.pt")
def _(ws):
    return _edit_model(ws, lambda obj, path: path.write_bytes(os.urandom(4096)))


# damaged cache and run files (exit 4, naming the artifact and the command that rebuilds it)


@case("a flipped byte in a feature chunk", "cache", 4, needle="clpt extract")
def _(ws):
    run = ws.run()
    chunk = run / "features.zarr" / "task_004" / "test" / "feats" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[40] ^= 0xFF
    chunk.write_bytes(bytes(data))
    return Prepared(["eval", str(run), "--task", "4", "--force"], run=run)


@case("a deleted feature chunk file (it would read as fill values)", "cache", 4, needle="clpt extract")
def _(ws):
    run = ws.run()
    (run / "features.zarr" / "task_004" / "test" / "feats" / "c" / "0" / "0").unlink()
    return Prepared(["eval", str(run), "--task", "4", "--force"], run=run)


@case("a deleted label chunk file", "cache", 4, needle="clpt extract")
def _(ws):
    run = ws.run()
    (run / "features.zarr" / "task_003" / "train" / "labels" / "c" / "0").unlink()
    return Prepared(["fit-stats", str(run), "--task", "3", "--force"], run=run)


@case("a deleted statistics mean chunk", "cache", 4, needle="clpt fit-stats")
def _(ws):
    run = ws.run()
    (run / "stats.zarr" / "task_002" / "mean" / "c" / "0" / "0").unlink()
    return Prepared(["align", str(run), "--task", "2", "--force"], run=run)


@case("a flipped byte in a statistics chunk, then clpt heads --force (issue 23, item 10)", "cache", 4,
      needle="clpt fit-stats")
def _(ws):
    run = ws.run()
    chunk = run / "stats.zarr" / "task_000" / "m2" / "c" / "3" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    return Prepared(["heads", str(run), "--head", "lda", "--task", "0", "--force"], run=run)


@case("features cut short yet marked done: the fix is a command that fixes it (item 5)", "cache", 4,
      needle="--task 1 --force")  # fmt: skip
def _(ws):
    import zarr

    run = ws.run()
    feats = zarr.open_array(run / "features.zarr" / "task_001" / "test" / "feats", mode="r+")
    feats.attrs["rows_done"] = feats.shape[0] - 10
    return Prepared(["eval", str(run), "--task", "1", "--force"], run=run)


@case("a truncated feature chunk", "cache", 4, needle="clpt extract")
def _(ws):
    run = ws.run()
    _truncate(run / "features.zarr" / "task_003" / "train" / "feats" / "c" / "0" / "0")
    return Prepared(["fit-stats", str(run), "--task", "3", "--force"], run=run)


@case("a feature array's zarr.json garbled", "cache", 4, needle="clpt extract")
def _(ws):
    run = ws.run()
    (run / "features.zarr" / "task_004" / "test" / "feats" / "zarr.json").write_text("{ not json")
    return Prepared(["eval", str(run), "--task", "4", "--force"], run=run)


@case("the feature store's root zarr.json truncated", "cache", 4, needle="clpt extract")
def _(ws):
    run = ws.run()
    _truncate(run / "features.zarr" / "zarr.json")
    return Prepared(["eval", str(run), "--task", "4", "--force"], run=run)


@case("a statistics array's zarr.json emptied", "cache", 4, needle="clpt fit-stats")
def _(ws):
    run = ws.run()
    (run / "stats.zarr" / "task_001" / "mean" / "zarr.json").write_text("")
    return Prepared(["align", str(run), "--task", "1", "--force"], run=run)


@case("a stage marker that is []", "cache", 4, needle="clpt extract")
def _(ws):
    run = ws.run()
    (run / "tasks" / "001" / "extract.done.json").write_text("[]\n")
    return Prepared(["fit-stats", str(run), "--task", "1", "--force"], run=run)


@case("a stage marker that is {}", "cache", 4, needle="clpt train-task")
def _(ws):
    run = ws.run()
    (run / "tasks" / "000" / "train.done.json").write_text("{}\n")
    return Prepared(["extract", str(run), "--task", "0", "--force"], run=run)


@case("a truncated eval.json", "cache", 4, needle="clpt eval")
def _(ws):
    run = ws.run()
    _truncate(run / "tasks" / "004" / "eval.json")
    return Prepared(["eval", str(run), "--task", "4", "--json"], run=run)


@case("a truncated benchmark.json", "cache", 4, needle="benchmark.json")
def _(ws):
    run = ws.run()
    _truncate(run / "benchmark.json")
    return Prepared(["status", str(run)], run=run)


@case("benchmark.json missing fields", "cache", 4, needle="benchmark.json")
def _(ws):
    run = ws.run()
    doc = json.loads((run / "benchmark.json").read_text())
    del doc["tasks"], doc["class_order"]
    (run / "benchmark.json").write_text(json.dumps(doc))
    return Prepared(["run", str(run)], run=run)


@case("the run's config.yaml not UTF-8", "cache", 4, needle="config.yaml")
def _(ws):
    run = ws.run()
    p = run / "config.yaml"
    p.write_bytes(p.read_bytes().replace(b"slca", b"sl\xe9\xff", 1))
    return Prepared(["status", str(run)], run=run)


# the file system (exit 1)


@case("the run folder is a file", "file system", 1, needle="not a folder")
def _(ws):
    path = ws.fresh("file")
    path.write_text("hello\n")
    return Prepared(["run", str(path), *sets(*TINY)])


@case("a read-only run folder", "file system", 1, needs="mount", needle="read-only")
def _(ws):
    run = ws.run()
    shutil.rmtree(run / "tasks" / "004")  # something left to do
    subprocess.run(["mount", "--bind", str(run), str(run)], check=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", str(run)], check=True)

    def cleanup():
        subprocess.run(["umount", "-l", str(run)], check=False)

    def status_still_works():
        from typer.testing import CliRunner

        from clpt_cli.main import app

        res = CliRunner().invoke(app, ["status", str(run), "--json"])
        return None if res.exit_code == 0 else f"status failed on the read-only run: {res.stderr}"

    return Prepared(["run", str(run)], run=run, cleanup=cleanup, after=status_still_works)


def _disk_full_during(ws, stage_dir_to_remove: str, args_of, leave_kb: int = 400) -> Prepared:
    run = ws.run()
    shutil.rmtree(run / "tasks" / stage_dir_to_remove, ignore_errors=True)
    if can_mount():
        cm = small_disk(ws, size_kb=2 * du(run) // 1024 + 8192)
        mnt = cm.__enter__()
        try:
            dst = mnt / "run"
            shutil.copytree(run, dst)
            args = args_of(dst)
            fill(mnt, leave_kb)
        except BaseException:
            cm.__exit__(None, None, None)
            raise
        return Prepared(args, run=dst, cleanup=lambda: cm.__exit__(None, None, None))
    return Prepared(args_of(run), run=run, fsize=64 << 10)


@case("disk full during training", "file system", 1, needle="space")
def _(ws):
    def args(run):
        for p in (run / "tasks" / "004").glob("*"):
            p.unlink()
        return ["train-task", str(run), "--task", "4"]

    return _disk_full_during(ws, "004", args)


@case("disk full during extraction", "file system", 1, needle="space")
def _(ws):
    def args(run):
        shutil.rmtree(run / "features.zarr" / "task_004")
        (run / "tasks" / "004" / "extract.done.json").unlink()
        return ["extract", str(run), "--task", "4"]

    return _disk_full_during(ws, "none", args)


@case("disk full during clpt config --set", "file system", 1, needle="space")
def _(ws):
    before = {}

    def args(run):
        before["text"] = (run / "config.yaml").read_text()
        return ["config", str(run), "--set", "align.epochs=3"]

    prep = _disk_full_during(ws, "none", args, leave_kb=0)
    if prep.fsize is not None:
        prep.fsize = 1024  # smaller than config.yaml

    def unchanged():
        now = (prep.run / "config.yaml").read_text()
        return None if now == before["text"] else "config.yaml changed"

    prep.after = unchanged
    return prep


# image size (exit 0: from the backbone; a size it cannot take: exit 2 at creation)


@case("image folder with the built-in backbone, no image size", "image size", 0)
def _(ws):
    f = ws.folder()
    run = ws.fresh("run")
    return Prepared(
        [
            "run",
            str(run),
            *sets(
                *TINY[:3],
                "benchmark.name=imagefolder",
                f"benchmark.root={f}",
                "benchmark.init_classes=2",
                "benchmark.increment=1",
                "backbone.name=clpt_vit_micro",
                "heads.enabled=[ncm]",
                "system.num_workers=0",
            ),
        ]  # fmt: skip
    )


@case("an image size the backbone cannot take", "image size", 2, needle="image_size")
def _(ws):
    f = ws.folder()
    return Prepared(folder_run_args(ws.fresh("run"), f, "benchmark.image_size=30"))


@case("benchmark.json's task ranges edited by hand (they disagree with config.yaml)", "cache", 4,
      needle="edited by hand")  # fmt: skip
def _(ws):
    run = ws.run()
    p = run / "benchmark.json"
    rec = json.loads(p.read_text())
    rec["tasks"][0][1] += 2
    rec["tasks"][1][0] += 2
    p.write_text(json.dumps(rec))
    return Prepared(["eval", str(run), "--task", "1", "--force"], run=run)


@case("config.yaml's benchmark.init_classes edited by hand", "cache", 4, needle="edited by hand")
def _(ws):
    run = ws.run()
    p = run / "config.yaml"
    p.write_text(p.read_text().replace("  init_classes: 10\n", "  init_classes: 20\n", 1))
    return Prepared(["run", str(run)], run=run)


@case("the run's config.yaml hand-edited to a wrong type", "cache", 2, needle="heads.enabled")
def _(ws):
    run = ws.run()
    p = run / "config.yaml"
    p.write_text(p.read_text().replace("heads:\n  enabled:", "heads:\n  enabled: 7\n  old_enabled:", 1))
    return Prepared(["status", str(run)], run=run)


# re-running the command that created a run


@case("clpt run with the same --set again", "re-run", 0)
def _(ws):
    run = ws.run()
    return Prepared(["run", str(run), *sets(*TINY)], run=run)


@case("clpt run with a different --set", "re-run", 1, needle="train.epochs")
def _(ws):
    run = ws.run()
    return Prepared(["run", str(run), *sets(*TINY[1:], "train.epochs=2")], run=run)


# paths that would break the one-line error


@case("a run path with a newline in it (issue 23, item 11)", "paths", 3, needle="\\n")
def _(ws):
    return Prepared(["status", str(ws.fresh("no\nrun"))])


# --- running a case ---------------------------------------------------------------------------


def snapshot(run: Path | None) -> dict[str, str]:
    if run is None or not run.is_dir():
        return {}
    out = {}
    for p in sorted(run.rglob("*")):
        if p.is_file() and p.name != ".clpt.lock":
            out[str(p.relative_to(run))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def stage_states(run: Path | None) -> dict[str, str]:
    """'stage/task' -> state, read with clpt's own status (empty if the run cannot be opened)."""
    if run is None or not (run / "config.yaml").is_file():
        return {}
    try:
        from clpt.run import open_run, status

        doc = status(open_run(run))
    except Exception:
        return {}
    return {f"{s}/{row['task']}": st["state"] for row in doc["tasks"] for s, st in row["stages"].items()}


@dataclass
class Outcome:
    case: Case
    code: int | None
    one_line: bool
    lost: str  # "-" or what the failed command lost
    error: str  # the error line (or the last stderr line)
    problem: str | None = None  # a further check's finding
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.skipped is None
            and self.code == self.case.code
            and (self.one_line or self.code == 0)
            and self.lost == "-"
            and self.problem is None
            and (self.code == 0 or self.case.needle.lower() in self.error.lower())
        )


def invoke_subprocess(args: list[str], fsize: int | None) -> tuple[int, str]:
    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    p = subprocess.run(
        [sys.executable, "-m", "clpt_cli", *args],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        env={**os.environ, "COLUMNS": "200"},
    )
    return p.returncode, p.stderr


def invoke_inprocess(args: list[str], fsize: int | None) -> tuple[int, str]:
    from typer.testing import CliRunner

    from clpt_cli.main import app

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if fsize is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, hard))
    try:
        res = CliRunner().invoke(app, args)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    stderr = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        import traceback

        stderr += "".join(traceback.format_exception(res.exception))
    return res.exit_code, stderr


def run_case(c: Case, ws: Workspace, invoke=invoke_subprocess) -> Outcome:
    if c.needs == "mount" and not can_mount():
        return Outcome(c, None, False, "-", "", skipped="needs root and tmpfs mounts")
    prep = c.prepare(ws)
    try:
        before_files, before = snapshot(prep.run), stage_states(prep.run)
        code, stderr = invoke(prep.args, prep.fsize)
        lines = [line for line in stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        one_line = len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in stderr
        lost = []
        if code != 0:
            after = stage_states(prep.run)
            # A stage asked to redo (--force) drops its own marker first, which leaves what depends
            # on it stale (still on disk, redone by `clpt run`): that is --force's job. Lost is a
            # finished stage now missing or damaged.
            target = f"{_stage_of(prep.args)}/{_task_of(prep.args)}"
            gone = sorted(
                k
                for k, st in before.items()
                if st == "done" and k != target and after.get(k) not in ("done", "stale")
            )
            if gone:
                lost.append(f"stages no longer done: {', '.join(gone[:3])}")
            after_files = snapshot(prep.run)
            changed = [
                f
                for f, h in before_files.items()
                if after_files.get(f) != h and not f.endswith(".done.json") and f != ".clpt.lock"
            ]
            if changed:
                lost.append(f"files changed: {', '.join(changed[:3])}")
        problem = prep.after() if prep.after else None
        return Outcome(c, code, one_line, "; ".join(lost) or "-", errors[0] if errors else (lines or [""])[-1],
                       problem)  # fmt: skip
    finally:
        if prep.cleanup:
            prep.cleanup()


_STAGE_OF = {
    "train-task": "train",
    "extract": "extract",
    "fit-stats": "stats",
    "align": "align",
    "eval": "eval",
}


def _stage_of(args: list[str]) -> str:
    if args[0] == "heads" and "--head" in args:
        return f"head:{args[args.index('--head') + 1]}"
    return _STAGE_OF.get(args[0], args[0])


def _task_of(args: list[str]) -> str:
    return args[args.index("--task") + 1] if "--task" in args else "?"


def finished_run(tmp: Path) -> Path:
    root = tmp / "finished"
    code, stderr = invoke_subprocess(["run", str(root), *sets(*TINY)], None)
    if code != 0:
        raise SystemExit(f"could not build the finished run:\n{stderr}")
    return root


# --- kill -9 during `clpt run`, then resume ----------------------------------------------------


def kill9_trials(tmp: Path, trials: int, seed: int = 0) -> list[dict]:
    """Kill `clpt run` with SIGKILL at a random moment, re-run it until it finishes; compare results."""
    rng = random.Random(seed)
    ref = tmp / "kill9-reference"
    t0 = time.perf_counter()
    code, err = invoke_subprocess(["run", str(ref), "--json", *sets(*TINY)], None)
    full = time.perf_counter() - t0
    assert code == 0, err
    reference = _result(ref)
    rows = []
    for i in range(trials):
        run = tmp / f"kill9-{i:02d}"
        kills = []
        for _ in range(3):  # up to three kills per trial, each at a random moment of the (remaining) run
            at = rng.uniform(3.0, 0.9 * full)
            p = subprocess.Popen(
                [sys.executable, "-m", "clpt_cli", "run", str(run), *sets(*TINY)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                p.wait(timeout=at)
                break
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
                kills.append(round(at, 1))
        code, err = invoke_subprocess(["run", str(run), *sets(*TINY)], None)
        rows.append({"trial": i, "killed_at_s": kills, "exit": code, "identical": _result(run) == reference})
        shutil.rmtree(run, ignore_errors=True)
    return rows


def _result(run: Path) -> dict:
    out = {}
    for p in sorted((run / "tasks").glob("*/eval.json")):
        doc = json.loads(p.read_text())
        out[p.parent.name] = doc["per_task"]
    for p in sorted((run / "tasks").glob("*/heads/*.json")):
        out[f"{p.parent.parent.name}/{p.stem}"] = json.loads(p.read_text())["per_task"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kill9", type=int, default=0, help="trials of kill -9 during `clpt run`")
    ap.add_argument("--only", default="", help="run the cases whose name contains this text")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="clpt-matrix-") as d:
        tmp = Path(d)
        code, err = invoke_subprocess(["pretrain-builtin"], None)
        if code != 0:
            raise SystemExit(err)
        ws = Workspace(tmp, finished_run(tmp))
        outcomes = []
        for c in CASES:
            if args.only and args.only not in c.name:
                continue
            o = run_case(c, ws)
            outcomes.append(o)
            mark = "skip" if o.skipped else ("ok" if o.ok else "FAIL")
            print(f"{mark:4} {c.group:12} {c.name:55} exit {o.code} (want {c.code})", file=sys.stderr)
        _print_table(outcomes, args.markdown)
        if args.kill9:
            rows = kill9_trials(tmp, args.kill9)
            same = sum(r["identical"] and r["exit"] == 0 for r in rows)
            kills = sum(len(r["killed_at_s"]) for r in rows)
            for r in rows:
                print(json.dumps(r))
            print(
                f"kill -9: {len(rows)} trials, {kills} kills, {same}/{len(rows)} resumed to identical results"
            )


def _print_table(outcomes: list[Outcome], markdown: bool) -> None:
    head = ("group", "case", "exit", "want", "one line", "lost", "error")
    rows = []
    for o in outcomes:
        if o.skipped:
            rows.append((o.case.group, o.case.name, "-", str(o.case.code), "-", "-", f"skipped: {o.skipped}"))
            continue
        rows.append(
            (
                o.case.group,
                o.case.name,
                str(o.code),
                str(o.case.code),
                "yes" if o.one_line else ("n/a" if o.code == 0 else "NO"),
                o.lost + (f"; {o.problem}" if o.problem else ""),
                o.error[:110],
            )
        )
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(x.replace("|", "\\|") for x in r) + " |")
    else:
        for r in rows:
            print("\t".join(r))
    bad = [o for o in outcomes if not o.skipped and not o.ok]
    print(f"{len(outcomes) - len(bad)} of {len(outcomes)} cases as specified" + (
        f"; not: {', '.join(o.case.name for o in bad)}" if bad else ""))  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
