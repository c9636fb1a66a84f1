"""Read an access trace as a lazy stream of checked, typed batches.

A trace may be longer than memory, so it is never read whole: every source becomes an iterator
of record batches, each checked and turned into the numpy arrays the kernels take, with the
original columns kept for the outputs.
"""

import itertools
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from sppjit.errors import InputError
from sppjit.io.columns import UINT64_MAX, BadValue, check_range, int_column, type_problem
from sppjit.io.formats import (
    ARROW_FILE_MAGIC,
    ARROW_STREAM_MARKER,
    PARQUET_MAGIC,
    cannot_read,
    read_magic,
    short_reason,
)
from sppjit.io.space import GPA_LIMIT

TRACE_COLUMNS = ("gpa", "size", "vcpu", "kind", "seq", "insn_len")
MAX_INSN_LEN = 15  # x86 instructions are at most 15 bytes
KIND_READ, KIND_WRITE, KIND_FETCH = 0, 1, 2
DEFAULT_SIZE = 8
DEFAULT_VCPU = 0
DEFAULT_KIND = KIND_WRITE
MAX_ACCESS_SIZE = 4096
MAX_VCPU = 0xFFFF

SCHEMA_VERSION = "1"
_VERSION_KEY = b"sppjit.schema_version"


def schema_metadata() -> dict[bytes, bytes]:
    """The metadata sppjit puts on every table it writes, so readers can refuse newer ones."""
    return {_VERSION_KEY: SCHEMA_VERSION.encode()}


@dataclass
class TraceBatch:
    """One checked batch of accesses: typed arrays for the kernels, the input for the outputs."""

    gpa: np.ndarray  # uint64, C-contiguous
    size: np.ndarray  # uint16, 1..MAX_ACCESS_SIZE
    vcpu: np.ndarray  # uint16
    kind: np.ndarray  # uint8: KIND_READ, KIND_WRITE or KIND_FETCH
    record_batch: pa.RecordBatch  # the input columns, unchanged
    first_row: int  # 0-based row of the whole trace at which this batch starts
    insn_len: np.ndarray  # uint8: length of the accessing instruction, 0 when unknown
    vcpus_checked: int | None = None  # every vcpu was checked to be below this; None: 0..MAX_VCPU
    gpa_max: int | None = None  # the largest gpa, when the check computed it (None: not known)

    def __len__(self) -> int:
        return len(self.gpa)


class TraceReader:
    """An iterator of TraceBatch over one trace, read lazily in bounded memory.

    ``schema`` is the input's schema, ``num_rows`` the trace length when the format records it
    (None for a stream), ``path`` the file or directory read (None for in-memory sources) and
    ``rows_seen`` the rows handed out so far. Iterating raises InputError at the first bad row.
    """

    def __init__(self, batches: Iterable[pa.RecordBatch], schema: pa.Schema, *,
                 num_rows: int | None, path: str | None, label: str, batch_size: int,
                 vcpus: int | None):
        self.schema = schema
        self.num_rows = num_rows
        self.path = path
        self.rows_seen = 0
        self._label = label
        self._vcpus = vcpus
        self._batches = _rebatch(_validated(batches, label), batch_size)
        self._defaults: dict[str, np.ndarray] = {}  # absent columns, shared by the batches

    def __iter__(self) -> "TraceReader":
        return self

    def __next__(self) -> TraceBatch:
        try:
            record_batch = next(self._batches)
        except (pa.ArrowException, OSError) as exc:
            # Truncation or corruption past the header shows up only while reading.
            raise cannot_read("trace", self._label, exc) from None
        batch = _check_batch(record_batch, self.rows_seen, self._vcpus, self._defaults)
        self.rows_seen += len(batch)
        return batch


def open_trace(source, *, batch_size: int = 1 << 20, vcpus: int | None = None) -> TraceReader:
    """Open a trace for streaming, checking its schema now and its values batch by batch.

    ``source`` is a path (Arrow IPC file or stream, Parquet file, or a directory of Parquet
    files), a pyarrow Table, RecordBatch, RecordBatchReader, ``pq.ParquetFile`` or
    ``pyarrow.dataset.Dataset``, a polars DataFrame (any object with ``to_arrow()``), any
    object exporting an Arrow C stream, a dict of column name -> numpy array or list, or an
    iterable of record batches (its first batch is read now, for the schema). A source of
    another kind is an InputError (``UnsupportedSource``, also a TypeError) here, not when
    the first batch is read. Batches hold at most ``batch_size`` rows. With ``vcpus``, a
    vcpu index outside the VM is an error.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if vcpus is not None and vcpus < 1:
        raise ValueError(f"vcpus must be positive, got {vcpus}")
    path = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    label = path if path is not None else f"the {type(source).__name__}"
    try:
        if path is not None:
            schema, batches, num_rows = _open_path(path, batch_size)
        else:
            schema, batches, num_rows = _open_object(source, batch_size)
        schema.names  # noqa: B018 - pyarrow decodes the names here, and each use again
    except UnicodeDecodeError:
        # Arrow names are UTF-8 by its format; a file breaking that can only be refused.
        raise cannot_read("trace", label, "a column name is not valid UTF-8") from None
    _check_schema(schema)
    return TraceReader(batches, schema, num_rows=num_rows, path=path, label=label,
                       batch_size=batch_size, vcpus=vcpus)


# ----------------------------------------------------------------------------------- sources

_Opened = tuple[pa.Schema, Iterable[pa.RecordBatch], int | None]


def _open_path(path: str, batch_size: int) -> _Opened:
    """Open a trace file or Parquet directory, telling the format by its magic bytes."""
    if os.path.isdir(path):
        return _open_dataset(path, batch_size)
    magic = read_magic(path, "trace")
    if not magic:
        raise cannot_read("trace", path, "the file is empty")
    try:
        if magic.startswith(PARQUET_MAGIC):
            # Buffered reads, not a memory map (a mapped file's pages would stay in this
            # process's RSS), and no pre-buffering (pyarrow would keep every row group's
            # buffers alive: measured, RSS grew with the trace, 636 MiB at 60 M rows, against
            # 166 MiB without).
            parquet = pq.ParquetFile(path, memory_map=False, pre_buffer=False)
            return (parquet.schema_arrow,
                    parquet.iter_batches(batch_size=batch_size, columns=None),
                    parquet.metadata.num_rows)
        if magic.startswith(ARROW_FILE_MAGIC):
            return _open_ipc_file(path)
        stream = ipc.open_stream(pa.OSFile(path, "rb"))
        return stream.schema, stream, None
    except (pa.ArrowException, OSError) as exc:
        if magic.startswith((PARQUET_MAGIC, ARROW_FILE_MAGIC, ARROW_STREAM_MARKER)):
            raise cannot_read("trace", path, exc) from None
        # Whatever pyarrow says about a CSV read as a stream would only confuse.
        text = magic.isascii() and (b"," in magic or magic[:1].isalpha())
        raise cannot_read("trace", path, "not an Arrow IPC file or stream, nor a Parquet file"
                          + ("; a CSV text trace? convert it first: sppjit convert csv "
                             f"{path} --out TRACE.parquet" if text else "")) from None


def _open_ipc_file(path: str) -> _Opened:
    """An Arrow IPC file, each batch read into memory as it is needed.

    Read, not memory-mapped: a mapped file that shrinks while it is replayed (another process
    truncating or rewriting it) kills the process with SIGBUS, where a read only comes up
    short and is reported as a truncated trace. The copy costs little beside the replay
    (measured: 60 M gpa-only rows, 480 MB, are read in ~0.06 s from the page cache), it holds
    one batch at a time, and it is what compressed files (Feather V2's default lz4, zstd)
    need anyway: their buffers are decompressed into memory, never in the file.
    """
    reader = ipc.open_file(pa.OSFile(path, "rb"))
    count = reader.num_record_batches
    num_rows = ipc_file_rows(path)

    def batches() -> Iterator[pa.RecordBatch]:
        for i in range(count):
            yield reader.get_batch(i)

    return reader.schema, batches(), num_rows


def ipc_file_rows(path: str) -> int:
    """The rows of an Arrow IPC file, from its batches' headers alone.

    Through a buffered file, pyarrow reads every batch's body to count its rows (measured:
    0.2-0.3 s for 800 MB); through a memory map it touches only the headers' pages (3 ms).
    The map lives for this call only, and touches nothing but pages the footer just read
    says are in the file: a file cut short in those milliseconds is the one case left in
    which a read would fault (the replay itself reads, never maps).
    """
    with pa.memory_map(path) as source:
        return ipc.open_file(source).count_rows()


def _open_dataset(path: str, batch_size: int) -> _Opened:
    """A directory of Parquet files, read in the natural order of their names.

    Discovery sorts names as text, so pyarrow's own "part-10" would come before "part-2";
    trace order is simulation order, hence the explicit natural sort.
    """
    # Imported here: pyarrow.dataset (and the compute module it loads) costs 80 ms of start-up
    # that a replay of one file never needs.
    import pyarrow.dataset as ds

    # Bounded memory for Parquet datasets too: no pre-buffered row groups, one batch read ahead.
    no_pre_buffer = ds.ParquetFragmentScanOptions(pre_buffer=False)
    try:
        found = ds.dataset(path, format="parquet")
        if not found.files:
            raise InputError(f"trace: {path} holds no Parquet files")
        files = sorted(found.files, key=_natural_key)
        dataset = ds.dataset(files, format="parquet", filesystem=found.filesystem)
        _check_same_schema(dataset)
        num_rows = dataset.count_rows()
    except (pa.ArrowException, OSError) as exc:
        raise cannot_read("trace", path, exc) from None
    except UnicodeDecodeError:
        # Arrow's file systems take UTF-8 paths only.
        raise cannot_read("trace", path, "it holds a file name that is not UTF-8") from None

    def scan() -> Iterator[pa.RecordBatch]:
        # Deferred so that a corrupt file is reported while iterating, like the other formats.
        yield from dataset.to_batches(batch_size=batch_size, fragment_scan_options=no_pre_buffer,
                                      batch_readahead=1, fragment_readahead=1)

    return dataset.schema, scan(), num_rows


def _check_same_schema(dataset: "pyarrow.dataset.FileSystemDataset") -> None:  # noqa: F821
    """Every file of a Parquet directory must have the first one's columns and types: the
    dataset would otherwise cast the others to them silently (a uint64 gpa read as int32)."""
    expected = dataset.schema.remove_metadata()
    for fragment in dataset.get_fragments():
        schema = fragment.physical_schema.remove_metadata()
        if not schema.equals(expected):
            first = dataset.files[0]
            differs = [f"'{field.name}' {field.type}" for field in schema
                       if expected.get_field_index(field.name) < 0
                       or expected.field(field.name).type != field.type]
            missing = [f"'{name}'" for name in expected.names if name not in schema.names]
            what = ", ".join(differs + [f"no {name}" for name in missing]) or "column order"
            raise InputError(f"trace: {fragment.path} differs from {first} in the same "
                             f"directory ({what}); every file of a directory trace must "
                             "have the same columns and types")


def _natural_key(name: str) -> list:
    """Sort key that orders digit runs by value: part-2 before part-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class UnsupportedSource(InputError, TypeError):
    """A trace source of a kind sppjit cannot read (an InputError, and a TypeError as a
    Python caller expects of an argument of the wrong type)."""


def _open_object(source, batch_size: int) -> _Opened:
    """An in-memory or caller-opened trace: Arrow objects as they are, a Parquet file or an
    Arrow dataset batch by batch, a dict of columns via pa.table, a polars frame through
    Arrow, any iterable of record batches."""
    if isinstance(source, pa.Table):
        return source.schema, source.to_batches(), source.num_rows
    if isinstance(source, pa.RecordBatch):
        return source.schema, [source], source.num_rows
    if isinstance(source, pa.RecordBatchReader):
        return source.schema, source, None
    if isinstance(source, pq.ParquetFile):
        # The caller's file, read as it was opened (memory map and pre-buffering are theirs).
        return (source.schema_arrow, source.iter_batches(batch_size=batch_size),
                source.metadata.num_rows)
    # A Dataset exists only once its module is loaded: no import (0.1 s) for other sources.
    dataset_module = sys.modules.get("pyarrow.dataset")
    if dataset_module is not None and isinstance(source, dataset_module.Dataset):
        return _open_arrow_dataset(source, batch_size)
    if isinstance(source, Mapping):
        try:
            table = pa.table({str(name): values for name, values in source.items()})
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise InputError(f"trace: cannot build a table from the given columns: "
                             f"{str(exc).splitlines()[0]}") from None
        return table.schema, table.to_batches(), table.num_rows
    if _is_polars_lazy(source):
        raise UnsupportedSource("trace: a polars LazyFrame is a query, not data: give "
                                "lazy.collect() (or open the files it scans by path)")
    if hasattr(source, "to_arrow") and not isinstance(source, (str, bytes)):
        # polars DataFrame (and pandas-like frames): an Arrow table, columns zero-copy where
        # the types allow. polars itself is never imported here.
        table = source.to_arrow()
        if isinstance(table, pa.Table):
            return table.schema, table.to_batches(), table.num_rows
    if hasattr(source, "__arrow_c_stream__"):  # DuckDB, nanoarrow, pandas and friends
        try:
            reader = pa.RecordBatchReader.from_stream(source)
        except (pa.ArrowException, TypeError, ValueError):  # a stream of arrays, not tables
            raise UnsupportedSource(_unsupported(source)) from None
        return reader.schema, reader, None
    if isinstance(source, Iterable) and not isinstance(source, (str, bytes, np.ndarray)):
        return _open_batches(source, label=type(source).__name__)
    raise UnsupportedSource(_unsupported(source))


_SOURCES = ("a path, a pyarrow Table, RecordBatch, RecordBatchReader, ParquetFile or Dataset, "
            "a polars DataFrame, a dict of columns, or an iterable of record batches")


def _unsupported(source) -> str:
    return f"trace: cannot read a trace from {type(source).__name__}: give {_SOURCES}"


def _is_polars_lazy(source) -> bool:
    return type(source).__module__.split(".")[0] == "polars" and hasattr(source, "collect") \
        and not hasattr(source, "to_arrow")


def _open_arrow_dataset(dataset, batch_size: int) -> _Opened:
    """A pyarrow Dataset in its own order, scanned with the bounded read-ahead of a Parquet
    directory; its row count when its files record one (Parquet, Arrow IPC)."""
    import pyarrow.dataset as ds

    num_rows = None
    if isinstance(dataset, ds.FileSystemDataset) and isinstance(
            dataset.format, (ds.ParquetFileFormat, ds.IpcFileFormat)):
        try:
            num_rows = dataset.count_rows()
        except (pa.ArrowException, OSError) as exc:
            raise cannot_read("trace", "the Dataset", exc) from None

    def scan() -> Iterator[pa.RecordBatch]:
        yield from dataset.to_batches(batch_size=batch_size, batch_readahead=1,
                                      fragment_readahead=1)

    return dataset.schema, scan(), num_rows


def _open_batches(source: Iterable, label: str) -> _Opened:
    """Any iterable of RecordBatch (or Table): its first item gives the schema, now; every
    later one must have the same."""
    items = iter(source)
    try:
        first = next(items)
    except StopIteration:
        raise InputError(f"trace: the {label} holds no record batches, so it has no "
                         "columns") from None
    if not isinstance(first, (pa.RecordBatch, pa.Table)):
        raise UnsupportedSource(f"trace: the {label} holds {type(first).__name__} items, not "
                                f"record batches: give {_SOURCES}")
    schema = first.schema

    def batches() -> Iterator[pa.RecordBatch]:
        for index, item in enumerate(itertools.chain([first], items)):
            if not isinstance(item, (pa.RecordBatch, pa.Table)):
                raise InputError(f"trace: item {index} of the {label} is a "
                                 f"{type(item).__name__}, not a record batch")
            if not item.schema.equals(schema):
                raise InputError(f"trace: batch {index} of the {label} has other columns or "
                                 "types than its first batch")
            yield from (item.to_batches() if isinstance(item, pa.Table) else [item])

    return schema, batches(), None


def _validated(batches: Iterable[pa.RecordBatch], label: str) -> Iterator[pa.RecordBatch]:
    """Batches whose buffers were checked to hold what their schema says, before anything
    reads them.

    Columns other than sppjit's are passed through to the outputs unread, and a corrupt one
    (a string column whose offsets point past its data) would make the writer read out of
    bounds. Every column gets the cheap check (buffer sizes against the length, constant
    time); columns whose values index other buffers (offsets, dictionaries, views, nested
    and union children) also get the full one, which reads them: a trace of integer columns
    (gpa, size, ...) pays nothing per row.
    """
    for batch in batches:
        for index, field in enumerate(batch.schema):
            try:
                batch.column(index).validate(full=_indexes_buffers(field.type))
            except pa.ArrowException as exc:
                raise InputError(f"trace: column '{field.name}' of {label} is corrupt: "
                                 f"{short_reason(exc)}") from None
        yield batch


def _indexes_buffers(arrow_type: pa.DataType) -> bool:
    """Whether values of this type hold offsets or indices into other buffers."""
    return not (pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)
                or pa.types.is_boolean(arrow_type) or pa.types.is_null(arrow_type)
                or pa.types.is_temporal(arrow_type) or pa.types.is_decimal(arrow_type)
                or pa.types.is_fixed_size_binary(arrow_type))


def _rebatch(batches: Iterable[pa.RecordBatch], batch_size: int) -> Iterator[pa.RecordBatch]:
    """Batches of at most ``batch_size`` rows, copying only to merge small ones.

    Large batches are sliced (zero-copy); consecutive batches smaller than ``batch_size`` are
    merged so that a trace written in tiny batches does not pay the per-batch cost each time.
    Empty batches are dropped.
    """
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        if pending and pending_rows + batch.num_rows > batch_size:
            yield _merge(pending)
            pending, pending_rows = [], 0
        start = 0
        while batch.num_rows - start >= batch_size:
            yield batch.slice(start, batch_size)
            start += batch_size
        if start < batch.num_rows:
            pending.append(batch.slice(start) if start else batch)
            pending_rows += batch.num_rows - start
    if pending:
        yield _merge(pending)


def _merge(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    """One batch from several (a lone batch passes through without a copy)."""
    if len(batches) == 1:
        return batches[0]
    table = pa.Table.from_batches(batches, schema=batches[0].schema).combine_chunks()
    return table.to_batches()[0]


# ----------------------------------------------------------------------------------- checks

def _check_schema(schema: pa.Schema) -> None:
    """Refuse a trace whose schema cannot be right, before any batch is read."""
    version = (schema.metadata or {}).get(_VERSION_KEY)
    if version is not None and version != SCHEMA_VERSION.encode():
        raise InputError(f"trace: schema version {version.decode(errors='replace')} is not "
                         f"supported (this sppjit reads {SCHEMA_VERSION})")
    for name in TRACE_COLUMNS:
        count = len(schema.get_all_field_indices(name))
        if count > 1:
            raise InputError(f"trace: column '{name}' appears {count} times")
        if count and (problem := type_problem(name, schema.field(name).type)):
            raise InputError(f"trace: {problem}")
    if "gpa" not in schema.names:
        raise InputError("trace: column 'gpa' is missing")


def _check_batch(batch: pa.RecordBatch, first_row: int, vcpus: int | None,
                 defaults: dict[str, np.ndarray] | None = None) -> TraceBatch:
    """Typed arrays of one batch; InputError for the earliest bad row over all columns.

    ``defaults`` keeps the arrays of absent columns (size, vcpu, ...) from one batch to the
    next: nothing writes them, and filling 3 x 8 MiB a batch cost 0.2 s per 100 M rows of a
    gpa-only trace."""
    problems: list[BadValue] = []
    rows = batch.num_rows

    def column(name: str, dtype: type[np.integer], default: int, lo: int, hi: int,
               must: str) -> np.ndarray | None:
        if batch.schema.get_field_index(name) < 0:
            if defaults is None:
                return np.full(rows, default, dtype)
            kept = defaults.get(name)
            if kept is None or kept.shape[0] < rows:
                kept = defaults[name] = np.full(rows, default, dtype)
            return kept[:rows]
        try:
            return int_column(batch.column(name), name=name, dtype=dtype, lo=lo, hi=hi,
                              must=must, first_row=first_row)
        except BadValue as bad:
            problems.append(bad)
            return None

    gpa = column("gpa", np.uint64, 0, 0, UINT64_MAX, "")
    size = column("size", np.uint16, DEFAULT_SIZE, 1, MAX_ACCESS_SIZE,
                  f"(must be 1..{MAX_ACCESS_SIZE})")
    if vcpus is None:
        vcpu = column("vcpu", np.uint16, DEFAULT_VCPU, 0, MAX_VCPU, f"(must be 0..{MAX_VCPU})")
    else:
        vcpu = column("vcpu", np.uint16, DEFAULT_VCPU, 0, vcpus - 1, _beyond_vm(vcpus))
    kind = column("kind", np.uint8, DEFAULT_KIND, KIND_READ, KIND_FETCH,
                  "(must be 0 read, 1 write, 2 fetch)")
    if batch.schema.get_field_index("seq") >= 0:  # passed through, but never null
        column("seq", np.uint64, 0, 0, UINT64_MAX, "")
    insn_len = column("insn_len", np.uint8, 0, 0, MAX_INSN_LEN,
                      f"(an instruction is 1..{MAX_INSN_LEN} bytes; 0 = unknown)")
    gpa_max = int(gpa.max()) if gpa is not None and len(gpa) else None
    if gpa is not None and size is not None:
        _check_end(gpa, size, first_row, problems, gpa_max)
    if problems:
        raise InputError("trace: " + min(problems, key=lambda bad: bad.row).message)
    return TraceBatch(gpa=gpa, size=size, vcpu=vcpu, kind=kind, record_batch=batch,
                      first_row=first_row, insn_len=insn_len, vcpus_checked=vcpus, gpa_max=gpa_max)


def _beyond_vm(vcpus: int) -> str:
    return f"but the VM has {vcpus} vCPU{'s' if vcpus != 1 else ''}"


def check_vcpus(batch: TraceBatch, vcpus: int) -> None:
    """InputError at the first vcpu of ``batch`` that a VM with ``vcpus`` vCPUs lacks, as
    open_trace(vcpus=...) reports it; nothing to do when the batch was read that way."""
    if batch.vcpus_checked is not None and batch.vcpus_checked <= vcpus:
        return
    try:
        check_range(batch.vcpu, "vcpu", 0, vcpus - 1, _beyond_vm(vcpus), batch.first_row)
    except BadValue as bad:
        raise InputError("trace: " + bad.message) from None


BEYOND_SPACE = "ends beyond the 48-bit guest-physical space"


def first_beyond(gpa: np.ndarray, size: np.ndarray, gpa_max: int | None = None) -> int:
    """The index of the first access that ends beyond the 48-bit guest-physical space
    (gpa + size > 2**48), or -1. ``gpa_max``: gpa.max(), when the caller has it."""
    if not len(gpa):
        return -1
    if gpa_max is None:
        gpa_max = int(gpa.max())
    if gpa_max <= GPA_LIMIT - MAX_ACCESS_SIZE:
        return -1  # the common case: one pass, no temporary arrays
    beyond = gpa > np.uint64(GPA_LIMIT) - size.astype(np.uint64)
    return int(np.argmax(beyond)) if beyond.any() else -1


def _check_end(gpa: np.ndarray, size: np.ndarray, first_row: int,
               problems: list[BadValue], gpa_max: int | None) -> None:
    """Every access must end inside the 48-bit guest-physical space (gpa + size <= 2**48)."""
    i = first_beyond(gpa, size, gpa_max)
    if i >= 0:
        row = first_row + i
        problems.append(BadValue(row, f"access at row {row} {BEYOND_SPACE}"))
