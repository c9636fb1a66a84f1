"""Progress of the commands' long steps, drawn with rich (which typer brings) on standard error.

The library reports progress through plain callbacks (``progress(done, total)``, total None
when unknown) and says when its kernels compile (sppjit.compilation); this turns both into
one rich display: a bar per step (rows, or bytes of the input), a spinner for a step with no
count, and a spinner with the compile note while numba compiles. It draws only when enabled
(standard error is a terminal and no --no-progress); otherwise every callback does nothing,
and the compile note is not written either, so that logs and pipes stay clean.

    with Shown(enabled) as shown:
        run(job, progress=shown.rows("replay"))
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator

from sppjit.commands import is_tty

Callback = Callable[[int, "int | None"], None]


def wanted(no_progress: bool, stream=None) -> bool:
    """Whether to draw: standard error (or ``stream``) is a terminal and not --no-progress."""
    return not no_progress and is_tty(sys.stderr if stream is None else stream)


class Shown:
    """One rich display for a command; a context manager. Disabled: every call is a no-op."""

    def __init__(self, enabled: bool, *, stream=None, width: int | None = None):
        self.enabled = enabled
        self.width = width  # None: the terminal's
        self.stream = sys.stderr if stream is None else stream
        self._progress = None
        self._tasks: dict[str, int] = {}
        self._compile_task = None
        self._lock = threading.Lock()
        self._stack = contextlib.ExitStack()

    # ---------------------------------------------------------------- context
    def __enter__(self) -> Shown:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                TaskProgressColumn(), TextColumn("{task.fields[count]}"),
                TimeElapsedColumn(), TimeRemainingColumn(),
                console=Console(file=self.stream, stderr=self.stream is sys.stderr,
                                width=self.width),
                transient=True)
            self._stack.enter_context(self._progress)
        # Disabled, the presenter still replaces the Python API's line: a command is quiet
        # when it does not draw.
        from sppjit import compilation

        self._stack.enter_context(compilation.presenting(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    # ---------------------------------------------------------------- steps
    def _update(self, label: str, done: int, total: int | None, unit: str) -> None:
        progress = self._progress
        with self._lock:
            if (waiting := self._tasks.pop(_PREPARING, None)) is not None:
                progress.remove_task(waiting)  # the first rows: preparing is over
            task = self._tasks.get(label)
            if task is None:
                task = self._tasks[label] = progress.add_task(label, total=total, count="")
        progress.update(task, completed=done, total=total, count=_count(done, total, unit))

    def rows(self, label: str, unit: str = "rows", *, preparing: str | None = None) -> Callback:
        """A ``progress(rows_done, rows_total)`` callback drawing the step ``label`` (the
        total may be left out: a converter's input lines). With ``preparing``, a spinner
        says what happens before the first rows (reading the inputs, placing protection)."""
        if not self.enabled:
            return _nothing
        if preparing is not None:
            self._preparing(preparing)
        return lambda done, total=None: self._update(label, done, total, unit)

    def _preparing(self, text: str) -> None:
        self._tasks[_PREPARING] = self._progress.add_task(text, total=None, count="")

    def bytes(self, label: str) -> Callback:
        """A ``progress(bytes_done, bytes_total)`` callback (a converter's input)."""
        if not self.enabled:
            return _nothing
        return lambda done, total=None: self._update(label, done, total, "bytes")

    def named(self, label: str) -> Callable[..., None]:
        """A ``progress(name, rows_done, rows_total)`` callback: a bar per name (a
        configuration of compare)."""
        if not self.enabled:
            return lambda *args: None
        self._preparing(PREPARING)
        return lambda name, done, total=None: self._update(f"{label} {name}", done, total,
                                                          "rows")

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        """A spinner for a step that counts nothing (writing a report, placing protection)."""
        if not self.enabled:
            yield
            return
        task = self._progress.add_task(label, total=None, count="")
        try:
            yield
        finally:
            self._progress.remove_task(task)

    # ---------------------------------------------------------------- compile notes
    def compile_started(self, note: str) -> None:
        if self.enabled and self._compile_task is None:
            from sppjit.compilation import SHORT_NOTE

            self._compile_task = self._progress.add_task(SHORT_NOTE, total=None, count="")

    def compile_finished(self) -> None:
        if self._compile_task is not None:
            self._progress.remove_task(self._compile_task)
            self._compile_task = None


_PREPARING = object()  # the key of the spinner shown before the first rows
PREPARING = "reading the inputs and placing the protection"


def _nothing(done: int, total: int | None = None) -> None:
    pass


def _count(done: int, total: int | None, unit: str) -> str:
    if unit == "bytes":
        from sppjit.io.sizes import format_size

        text = format_size(done)
        return f"{text}/{format_size(total)}" if total else text
    return f"{done:,}/{total:,} {unit}" if total else f"{done:,} {unit}"
