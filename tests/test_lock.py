"""One writer per run folder (clpt.lock): refused at once, read-only commands unaffected, no stale locks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from typer.testing import CliRunner

from clpt_cli.main import app

HOLD = """
import sys, time
from pathlib import Path
from clpt.lock import run_lock
with run_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold(root, seconds: float) -> subprocess.Popen:
    """A process that holds the run's writer lock for `seconds` (as a running `clpt run` would)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_second_writer_is_refused_and_readers_keep_working(run_copy):
    proc = hold(run_copy, 60)
    try:
        for args in (
            ("run", run_copy),
            ("heads", run_copy, "--head", "ncm", "--force"),
            ("config", run_copy, "--set", "align.tau=0.2"),
            ("eval", run_copy, "--task", 4, "--force"),
        ):
            res = cli(*args)
            assert res.exit_code == 1, args
            assert f"is in use by process {proc.pid} (clpt" in res.stderr and "--wait" in res.stderr, args
            assert "Traceback" not in res.stderr
        # read-only commands need no lock
        assert cli("status", run_copy, "--json").exit_code == 0
        res = cli("eval", run_copy, "--task", 4, "--json")
        assert res.exit_code == 0 and json.loads(res.stdout)["task"] == 4
        assert cli("config", run_copy).exit_code == 0
    finally:
        proc.send_signal(signal.SIGKILL)  # a holder killed with -9 leaves no lock behind
        proc.wait()
    res = cli("heads", run_copy, "--head", "ncm", "--force")
    assert res.exit_code == 0, res.stderr


def test_wait_runs_after_the_holder(run_copy):
    proc = hold(run_copy, 1.5)
    t0 = time.perf_counter()
    try:
        res = cli("heads", run_copy, "--head", "lda", "--force", "--wait")
    finally:
        proc.wait()
    assert res.exit_code == 0, res.stderr
    assert time.perf_counter() - t0 > 1.0  # it queued behind the holder


def test_status_shows_the_stage_a_writer_is_on_as_running(tmp_path):
    import json as _json

    from typer.testing import CliRunner

    from clpt.lock import holder, run_lock
    from clpt_cli.main import app

    run = tmp_path / "run"
    assert CliRunner().invoke(app, ["init", str(run)]).exit_code == 0
    assert holder(run) is None
    with run_lock(run):
        assert holder(run) is not None and "process" in holder(run)
        doc = _json.loads(CliRunner().invoke(app, ["status", str(run), "--json"]).stdout)
    assert doc["writer"] and doc["tasks"][0]["stages"]["train"]["state"] == "running"
    states = [v["state"] for r in doc["tasks"] for v in r["stages"].values()]
    assert states.count("running") == 1
    doc = _json.loads(CliRunner().invoke(app, ["status", str(run), "--json"]).stdout)
    assert doc["writer"] is None and doc["tasks"][0]["stages"]["train"]["state"] == "missing"


def test_two_queued_config_edits_both_survive(tmp_path):
    """Each edit reads the config under the lock: the second queued edit sees the first."""
    import subprocess
    import sys
    import time

    from typer.testing import CliRunner

    from clpt.lock import run_lock
    from clpt.run import open_run
    from clpt_cli.main import app

    run = tmp_path / "run"
    assert CliRunner().invoke(app, ["init", str(run)]).exit_code == 0
    cmd = [sys.executable, "-m", "clpt_cli", "config", str(run), "--wait", "--set"]
    with run_lock(run):
        a = subprocess.Popen([*cmd, "align.tau=0.05"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        b = subprocess.Popen([*cmd, "align.epochs=3"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(3)  # both have read the run and wait for the lock
    assert a.wait(60) == 0 and b.wait(60) == 0
    cfg = open_run(run).cfg
    assert cfg.align.tau == 0.05 and cfg.align.epochs == 3


HOLD_AND_FORK = """
import os, sys, time
from pathlib import Path
from clpt.lock import run_lock
with run_lock(Path(sys.argv[1])):
    child = os.fork()  # as a DataLoader worker is forked: it inherits the lock's descriptors
    if child == 0:
        os.write(1, b"child\\n")  # fork() has returned here: the at-fork hook has run (one write: atomic)
        time.sleep(30)
        os._exit(0)
    os.write(1, b"%d\\n" % child)
    time.sleep(30)
"""


def test_a_forked_child_does_not_keep_the_lock_of_a_killed_holder(tmp_path):
    """issue 23: DataLoader workers inherited the lock and kept the run locked ~5 s after `kill -9` of
    their parent. A forked child closes its copies at once."""
    from clpt.lock import holder, run_lock

    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK, str(run)], stdout=subprocess.PIPE, text=True)
    # both lines before the kill: the parent's (the child's pid) and the child's, printed once its fork()
    # has returned, so the at-fork hook has run (under load the child may not be scheduled before the kill)
    lines = sorted(proc.stdout.readline().strip() for _ in range(2))
    assert lines[1] == "child", lines
    child = int(lines[0])
    try:
        assert holder(run) is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert holder(run) is None  # the child lives on, the lock is gone with its holder
        with run_lock(run):
            pass
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_deleting_the_lock_file_under_a_writer_lets_no_second_writer_in(tmp_path):
    from clpt.lock import LOCK_NAME, RunBusyError, run_lock

    run = tmp_path / "run"
    run.mkdir()
    proc = hold(run, 30)
    try:
        (run / LOCK_NAME).unlink()
        try:
            with run_lock(run):
                raise AssertionError("a second writer got in")
        except RunBusyError:
            pass
    finally:
        proc.kill()
        proc.wait()
    with run_lock(run):  # free once the holder is gone
        pass


def test_the_next_writer_removes_temporary_files_a_killed_writer_left(tmp_path):
    from clpt.lock import run_lock

    run = tmp_path / "run"
    (run / "tasks" / "003" / "heads").mkdir(parents=True)
    left = [run / ".config.yaml.k2j4.tmp", run / "tasks" / "003" / ".model.pt.x8.tmp",
            run / "tasks" / "003" / "heads" / ".fecam.safetensors.q1.tmp"]  # fmt: skip
    kept = [run / "config.yaml", run / "tasks" / "003" / "model.pt", run / ".clpt.keep"]
    for p in left + kept:
        p.write_bytes(b"x")
    with run_lock(run):
        assert not any(p.exists() for p in left) and all(p.exists() for p in kept)
