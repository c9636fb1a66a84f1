"""What a run does when its standard output is closed under it (a reader such as ``head``
that exits early)."""

from __future__ import annotations

import contextlib
import os

# The one line a run prints then (after "sppjit: error: "), exit code 1.
STDOUT_CLOSED = "standard output was closed (broken pipe)"


def stdout_to_devnull() -> None:
    """Send what is still buffered for standard output nowhere, so that Python's last flush
    at exit does not print a second message after the run's own one line."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
