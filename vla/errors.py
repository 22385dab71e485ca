"""Errors a user sees.

Every error that reaches the CLI is one line naming the thing and the fix. `UserError` is bad
input (a missing file, a wrong artifact kind, an unknown recipe key): exit code 2. `StageError`
is a failure at run time (a NaN loss, too many corrupt samples): exit code 1. Anything else is a
bug and prints a traceback only with `--debug` / `VLA_DEBUG=1`.
"""

from __future__ import annotations


class VlaError(Exception):
    """Base class: `str(err)` is the single line shown to the user."""

    exit_code = 1


class UserError(VlaError):
    """The input is wrong: the message names the thing and how to fix it (exit 2)."""

    exit_code = 2


class StageError(VlaError):
    """A stage failed while running (exit 1); finished artifacts and checkpoints are kept."""

    exit_code = 1


class Interrupted(VlaError):
    """A run stopped on request (Ctrl-C, or SIGTERM from a scheduler preempting the job) after
    saving what a rerun needs; the message says what a rerun does. Exit code 128 + the signal,
    as a shell reports a process the signal ended (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum

    def __reduce__(self):  # picklable, like the other errors
        return type(self), (str(self), self.signum)
