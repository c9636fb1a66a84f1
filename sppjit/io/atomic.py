"""Output files that appear complete or not at all, and runs that leave every path as it was.

A file is written under a temporary name in its destination directory (the rename that
publishes it stays on one file system, so it is atomic). A command's several outputs form one
``Outputs``: while it is open, publishing over an existing file keeps the old one aside (a
hard link), and if the command then fails or is interrupted every path is put back as it was
before the run, old files restored, new ones removed. Only when the whole command succeeded
are the kept-aside files dropped.

Temporary names are short and fixed-length (``.sppjit-HOST-PID-RANDOM.tmp``, about 35
bytes, whatever the output's name: a legal 255-byte output name still has a temporary), and
name the process that owns them: a run killed by SIGKILL cannot remove its own, so the next
run that writes into the same directory removes those whose owner is no longer alive.

Only the standard library is imported here: the command modules import this for ``--help``.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import os
import re
import secrets
import socket
from collections.abc import Iterator

from sppjit.errors import InputError
from sppjit.io import signals

# The host in temporary names: on a directory shared between machines, a pid says whether
# its owner is alive only on the machine that runs it.
_HOST = hashlib.sha256(socket.gethostname().encode(errors="replace")).hexdigest()[:4]
_TEMPORARY = re.compile(r"^\.sppjit-([0-9a-f]{4})-([0-9]+)-[0-9a-f]{8}\.(?:tmp|old)$")
_swept: set[str] = set()


def temporary_name(path: str | os.PathLike, kind: str = "tmp") -> str:
    """A hidden, unique name in the directory of ``path`` that names this process; the
    directory's stale temporaries (of dead owners) are removed the first time."""
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    remove_stale_temporaries(directory)
    return os.path.join(directory, f".sppjit-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def remove_stale_temporaries(directory: str) -> list[str]:
    """Remove the temporaries that a killed sppjit left in ``directory`` (once per directory
    and process): only names of sppjit's pattern, of this host, whose process is gone."""
    directory = os.path.abspath(directory)
    if directory in _swept:
        return []
    _swept.add(directory)
    removed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed  # writing there will say what is wrong
    for name in entries:
        found = _TEMPORARY.match(name)
        if found is None or found.group(1) != _HOST:
            continue
        pid = int(found.group(2))
        if pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(OSError):
            os.remove(os.path.join(directory, name))
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OverflowError:
        return False  # not a pid at all
    return True


def remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def probe_directory(path: str | os.PathLike, option: str) -> None:
    """InputError now if the output ``path`` could not be published later: its name too
    long for the file system, or its directory refusing a new file (permissions, a
    read-only mount); found by creating and removing a temporary there."""
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    try:
        limit = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(name)) > limit:
        raise InputError(f"{option}: file name longer than the {limit} bytes the file "
                         f"system allows: {path}")
    temporary = temporary_name(path)
    try:
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise InputError(f"{option}: cannot write in {directory}: "
                         f"{exc.strerror or exc}") from None
    remove_quietly(temporary)


# ------------------------------------------------------------------------------ publishing

_current: contextvars.ContextVar[Outputs | None] = contextvars.ContextVar(
    "sppjit_outputs", default=None)


def publish(temporary: str, path: str) -> None:
    """Rename the complete ``temporary`` to ``path``; inside an Outputs, an existing file at
    ``path`` is kept aside until the Outputs ends, to be restored if the run fails."""
    outputs = _current.get()
    if outputs is None:
        os.replace(temporary, path)
    else:
        outputs.publish(temporary, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path to write; it becomes ``path`` only if the block succeeds."""
    path = os.fspath(path)
    temporary = temporary_name(path)
    try:
        yield temporary
        publish(temporary, path)
    except BaseException:
        remove_quietly(temporary)
        raise


class Outputs:
    """All-or-nothing for a command's output files: a failed or interrupted command leaves
    every output path as it was before the command, the older file included.

    Files published (``publish``, hence TableWriter, write_json_atomic, atomic_path) while it
    is open are recorded with the file they replaced, kept aside as a hard link. At a failure
    the old files come back and new ones are removed; at success the kept files are dropped.
    A signal received while it was open (sppjit.io.signals) counts as a failure even when
    something on the way swallowed its exception. Use as the first context of an ExitStack.
    """

    def __init__(self) -> None:
        self.committed: list[str] = []  # paths published so far, in order
        self._kept: dict[str, str | None] = {}  # path -> its old file kept aside, or None
        self._token = None

    def __enter__(self) -> Outputs:
        self._token = _current.set(self)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        _current.reset(self._token)
        self.end(failed=kind is not None)

    def end(self, *, failed: bool) -> None:
        """Keep what was published (the old files kept aside are dropped) or, ``failed`` or
        after a signal, put every path back as it was. ``__exit__`` calls it; an Outputs
        that is never entered (several runs at once, each publishing inside its own
        ``current()``) is ended this way."""
        if not failed and signals.received() is None:
            for kept in self._kept.values():
                if kept is not None:
                    remove_quietly(kept)
            self._kept.clear()
            return
        self.roll_back()
        if not failed:
            signals.raise_received()

    @contextlib.contextmanager
    def current(self) -> Iterator[Outputs]:
        """Publish into this Outputs inside the block, whichever Outputs is entered."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)

    def roll_back(self) -> None:
        """Put every path back as it was before this Outputs was opened."""
        for path in reversed(self.committed):
            kept = self._kept.get(path)
            with contextlib.suppress(OSError):
                if kept is None:
                    os.remove(path)
                else:
                    os.replace(kept, path)
        self.committed.clear()
        self._kept.clear()

    def publish(self, temporary: str, path: str) -> None:
        if path in self._kept:  # written twice in one run: the first old file is the one
            os.replace(temporary, path)
            return
        kept = None
        if os.path.lexists(path) and not os.path.isdir(path):
            kept = temporary_name(path, "old")
            try:
                os.link(path, kept, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK,
                                     errno.ENOTSUP):
                    raise
                os.replace(path, kept)  # no hard links here: a moment without the file
        try:
            os.replace(temporary, path)
        except BaseException:
            if kept is not None:
                with contextlib.suppress(OSError):
                    if os.path.lexists(path):
                        os.remove(kept)
                    else:
                        os.replace(kept, path)
            raise
        self._kept[path] = kept
        self.committed.append(path)

    def track(self, path: str):
        """An exit callback for ExitStack.push: records ``path`` once its writer committed
        (a writer that publishes inside this Outputs is recorded already)."""

        def committed(kind, error, traceback) -> None:
            if kind is None:
                self.add(path)

        return committed

    def add(self, path: str) -> None:
        """Record a path written by other means (removed if the run fails)."""
        if path not in self._kept:
            self._kept[path] = None
            self.committed.append(path)


# ------------------------------------------------------------------------------ distinct paths

def same_file(a: str, b: str) -> bool:
    """Whether two paths name the same file (existing or not)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_distinct(named_paths: list[tuple[str, str | None]]) -> None:
    """Refuse two options naming the same file (an output over an input, or two outputs)."""
    given = [(option, path) for option, path in named_paths if path is not None]
    for i, (first, a) in enumerate(given):
        for second, b in given[i + 1:]:
            if same_file(a, b):
                raise InputError(f"{second}: {b} is the same file as {first}")
