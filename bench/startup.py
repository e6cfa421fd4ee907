"""Start-up: what the commands that only read a run cost against `clpt --help` (issue 23, item 12).

    python bench/startup.py                 # makes a small finished run first (about a minute on 2 cores)
    python bench/startup.py --run RUN       # an existing finished run
    python bench/startup.py --repeats 15

Each command runs as a user runs it: a fresh `clpt` process, with Python's bytecode cache on (as
for an installed package; PYTHONDONTWRITEBYTECODE is dropped for the children) and one warm-up
run first. Printed per command: the median and the fastest of --repeats runs, the median's ratio to
`clpt --help`'s median measured in the same run (the baseline), and the heavy packages the command
imported. Target: `clpt status` within 1.5x of `clpt --help`; `status`, `config` and `eval --json` of
a finished task import none of torch, zarr, timm, safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "zarr", "timm", "safetensors", "torchvision", "triton", "numpy")
# runs the CLI as `clpt` does, then prints which heavy packages it imported (on stderr, last line)
PROBE = (
    "import sys\n"
    "from clpt_cli.main import main\n"
    "try:\n"
    "    main()\n"
    "except SystemExit:\n"
    "    pass\n"
    f"print('IMPORTED ' + ' '.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
)
TINY = ["train.epochs=1", "train.milestones=[1]", "align.epochs=2", "align.samples_per_class=32"]


def env() -> dict:
    e = dict(os.environ)
    e.pop("PYTHONDONTWRITEBYTECODE", None)
    return e


def clpt(*args: str) -> list[str]:
    exe = shutil.which("clpt")
    return [exe, *args] if exe else [sys.executable, "-m", "clpt_cli", *args]


def timed(commands: dict[str, list[str]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each command, `repeats` rounds, every command once a round (so that the machine's
    load drifts alike for all of them), after one warm-up run each (bytecode written, files cached)."""
    out: dict[str, list[float]] = {name: [] for name in commands}
    for args in commands.values():
        res = subprocess.run(clpt(*args), env=env(), capture_output=True)
        if res.returncode != 0:
            sys.exit(f"clpt {' '.join(args)} failed: {res.stderr.decode()[-300:]}")
    for _ in range(repeats):
        for name, args in commands.items():
            start = time.perf_counter()
            subprocess.run(clpt(*args), env=env(), capture_output=True)
            out[name].append(time.perf_counter() - start)
    return out


def imported(args: list[str]) -> list[str]:
    res = subprocess.run([sys.executable, "-c", PROBE, *args], env=env(), capture_output=True, text=True)
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("IMPORTED")][-1]
    return line.split()[1:]


def finished_run(folder: Path) -> Path:
    root = folder / "run"
    args = ["run", str(root)]
    for o in TINY:
        args += ["--set", o]
    print(f"making a finished run: clpt {' '.join(args)}", flush=True)
    subprocess.run(clpt(*args), env=env(), check=True, capture_output=True)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a finished run (default: one made here, then removed)")
    ap.add_argument("--repeats", type=int, default=9)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="clpt-startup-") as tmp:
        run = a.run or finished_run(Path(tmp))
        last = json.loads(subprocess.run(clpt("status", str(run), "--json"), env=env(), capture_output=True,
                                         check=True).stdout)["n_tasks"] - 1  # fmt: skip
        commands = {
            "clpt --help": ["--help"],
            "clpt status RUN": ["status", str(run)],
            "clpt status RUN --json": ["status", str(run), "--json"],
            "clpt config RUN": ["config", str(run)],
            f"clpt eval RUN --task {last} --json": ["eval", str(run), "--task", str(last), "--json"],
        }
        print(f"{sys.platform}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; {a.repeats} runs each")
        print(f"{'command':32s} {'median s':>9s} {'fastest s':>10s} {'x help':>7s}  heavy imports")
        times = timed(commands, a.repeats)
        base = statistics.median(times["clpt --help"])
        for name, args in commands.items():
            med = statistics.median(times[name])
            heavy = imported(args)
            print(f"{name:32s} {med:9.3f} {min(times[name]):10.3f} {med / base:7.2f}  {' '.join(heavy) or '-'}")
        print("target: clpt status RUN within 1.5x of clpt --help")

if __name__ == "__main__":
    main()
