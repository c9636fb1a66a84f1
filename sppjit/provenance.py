"""What a result was made from: tool versions, input digests, the generator's seed.

Every summary and report records these so that a number can be traced back and reproduced
(docs/contract.md §8: seeds, versions and input hashes in every report).
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading

CHUNK = 1 << 22


def versions() -> dict[str, str]:
    """Versions of sppjit and of the libraries that shape its results."""
    import numba
    import numpy
    import pyarrow

    from . import __version__

    return {
        "sppjit": __version__,
        "numba": numba.__version__,
        "numpy": numpy.__version__,
        "pyarrow": pyarrow.__version__,
        "python": platform.python_version(),
    }


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, or of a directory's files (sorted relative paths and bytes)."""
    path = os.fspath(path)
    h = hashlib.sha256()
    if os.path.isdir(path):
        names = sorted(
            os.path.relpath(os.path.join(root, f), path) for root, _, files in os.walk(path) for f in files
        )
        for name in names:
            h.update(os.fsencode(name) + b"\0")  # any name the OS allows, UTF-8 or not
            _update(h, os.path.join(path, name))
    else:
        _update(h, path)
    return "sha256:" + h.hexdigest()


def _update(h, path: str) -> None:
    # Read, not memory-mapped: a mapped input that shrinks while it is hashed (the replay
    # reads the same file) would kill the process with SIGBUS. read() leaves the file's pages
    # in the page cache, not in this process's RSS; one buffer is reused for every chunk.
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while count := f.readinto(buffer):
            h.update(view[:count])


class BackgroundDigests:
    """Hash input files on a thread while the replay runs (hashlib and the kernels both
    release the GIL, so on two cores the digest costs no wall time)."""

    def __init__(self, paths: dict[str, str | None]):
        self._paths = {k: v for k, v in paths.items() if v is not None}
        self._result: dict[str, str] = {}
        self._thread = threading.Thread(target=self._run, name="sppjit-digests", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for key, path in self._paths.items():
            try:
                self._result[key] = file_digest(path)
            except OSError as exc:  # the replay reports unreadable inputs itself
                self._result[key] = f"unavailable: {exc.strerror or exc}"
            except Exception as exc:  # noqa: BLE001 - a digest is a note, never a crash
                # A thread's exception would print a traceback and be lost; the summary
                # records why the digest is missing instead.
                self._result[key] = f"unavailable: {type(exc).__name__}: {exc}"

    def result(self) -> dict[str, str]:
        self._thread.join()
        return dict(self._result)


def generator_info(schema) -> dict:
    """The scenario and seed a trace records in its schema metadata (sppjit generate)."""
    meta = schema.metadata or {}
    out = {}
    for key in ("scenario", "seed"):
        value = meta.get(f"sppjit.{key}".encode())
        if value is not None:
            text = value.decode(errors="replace")
            out[key] = int(text) if key == "seed" and text.isdigit() else text
    return out


def generated_hint(schema, *, memory=None, memslots=None, vcpus=None) -> str | None:
    """If ``sppjit generate`` wrote the trace for another VM than the one asked for (memory or
    vCPUs left at their defaults: None), the options that would match it."""
    from .defaults import DEFAULT_MEMORY, DEFAULT_VCPUS
    from .io.sizes import format_size, parse_size

    meta = schema.metadata or {}
    scenario = meta.get(b"sppjit.scenario")
    if scenario is None:
        return None
    suggest = []
    try:
        want_memory = int(meta.get(b"sppjit.memory", b"0"))
        want_vcpus = int(meta.get(b"sppjit.vcpus", b"0"))
    except ValueError:
        return None
    if memory is None and memslots is None and want_memory:
        if want_memory != parse_size(DEFAULT_MEMORY):
            suggest.append(f"--memory {format_size(want_memory)}")
    if vcpus is None and want_vcpus and want_vcpus != DEFAULT_VCPUS:
        suggest.append(f"--vcpus {want_vcpus}")
    if not suggest:
        return None
    return (f"the trace was generated for scenario {scenario.decode(errors='replace')}: "
            f"replay it with {' '.join(suggest)}")
