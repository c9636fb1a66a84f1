"""What a result was made from: tool versions, input digests, the generator's seed.

Every summary and report records these so that a number can be traced back and reproduced
(docs/contract.md §8: seeds, versions and input hashes in every report).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import platform
import threading

CHUNK = 1 << 23  # bytes read and hashed at a time (BLAKE3 splits a chunk over its threads)


def versions() -> dict[str, str]:
    """Versions of sppjit and of the libraries that shape its results."""
    from . import __version__

    return {
        "sppjit": __version__,
        "numba": _version_of("numba"),
        "numpy": _version_of("numpy"),
        "pyarrow": _version_of("pyarrow"),
        "python": platform.python_version(),
    }


def _version_of(name: str) -> str:
    """A library's version: from the module when it is loaded, else from its installed
    metadata, without importing it (importing numba costs a report 0.6 s of start-up)."""
    import sys

    module = sys.modules.get(name)
    if module is not None:
        return module.__version__
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return getattr(importlib.import_module(name), "__version__", "unknown")


# The algorithm of the digests a summary records, named in each digest ("blake3:<hex>").
# BLAKE3 hashes 3-4 GB/s a core here, against 0.8 GB/s for SHA-256: a digest on its thread
# finishes before the replay does, so it never sets the wall clock. Summaries written before
# it record "sha256:<hex>"; verify_digest checks either.
DIGEST_ALGORITHMS = ("blake3", "sha256")
DEFAULT_DIGEST = "blake3"


def default_algorithm() -> str:
    """BLAKE3 (the ``blake3`` package, a dependency); SHA-256 where it cannot be imported."""
    try:
        import blake3  # noqa: F401
    except ImportError:
        return "sha256"
    return DEFAULT_DIGEST


def digest_threads() -> int:
    """Threads one BLAKE3 digest may use: every core but one, which the replay needs (on two
    cores, one: the digest runs beside the replay, not in its way)."""
    return max(1, (os.cpu_count() or 1) - 1)


def _hasher(algorithm: str):
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3":
        import blake3

        threads = digest_threads()
        return blake3.blake3(max_threads=threads if threads > 1 else 1)
    raise ValueError(f"unknown digest algorithm {algorithm!r} (one of "
                     f"{', '.join(DIGEST_ALGORITHMS)})")


def file_digest(path: str | os.PathLike, algorithm: str | None = None) -> str:
    """``algorithm:hex`` digest of a file's bytes, or of a directory's files (sorted relative
    paths and bytes). BLAKE3 by default; "sha256" gives what summaries recorded before."""
    path = os.fspath(path)
    algorithm = algorithm or default_algorithm()
    h = _hasher(algorithm)
    if os.path.isdir(path):
        names = sorted(
            os.path.relpath(os.path.join(root, f), path) for root, _, files in os.walk(path) for f in files
        )
        for name in names:
            h.update(os.fsencode(name) + b"\0")  # any name the OS allows, UTF-8 or not
            _update(h, os.path.join(path, name))
    else:
        _update(h, path)
    return f"{algorithm}:{h.hexdigest()}"


def digest_algorithm(digest: str) -> str | None:
    """The algorithm a recorded digest names ("blake3", "sha256"), None if it names none
    this sppjit knows (an "unavailable: ..." note, another tool's digest)."""
    algorithm, sep, hexdigest = str(digest).partition(":")
    if not sep or algorithm not in DIGEST_ALGORITHMS or not hexdigest:
        return None
    return algorithm


def verify_digest(path: str | os.PathLike, digest: str) -> bool:
    """Whether ``path`` still has the digest a summary recorded, in the algorithm the digest
    names (a summary of this sppjit: BLAKE3; an older one: SHA-256). ValueError for a digest
    that names no known algorithm; OSError if the file cannot be read."""
    algorithm = digest_algorithm(digest)
    if algorithm is None:
        raise ValueError(f"not a digest sppjit can check: {str(digest)[:80]!r} (one of "
                         f"{', '.join(a + ':<hex>' for a in DIGEST_ALGORITHMS)})")
    return file_digest(path, algorithm) == f"{algorithm}:{str(digest).partition(':')[2].lower()}"


def verify_summary_digests(summary: dict, paths: dict[str, str | os.PathLike]) -> dict:
    """Check input files against the digests a summary (or compare document) records:
    {name: True (same bytes) | False (changed) | None (no digest of it recorded, or one that
    names no known algorithm)} for each name in ``paths`` ("trace", "protect", ...). Old
    summaries (SHA-256) and new ones (BLAKE3) check alike."""
    recorded = ((summary.get("provenance") or {}).get("digests") or {}) if isinstance(
        summary, dict) else {}
    out: dict[str, bool | None] = {}
    for name, path in paths.items():
        digest = recorded.get(name)
        if not isinstance(digest, str) or digest_algorithm(digest) is None:
            out[name] = None
        else:
            out[name] = verify_digest(path, digest)
    return out


def _update(h, path: str) -> None:
    # Read, not memory-mapped: a mapped input that shrinks while it is hashed (the replay
    # reads the same file) would kill the process with SIGBUS. read() leaves the file's pages
    # in the page cache, not in this process's RSS; one buffer is reused for every chunk.
    # hashlib and blake3 release the GIL on chunks this large.
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
