"""Ctrl-C and SIGTERM, remembered: so that their side effects are reported as the interruption they are.

A Ctrl-C reaches every process of the terminal's process group. The main
process gets `KeyboardInterrupt`, but it may first see a consequence of the same
signal instead: a DataLoader worker that died of it ("worker exited
unexpectedly"), or a collective whose peer was interrupted. `watch()` records
that SIGINT arrived, so the CLI reports all of these as the interruption (exit
130), not as an unexpected error.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_received: int = 0  # the signal that arrived (0: none)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, Slurm's time limit, a scheduler's preemption): handled as Ctrl-C is, so the
    same cleanup runs, and reported with its own exit code (143)."""


def _on_signal(signum, frame) -> None:
    global _received
    _received = signum
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def received() -> int:
    """The signal (SIGINT or SIGTERM) that arrived during the innermost `watch()`, or 0."""
    return _received


@contextlib.contextmanager
def watch() -> Iterator[None]:
    """Raise KeyboardInterrupt on SIGINT (as Python does), `Terminated` on SIGTERM, and remember which came."""
    global _received
    _received = 0
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
