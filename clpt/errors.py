"""Errors that reach the user as one line: what is wrong, and how to fix it.

Every error raised on purpose by clpt derives from `ClptError`; the CLI prints
`error: <message>` (plus `fix: <hint>` on the same line) and exits non-zero.
"""

from __future__ import annotations


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


class ConfigError(ClptError):
    """The configuration has one or more invalid entries (all are listed)."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        message = f"{source}: {len(problems)} problem(s): " + "; ".join(problems)
        super().__init__(message, hint="correct these entries (see `clpt init --help` and configs/)")


class MissingInputError(ClptError):
    """A stage's input is missing; the hint names the command that produces it."""

    exit_code = 3


class DataError(ClptError):
    """A dataset or checkpoint cannot be read as expected."""

    exit_code = 4
