"""What a result was made from: tool versions, input digests, the generator's seed.

Every summary and report records these so that a number can be traced back and reproduced
(docs/contract.md §8: seeds, versions and input hashes in every report).
"""

from __future__ import annotations

import hashlib
import mmap
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
            h.update(name.encode() + b"\0")
            _update(h, os.path.join(path, name))
    else:
        _update(h, path)
    return "sha256:" + h.hexdigest()


def _update(h, path: str) -> None:
    with open(path, "rb") as f:
        try:
            # Hashed in place from the page cache: no copy into Python buffers (about 15%
            # faster here). Each chunk is unmapped from this process once hashed, so the
            # digest does not hold the whole file in the RSS (the pages stay in the cache).
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, memoryview(m) as view:
                for start in range(0, len(view), CHUNK):
                    h.update(view[start:start + CHUNK])
                    m.madvise(mmap.MADV_DONTNEED, start, min(CHUNK, len(view) - start))
                return
        except (ValueError, OSError):  # empty, or not a mappable file (a pipe, a FIFO)
            pass
        while chunk := f.read(CHUNK):
            h.update(chunk)


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
