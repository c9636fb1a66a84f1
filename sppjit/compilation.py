"""When numba compiles sppjit's kernels (a first run, an upgrade, a fresh cache), said once.

numba compiles a kernel on its first call unless its on-disk cache holds it; a first run
spends about a minute there on a small machine, and would otherwise look hung. numba
announces each compilation (not a cache load) as a ``numba:compile`` event: the listener
here counts, per thread, the seconds spent compiling sppjit's kernels, so that a replay can
report them apart from replaying (``Replay`` subtracts them from its timed loop), and tells
a presenter when compiling starts and stops.

The default presenter (the Python API) writes one line on standard error, once per process;
the command line installs its own (a spinner on a terminal, nothing otherwise) with
``presenting``. Nothing here imports rich or the command line, nor numba until the kernels'
decorator installs the listener.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Protocol

# What a first run costs, measured on a 2-vCPU machine shared with other work (the README
# says the same): every kernel sppjit replay calls, compiled from scratch.
FIRST_RUN = "about a minute on 2 cores"
NOTE = (f"compiling the kernels (first run only, {FIRST_RUN}; numba caches them on disk, "
        "later runs load them in about a second)")
SHORT_NOTE = f"compiling the kernels (first run only, {FIRST_RUN})"  # beside a spinner


class Presenter(Protocol):
    """Told when sppjit's kernels start and stop compiling (from the compiling thread)."""

    def compile_started(self, note: str) -> None: ...

    def compile_finished(self) -> None: ...


class _OneLine:
    """The Python API's presenter: ``sppjit: note: compiling the kernels ...`` once."""

    def __init__(self):
        self.said = False

    def compile_started(self, note: str) -> None:
        if not self.said:
            self.said = True
            sys.stderr.write(f"sppjit: note: {note}\n")
            sys.stderr.flush()

    def compile_finished(self) -> None:
        pass


_default = _OneLine()
_presenter: Presenter = _default
_local = threading.local()  # per thread: depth of nested compilations, start, seconds
_lock = threading.Lock()
_active = 0  # threads compiling now


def thread_seconds() -> float:
    """Seconds this thread has spent compiling sppjit's kernels (a running total)."""
    return getattr(_local, "seconds", 0.0)


@contextlib.contextmanager
def presenting(presenter: Presenter) -> Iterator[None]:
    """Show compilations with ``presenter`` inside the block (the command line's renderer)."""
    global _presenter
    previous, _presenter = _presenter, presenter
    try:
        yield
    finally:
        _presenter = previous


def _is_ours(data) -> bool:
    dispatcher = (data or {}).get("dispatcher")
    module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
    return module.startswith("sppjit")


class _Listener:  # a numba.core.event.Listener (install() makes it one: numba loads late)
    def on_start(self, ev) -> None:
        if not _is_ours(ev.data):
            return
        depth = getattr(_local, "depth", 0)
        _local.depth = depth + 1
        if depth == 0:  # a kernel's callees compile inside it: count the outermost only
            global _active
            _local.start = time.perf_counter()
            with _lock:
                _active += 1
                first = _active == 1
            if first:
                _presenter.compile_started(NOTE)

    def on_end(self, ev) -> None:
        if not _is_ours(ev.data) or getattr(_local, "depth", 0) == 0:
            return
        _local.depth -= 1
        if _local.depth == 0:
            global _active
            _local.seconds = thread_seconds() + time.perf_counter() - _local.start
            with _lock:
                _active -= 1
                last = _active == 0
            if last:
                _presenter.compile_finished()


_registered = False


def install() -> None:
    """Listen to numba's compile events (idempotent; the kernels' decorator calls it)."""
    global _registered
    from numba.core import event

    with _lock:
        if not _registered:
            listener = type("Listener", (_Listener, event.Listener), {})()
            event.register("numba:compile", listener)
            _registered = True
