"""What SIGINT and SIGTERM do to a run: raise in the main thread, and be remembered.

While ``handled()`` is active (the command line's whole run), SIGINT raises KeyboardInterrupt
and SIGTERM raises sppjit.errors.Terminated, so that every ``with`` block on the way
unwinds: temporaries are removed and sppjit.io.atomic.Outputs puts the outputs back as they
were. The first signal is also remembered: C code that clears pending Python errors (numba's
dispatcher does while it loads a cached kernel) can swallow the exception, and the run must
still end as interrupted, not succeed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from sppjit.errors import Terminated

HANDLED = (signal.SIGINT, signal.SIGTERM)
_received: int | None = None


def _handler(signum: int, frame) -> None:
    global _received
    if _received is None:
        _received = signum
    _raise(signum)


def _raise(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def received() -> int | None:
    """The first signal received in the current ``handled()`` block, or None."""
    return _received


def raise_received() -> None:
    """Raise the exception of the signal received, if any."""
    if _received is not None:
        _raise(_received)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Install the handlers for the block, then restore the previous ones. In a thread other
    than the main one (where Python cannot install handlers) this does nothing."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, _handler) for number in HANDLED}
    _received = None
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _received = None
