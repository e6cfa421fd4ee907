"""One writer per run folder (clpt.lock): refused at once, read-only commands unaffected, no stale locks."""

from __future__ import annotations

import json
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
