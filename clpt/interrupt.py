"""Ctrl-C, remembered: so that its side effects are reported as the interruption they are.

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

_received = False


def _on_sigint(signum, frame) -> None:
    global _received
    _received = True
    raise KeyboardInterrupt


def received() -> bool:
    """Whether SIGINT arrived during the innermost `watch()`."""
    return _received


@contextlib.contextmanager
def watch() -> Iterator[None]:
    """Raise KeyboardInterrupt on SIGINT (as Python does) and remember that it came."""
    global _received
    _received = False
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
