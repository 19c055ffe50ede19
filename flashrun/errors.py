"""Exit codes and the user-facing error type, named once so every layer reports failures the same way."""

from __future__ import annotations

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2  # click's code for usage errors too
EXIT_SIGNAL_BASE = 128  # the shell's convention: 128 + signal number
EXIT_UNRECOVERABLE = 86
"""A worker exits with this when no replica holds the lost state and it has no checkpoint: recovery cannot help."""


class FlashrunError(Exception):
    """A problem the user can fix: printed as one line, no traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code
