"""Errors that reach the user as one line: what is wrong, and how to fix it.

Every error raised on purpose by clpt derives from `ClptError`; the CLI prints
`error: <message>` (plus `fix: <hint>` on the same line) and exits non-zero.

Library code never writes a `clpt ...` command into a message. An error whose
fix is to (re-)run a stage carries a `Redo` naming the stage, the task and the
run; the stage wiring (`clpt.stages.graph.explain`) formats the fix from the
command that stage declares. A hint may hold `{command}` where that command goes.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass


@dataclass(frozen=True)
class Redo:
    """The stage whose command fixes an error."""

    stage: str  # a stage name (clpt.stages.graph): train, extract, stats, align, eval, head:NAME
    task: int
    root: str  # the run folder
    force: bool = True  # True: re-run it with --force (its result is damaged); False: run it (missing)


class ClptError(Exception):
    """Base class: a problem the user can act on."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, redo: Redo | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.redo = redo

    def fix(self, command: str | None = None) -> str | None:
        """The hint with the stage's command filled in (`command`, formatted by the stage wiring)."""
        if self.redo is None:
            return self.hint
        r = self.redo
        if command is None:  # not explained by the wiring: still a usable sentence
            command = f"the {r.stage} stage of task {r.task} of {r.root}" + (
                " with --force" if r.force else ""
            )
        else:
            command = f"`{command}{' --force' if r.force else ''}`"
        template = self.hint or ("re-run {command}" if r.force else "run {command}")
        return template.replace("{command}", command)

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        hint = self.fix()
        if hint:
            text += f"; fix: {hint}"
        return text


class ConfigError(ClptError, ValueError):
    """The configuration has one or more invalid entries (all are listed)."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        message = f"{source}: {len(problems)} problem(s): " + "; ".join(problems)
        super().__init__(
            message,
            hint="correct these entries (every key, its default and meaning: `clpt config --defaults`; examples in configs/)",
        )


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
        e.errno or 0, (e.strerror or type(e).__name__, "check the path and the disk, then re-run")
    )
    where = f" ({e.filename})" if e.filename else ""
    err = FileSystemError(f"{doing + ': ' if doing else ''}{what}{where}", hint=hint)
    err.errno = e.errno
    return err


def load_error_detail(e: Exception) -> str:
    """The telling line of a failed `load_state_dict`: its first size mismatch, else its first line."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return next((ln.strip() for ln in lines if "size mismatch" in ln), lines[0].strip())
