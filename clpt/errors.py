"""Errors that reach the user as one line: what is wrong, and how to fix it.

Every error raised on purpose by clpt derives from `ClptError`; the CLI prints
`error: <message>` (plus `fix: <hint>` on the same line) and exits non-zero.
"""

from __future__ import annotations

import errno


class ClptError(Exception):
    """Base class: a problem the user can act on."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        if self.hint:
            text += f"; fix: {self.hint}"
        return text


class ConfigError(ClptError, ValueError):
    """The configuration has one or more invalid entries (all are listed)."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        message = f"{source}: {len(problems)} problem(s): " + "; ".join(problems)
        super().__init__(message, hint="correct these entries (see `clpt init --help` and configs/)")


class MissingInputError(ClptError, FileNotFoundError):
    """A stage's input is missing; the hint names the command that produces it."""

    exit_code = 3


class DataError(ClptError, ValueError):
    """A dataset, checkpoint or file of the run cannot be read as expected (damaged, truncated, wrong content)."""

    exit_code = 4


class FileSystemError(ClptError, OSError):
    """The file system refused: a full disk, a read-only folder, a path that is a file."""

    exit_code = 1


_FS_HINTS = {
    errno.ENOSPC: ("no space left on the device", "free disk space, then re-run the same command: finished stages are kept"),
    errno.EDQUOT: ("disk quota exceeded", "free space in your quota, then re-run the same command: finished stages are kept"),
    errno.EFBIG: ("file too large for the file system or the process's file-size limit (no space for it)",
                  "free space or raise the limit (ulimit -f), then re-run the same command"),
    errno.EROFS: ("read-only file system", "copy the run to a writable place, or remount it writable"),
    errno.EACCES: ("permission denied", "make the folder writable for you, or copy the run to a writable place"),
    errno.EPERM: ("operation not permitted", "make the folder writable for you, or copy the run to a writable place"),
    errno.ENOTDIR: ("a path component is a file, not a folder", "choose a folder path for the run"),
    errno.EISDIR: ("a folder is where a file should be", "remove or rename that folder"),
}  # fmt: skip


def from_os_error(e: OSError, doing: str = "") -> FileSystemError:
    """The one-line error for an OSError from the file system: what failed, where, and what to do."""
    what, hint = _FS_HINTS.get(
        e.errno, (e.strerror or type(e).__name__, "check the path and the disk, then re-run")
    )
    where = f" ({e.filename})" if e.filename else ""
    err = FileSystemError(f"{doing + ': ' if doing else ''}{what}{where}", hint=hint)
    err.errno = e.errno
    return err
