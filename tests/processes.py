"""Killing a command mid-write: the helper of the tests that check a SIGKILL leaves nothing taken for finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import zarr


def kill_mid_write(
    args: list[str], feats: Path, chunk_rows: int | None = None, timeout: float = 120
) -> int | None:
    """Run `python -m clpt_cli ARGS`, SIGKILL it once the feature array `feats` has committed some of its rows
    but not all (and, with `chunk_rows`, once it is the array of that chunk height); the committed rows then."""
    proc = subprocess.Popen([sys.executable, "-m", "clpt_cli", *map(str, args)], env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                arr = zarr.open_array(feats, mode="r")
                done = int(arr.attrs.get("rows_done", 0))
                if (chunk_rows is None or arr.chunks[0] == chunk_rows) and 0 < done < arr.shape[0]:
                    proc.send_signal(signal.SIGKILL)
                    return done
            except (FileNotFoundError, KeyError, ValueError, zarr.errors.BaseZarrError):
                pass
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    return None
