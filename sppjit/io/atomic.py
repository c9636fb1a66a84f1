"""All-or-nothing output files for the library's jobs and the commands (standard library only).

``atomic_path`` gives one output a temporary name beside it and renames it only when complete;
``Outputs`` remembers the outputs renamed so far and removes them if the job then fails, so a
failed or interrupted run leaves no output file at all. ``check_distinct`` refuses two
parameters naming the same file before any work.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

from sppjit.errors import InputError


def same_file(a: str, b: str) -> bool:
    """Whether two paths name the same file (existing or not)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_distinct(named_paths: list[tuple[str, str | None]]) -> None:
    """Refuse two parameters naming the same file (an output over an input, or two outputs)."""
    given = [(option, path) for option, path in named_paths if path is not None]
    for i, (first, a) in enumerate(given):
        for second, b in given[i + 1:]:
            if same_file(a, b):
                raise InputError(f"{second}: {b} is the same file as {first}")


def temporary_name(path: str) -> str:
    """A hidden, unique name beside ``path`` (same directory: the rename is atomic)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path to write; it becomes ``path`` only if the block succeeds."""
    temporary = temporary_name(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


class Outputs:
    """All-or-nothing for a job's several output files.

    Each output is written atomically on its own (temporary name, then rename); this remembers
    the ones renamed so far and, if the job then fails or is interrupted, removes them, so
    that a failed run leaves no output file at all. Use as the first context of an ExitStack.
    """

    def __init__(self) -> None:
        self.committed: list[str] = []

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            return
        for path in reversed(self.committed):
            with contextlib.suppress(OSError):
                os.remove(path)
        self.committed.clear()

    def track(self, path: str):
        """An exit callback for ExitStack.push: records ``path`` once its writer committed."""

        def committed(kind, error, traceback) -> None:
            if kind is None:
                self.committed.append(path)

        return committed

    def add(self, path: str) -> None:
        self.committed.append(path)
