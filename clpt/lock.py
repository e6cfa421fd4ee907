"""One writer per run folder: an OS-level lock on `RUN/.clpt.lock` that dies with its holder.

A command that writes to a run folder holds an exclusive `flock` on the lock
file for as long as it runs; a second writer is refused at once with a one-line
error naming the process that holds the run (or, with `wait=True`, queues
behind it). The kernel releases the lock when the holder exits, however it
exits (`kill -9` included), so a stale lock never blocks the next command: a
forked child (a DataLoader worker) closes its inherited copy at once, so it
cannot keep the lock alive after its parent was killed. The folder itself is
locked too, so deleting the lock file under a writer lets no second one in.
Read-only commands take no lock. Under torchrun only rank 0 takes it (the ranks
of one launch are one writer).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from clpt import distributed as dist
from clpt.errors import ClptError

LOCK_NAME = ".clpt.lock"

# descriptors of the locks this process holds: a forked child (a DataLoader worker) closes its copies
# at once, so a lock never outlives its holder in a child that lingers after the holder was killed
_held: list[int] = []


def _close_held_in_child() -> None:
    for fd in _held:
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _lock_folder(root: Path) -> int | None:
    """An exclusive flock on the run folder itself (so deleting the lock file lets no second writer in),
    or None where the file system cannot lock a folder (NFS emulates flock with byte-range locks)."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:
        os.close(fd)
        return None
    return fd


class RunBusyError(ClptError):
    """Another process is writing to the run folder."""

    exit_code = 1


def holder(root: Path) -> str | None:
    """Who holds the run's writer lock now ("process PID (command)"), or None: a probe that takes and at
    once releases a non-blocking lock on a read-only descriptor (it creates nothing)."""
    try:
        fd = os.open(Path(root) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None  # never locked (or unreadable): no writer we can see
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _sweep(root: Path) -> None:
    """Alone in the run now: remove the temporary files a killed writer left where runs write files."""
    from clpt.io import sweep_temporary

    tasks = root / "tasks"
    task_dirs = [Path(e.path) for e in os.scandir(tasks) if e.is_dir()] if tasks.is_dir() else []
    sweep_temporary([root, *task_dirs, *(t / "heads" for t in task_dirs)])


@contextlib.contextmanager
def run_lock(root: Path, wait: bool = False) -> Iterator[None]:
    """Hold the run folder's writer lock for the duration of the block."""
    if not dist.is_main():  # under torchrun rank 0 holds it for all
        yield
        return
    path = Path(root) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ClptError(
            f"cannot write to the run folder {root} ({e.strerror})",
            hint="make the folder writable, or copy the run to a writable place",
        ) from None
    folder_fd: int | None = None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            _held.append(fd)
            while True:  # the folder too: a lock file deleted under a writer leaves this one held
                try:
                    folder_fd = _lock_folder(Path(root))
                    break
                except BlockingIOError:
                    if not wait:
                        raise
                    time.sleep(0.5)
            if folder_fd is not None:
                _held.append(folder_fd)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            raise RunBusyError(
                f"run folder {root} is in use by {holder}",
                hint="wait for it to finish, or pass --wait to run after it",
            ) from None
        _sweep(Path(root))
        command = " ".join(["clpt", *sys.argv[1:3]]) if sys.argv else "clpt"
        try:  # who holds the run, for the next writer's message; best effort (a full disk refuses it)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} ({command})\n".encode(), 0)
        except OSError:
            pass
        yield
    finally:
        for held in (fd, folder_fd):
            if held is not None:
                if held in _held:
                    _held.remove(held)
                os.close(held)  # releases the lock
