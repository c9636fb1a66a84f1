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


# Where a VM setting of a replay came from, as the summary's config records it (vm_from).
FROM_OPTION, FROM_TRACE, FROM_DEFAULT, FROM_MEMSLOTS = "option", "trace", "default", "memslots"


def recorded_vm(schema) -> dict[str, int]:
    """The guest memory (bytes) and vCPUs a trace was made for, as ``sppjit generate`` (and
    a converter that knows them) records them in its schema metadata (sppjit.memory,
    sppjit.vcpus); a key absent or unreadable is left out."""
    meta = (schema.metadata if schema is not None else None) or {}
    out = {}
    for key in ("memory", "vcpus"):
        text = meta.get(f"sppjit.{key}".encode(), b"").decode(errors="replace").strip()
        if text.isdigit() and int(text) > 0:
            out[key] = int(text)
    return out


def vm_settings(schema, *, memory=None, memslots=None, vcpus=None):
    """The memory and vCPUs to replay with and where each came from: an option given wins,
    then what the trace records (recorded_vm), then the default. Returns (memory, vcpus,
    vm_from) with memory None when --memslots defines it; vm_from maps memory and vcpus to
    option, trace, default or memslots."""
    from .defaults import DEFAULT_MEMORY, DEFAULT_VCPUS, MAX_VCPUS

    recorded = recorded_vm(schema)
    vm_from = {}
    if memslots is not None:
        vm_from["memory"] = FROM_MEMSLOTS
    elif memory is not None:
        vm_from["memory"] = FROM_OPTION
    elif "memory" in recorded:
        memory, vm_from["memory"] = recorded["memory"], FROM_TRACE
    else:
        memory, vm_from["memory"] = DEFAULT_MEMORY, FROM_DEFAULT
    if vcpus is not None:
        vm_from["vcpus"] = FROM_OPTION
    elif 1 <= recorded.get("vcpus", 0) <= MAX_VCPUS:
        vcpus, vm_from["vcpus"] = recorded["vcpus"], FROM_TRACE
    else:
        vcpus, vm_from["vcpus"] = DEFAULT_VCPUS, FROM_DEFAULT
    return memory, vcpus, vm_from


def record_vm(path: str, *, memory: int, vcpus: int) -> None:
    """Record in the trace at ``path`` (a Parquet or Arrow IPC file a converter just wrote)
    the VM it needs, as ``sppjit generate`` does: ``sppjit.memory`` (bytes) and
    ``sppjit.vcpus`` in its schema metadata. A converter learns them only at the end of its
    input, after the schema was written, so the file is rewritten (batches as they are, no
    re-parsing: a few percent of a conversion), under a temporary name renamed over it."""
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    from .io.output import TableWriter

    with open(path, "rb") as handle:
        parquet = handle.read(4) == b"PAR1"
    if parquet:  # row group by row group: the file keeps its row groups
        source = pq.ParquetFile(path, memory_map=False, pre_buffer=False)
        schema = source.schema_arrow
        parts = (source.read_row_group(i) for i in range(source.num_row_groups))
    else:
        source = ipc.open_file(pa.memory_map(path))
        schema = source.schema
        parts = (source.get_batch(i) for i in range(source.num_record_batches))
    meta = {**(schema.metadata or {}), b"sppjit.memory": str(int(memory)).encode(),
            b"sppjit.vcpus": str(int(vcpus)).encode()}
    schema = schema.with_metadata(meta)
    with TableWriter(path, schema, option="--out") as writer:
        for part in parts:
            writer.write_batch(part.replace_schema_metadata(meta))
