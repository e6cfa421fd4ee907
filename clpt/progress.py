"""Progress you can watch, on stderr only: rich bars on a terminal, plain periodic lines otherwise.

    with progress.bar("task 3 train, epoch 2/20", total=n_images, unit="img") as bar:
        for x, y in loader:
            ...
            bar.advance(len(y))

On a terminal: a rich progress bar with images per second and time left. When
stderr is not a terminal (a log file, a batch job): one plain line at most every
`PLAIN_EVERY_S` seconds and one at the end. `--quiet` (or any rank but 0 under
torchrun) shows nothing. stdout is never written, so `--json` output stays one
JSON document.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from clpt import distributed as dist

PLAIN_EVERY_S = 30.0

_enabled = True
_console = None


def configure(enabled: bool, console=None) -> None:
    """Called by the CLI: whether to show progress, and the stderr console rich draws on."""
    global _enabled, _console
    _enabled = enabled and dist.is_main()
    _console = console


class _Null:
    def advance(self, n: int = 1) -> None:
        pass


class _Plain:
    def __init__(self, what: str, total: int, unit: str):
        self.what, self.total, self.unit = what, total, unit
        self.done, self.t0, self.last = 0, time.perf_counter(), time.perf_counter()
        self.shown = -1  # `done` when the last line was printed

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= PLAIN_EVERY_S:
            self.last = now
            self.line(now)

    def line(self, now: float) -> None:
        if self.shown == self.done:
            return
        self.shown = self.done
        rate = self.done / max(now - self.t0, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 and self.total else 0.0
        print(f"{self.what}: {self.done}/{self.total} {self.unit} ({rate:.0f} {self.unit}/s, {left:.0f} s left)",
              file=sys.stderr, flush=True)  # fmt: skip


class _Rich:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)


def _is_terminal() -> bool:
    if _console is not None:
        return bool(_console.is_terminal)
    return sys.stderr.isatty()


@contextlib.contextmanager
def bar(what: str, total: int, unit: str = "img") -> Iterator[_Null | _Plain | _Rich]:
    """A progress display for `total` units of work, on stderr; an empty `what` shows none."""
    if not _enabled or total <= 0 or not what:
        yield _Null()
        return
    if not _is_terminal():
        p = _Plain(what, total, unit)
        yield p
        if time.perf_counter() - p.t0 >= PLAIN_EVERY_S:
            p.line(time.perf_counter())  # a closing line for anything long enough to have had one
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    class Rate(TextColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return f"{speed:.0f} {unit}/s" if speed else ""

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(""),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=_console, transient=True) as progress:
        yield _Rich(progress, progress.add_task(what, total=total))
