"""The streaming core shared by every converter: read lines, parse, map, write batches.

A text trace may be far larger than memory. It is read line by line; every ``chunk_lines``
lines the accesses parsed so far become numpy arrays, go through the first-touch page mapping
(sppjit.convert.mapping) and are appended to the output as one record batch. Only the
current chunk and the page mapping (one entry per page touched) are ever held.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import itertools
import json
import lzma
import os
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sppjit.errors import InputError

MAX_ACCESS_SIZE = 4096
UINT64_LIMIT = 1 << 64
MAX_THREADS = 1 << 16  # vcpu is uint16
DEFAULT_CHUNK_LINES = 1 << 16
SHOWN_CHARS = 80  # how much of a bad line an error message quotes


class BadLine(Exception):
    """A line that is not a record of the format: the reason, without the line itself."""


class Records:
    """The accesses parsed from one chunk of lines, as plain lists (cheap to append to)."""

    __slots__ = ("addr", "size", "kind", "vcpu", "seq")

    def __init__(self) -> None:
        self.addr: list[int] = []
        self.size: list[int] = []
        self.kind: list[int] = []
        self.vcpu: list[int] = []
        self.seq: list[int] = []

    def __len__(self) -> int:
        return len(self.addr)

    def add(self, addr: int, size: int, kind: int, vcpu: int, seq: int) -> None:
        self.addr.append(addr)
        self.size.append(size)
        self.kind.append(kind)
        self.vcpu.append(vcpu)
        self.seq.append(seq)


def check_access(addr: int, size: int) -> None:
    """Raise BadLine unless ``size`` is 1..4096 and the access ends inside 64 bits."""
    if size < 1 or size > MAX_ACCESS_SIZE:
        raise BadLine(f"size {size} is not 1..{MAX_ACCESS_SIZE}")
    if addr + size > UINT64_LIMIT:
        raise BadLine(f"access at {addr:#x} of {size} bytes wraps past the end of the "
                      "64-bit address space")


class Threads:
    """Threads to vCPU indices, in the order threads first appear (first thread = vCPU 0)."""

    def __init__(self) -> None:
        self._vcpus: dict[object, int] = {}

    def __len__(self) -> int:
        return len(self._vcpus)

    def vcpu(self, tid) -> int:
        found = self._vcpus.get(tid)
        if found is None:
            found = len(self._vcpus)
            if found >= MAX_THREADS:
                raise InputError(f"convert: more than {MAX_THREADS} threads; a trace has at "
                                 f"most {MAX_THREADS} vCPUs")
            self._vcpus[tid] = found
        return found

    def names(self) -> list[str]:
        return [str(tid) for tid in self._vcpus]


class Parser:
    """One input format. ``feed`` parses one line (without its line ending) and appends its
    accesses to ``out`` (none for a line to ignore), or raises BadLine having appended
    nothing. ``threads`` gives vCPU indices to thread ids, for formats that have them.
    ``parse_chunk`` feeds a list of lines; a format may override it with a faster loop."""

    name = "?"

    def __init__(self, threads: Threads, label: str) -> None:
        self.threads = threads
        self.label = label

    def feed(self, line: str, lineno: int, out: Records) -> None:  # pragma: no cover
        raise NotImplementedError

    def parse_chunk(self, lines: list[str], first_lineno: int, out: Records, bad) -> None:
        """Feed ``lines`` (the first is line ``first_lineno``); ``bad(lineno, line, error)``
        is called for each BadLine (it raises, or counts and returns)."""
        feed = self.feed
        for lineno, line in enumerate(lines, first_lineno):
            try:
                feed(line, lineno, out)
            except BadLine as error:
                bad(lineno, line, error)


@dataclass
class ConvertResult:
    """What a conversion did; ``line()`` says it in one line."""

    format: str
    source: str
    out: str
    mapping_out: str
    lines: int = 0
    accesses: int = 0  # rows written (split and M accesses count twice)
    split: int = 0  # accesses split at a virtual page boundary
    pages: int = 0  # virtual pages mapped
    page_size: int = 4096
    memory_bytes: int = 0  # guest-physical bytes the mapped pages span
    vcpus: int = 1
    threads: list[str] = field(default_factory=list)
    bad_lines: int = 0
    first_bad_line: int | None = None
    first_bad_reason: str | None = None

    def replay_memory(self) -> int:
        """The smallest --memory (a whole number of MiB) that holds every mapped page."""
        mib = 1 << 20
        return max(mib, -(-self.memory_bytes // mib) * mib)


# ------------------------------------------------------------------------------- the input

def _decompressed(raw: io.BufferedIOBase, magic: bytes):
    """Transparent gzip, bzip2 and xz by magic bytes (text traces compress ~10x)."""
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw)
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    return raw


PROGRESS_LINES = 1 << 16  # lines between two progress calls


@contextlib.contextmanager
def open_lines(source: str, progress: Callable[[int, int | None], None] | None = None
               ) -> Iterator[tuple[Iterator[str], str]]:
    """Yield (lines without their endings, label) for a path or ``-`` (standard input).
    ``progress(bytes_read, bytes_total)`` is called every PROGRESS_LINES lines: bytes of the
    file as stored (compressed, if it is), the total None for standard input."""
    from sppjit.io.formats import read_magic

    if source == "-":
        raw = sys.stdin.buffer
        magic = raw.peek(8)[:8] if hasattr(raw, "peek") else b""
        label = "standard input"
        close = False
    else:
        read_magic(source, "convert")  # InputError for a missing file or a directory
        try:
            raw = open(source, "rb")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise InputError(f"convert: cannot read {source}: {exc.strerror or exc}") from None
        magic = raw.peek(8)[:8]
        label = source
        close = True
    stream = _decompressed(raw, magic)
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline=None)
    total = os.fstat(raw.fileno()).st_size if close else None
    try:
        yield _read(text, label, raw, total, progress), label
    finally:
        if close:
            text.close()  # a decompressor does not close the file under it
            raw.close()
        else:
            text.detach()


def _read(text: io.TextIOWrapper, label: str, raw=None, total: int | None = None,
          progress: Callable[[int, int | None], None] | None = None) -> Iterator[str]:
    try:
        if progress is None:
            for line in text:
                yield line.rstrip("\n")
            return
        for n, line in enumerate(text, 1):
            yield line.rstrip("\n")
            if n % PROGRESS_LINES == 0:
                progress(_position(raw), total)
        progress(total if total is not None else _position(raw), total)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        # A truncated or corrupt compressed file shows only while reading (gzip lets zlib's
        # own error through for a damaged deflate stream: "invalid distance too far back").
        raise InputError(f"convert: cannot read {label}: {exc}") from None


def _position(raw) -> int:
    """Bytes of the input read so far (0 where the stream cannot tell: a pipe)."""
    try:
        return raw.tell()
    except (OSError, ValueError):
        return 0


def shown(line: str) -> str:
    """The line as an error message quotes it: at most SHOWN_CHARS characters, repr-quoted."""
    if len(line) > SHOWN_CHARS:
        line = line[:SHOWN_CHARS - 3] + "..."
    return repr(line)


# ------------------------------------------------------------------------------ the engine

def trace_schema(fmt: str, source_label: str, page_size: int):
    import pyarrow as pa

    return pa.schema(
        [("gpa", pa.uint64()), ("size", pa.uint16()), ("vcpu", pa.uint16()),
         ("kind", pa.uint8()), ("seq", pa.uint64())],
        metadata={b"sppjit.converted_from": fmt.encode(),
                  b"sppjit.source": os.path.basename(source_label).encode(),
                  b"sppjit.page_size": str(page_size).encode()},
    )


def run(parser_class: type[Parser], fmt: str, source: str, out: str, mapping_out: str, *,
        skip_bad: bool, page_size: int, chunk_lines: int,
        progress: Callable[[int, int | None], None] | None = None) -> ConvertResult:
    """Convert ``source`` to the trace ``out`` and the mapping ``mapping_out``, both or
    neither (the caller has checked the paths)."""
    import numpy as np
    import pyarrow as pa

    from sppjit.convert.mapping import PageMapper
    from sppjit.io.atomic import Outputs
    from sppjit.io.output import TableWriter
    from sppjit.provenance import record_vm

    if chunk_lines < 1:
        raise ValueError(f"chunk_lines must be positive, got {chunk_lines}")
    mapper = PageMapper(page_size)
    threads = Threads()
    result = ConvertResult(format=fmt, source=source, out=out, mapping_out=mapping_out,
                           page_size=mapper.page_size)

    def flush(records: Records, writer: TableWriter) -> None:
        if not len(records):
            return
        addr = np.array(records.addr, dtype=np.uint64)
        size = np.array(records.size, dtype=np.uint16)
        kind = np.array(records.kind, dtype=np.uint8)
        vcpu = np.array(records.vcpu, dtype=np.uint16)
        seq = np.array(records.seq, dtype=np.uint64)
        before = len(addr)
        addr, size, kind, vcpu, seq = mapper.split(addr, size, kind, vcpu, seq)
        result.split += len(addr) - before
        gpa = mapper.translate(addr)
        writer.write_batch(pa.record_batch(
            [pa.array(gpa), pa.array(size), pa.array(vcpu), pa.array(kind), pa.array(seq)],
            schema=writer.schema))
        result.accesses += len(gpa)
        result.vcpus = max(result.vcpus, int(vcpu.max()) + 1)

    def bad(lineno: int, line: str, error: BadLine) -> None:
        if not skip_bad:
            raise InputError(f"convert: {label}, line {lineno}: {error}: {shown(line)} "
                             "(--skip-bad skips such lines)") from None
        result.bad_lines += 1
        if result.first_bad_line is None:
            result.first_bad_line = lineno
            result.first_bad_reason = str(error)

    with contextlib.ExitStack() as stack:
        outputs = stack.enter_context(Outputs())
        lines, label = stack.enter_context(open_lines(source, progress))
        parser = parser_class(threads, label)
        schema = trace_schema(fmt, label, mapper.page_size)
        with TableWriter(out, schema, option="--out") as writer:
            lineno = 0
            while chunk := list(itertools.islice(lines, chunk_lines)):
                records = Records()
                parser.parse_chunk(chunk, lineno + 1, records, bad)
                lineno += len(chunk)
                flush(records, writer)
            result.lines = lineno
            if result.accesses == 0:
                what = f"no accesses in {label}"
                if result.bad_lines:
                    what += f" ({result.bad_lines:,} malformed lines skipped)"
                raise InputError(f"convert: {what}")
        outputs.add(out)
        # The VM it needs, for replay's defaults (known only now that the input is read).
        result.memory_bytes = mapper.memory_bytes
        record_vm(out, memory=result.replay_memory(), vcpus=max(result.vcpus, 1))
        mapping = mapper.table()
        if len(threads):
            meta = dict(mapping.schema.metadata or {})
            meta[b"sppjit.threads"] = json.dumps(threads.names()).encode()
            mapping = mapping.replace_schema_metadata(meta)
        with TableWriter(mapping_out, mapping.schema, option="--mapping-out") as writer:
            for batch in mapping.to_batches(max_chunksize=1 << 20):
                writer.write_batch(batch)
        outputs.add(mapping_out)

    result.pages = len(mapper)
    result.memory_bytes = mapper.memory_bytes
    result.threads = threads.names()
    return result
