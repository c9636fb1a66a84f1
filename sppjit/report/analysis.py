"""Per-page and per-sub-page statistics and exits per epoch, from a replay's outputs.

The results (``sppjit replay --out``) and the exit log (``--exits``) are read together, batch by
batch and with only the columns needed, so memory grows with the number of distinct pages and
sub-pages, never with the trace. Up to KERNEL_ROWS results rows, each batch is grouped with
numpy (counting or sorting, reduceat) and the partial groups are merged into running sorted
tables, compacted when they grow; from KERNEL_ROWS on, a compiled kernel (kernels/report.py)
attributes each batch row by row into running hash tables, several times faster, with the
same figures and errors (tests/test_report_kernel.py). The attribution rules are in the
package's docstring (sppjit.report).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from sppjit import __version__
from sppjit import bits as B
from sppjit.errors import InputError
from sppjit.io.columns import UINT64_MAX, BadValue, int_column, type_problem
from sppjit.io.formats import (
    ARROW_FILE_MAGIC,
    ARROW_STREAM_MARKER,
    PARQUET_MAGIC,
    cannot_read,
    read_magic,
)
from sppjit.io.space import GPA_LIMIT
from sppjit.io.trace import (
    BEYOND_SPACE,
    DEFAULT_KIND,
    DEFAULT_SIZE,
    MAX_ACCESS_SIZE,
    first_beyond,
    ipc_file_rows,
    schema_metadata,
)
from sppjit.summary import ReplaySummary

from .options import DEFAULT_EPOCHS

TEXT_TOP = 10  # pages listed in the printed report and in report.json
BATCH_ROWS = 1 << 18  # results rows per batch: a batch of 4 KiB writes expands 33 times
COMPACT_ROWS = 1 << 20  # pending grouped rows merged into the running table past this

KINDS = B.EXIT_KIND_NAMES
PROTECTION_KINDS = (B.EXIT_KIND_SPP_VIOLATION, B.EXIT_KIND_WRITE_PROTECT)

_PAGE = np.uint64(B.PAGE_SHIFT)
_SUB = np.uint64(B.SUBPAGE_SHIFT)
_SUB_PER_PAGE_SHIFT = np.uint64(B.PAGE_SHIFT - B.SUBPAGE_SHIFT)  # 5: 32 sub-pages
_KIND_VALUES = pa.array(list(KINDS), type=pa.string())

# Per-page count columns as accumulated (accesses = reads + writes + fetches at the end).
_PAGE_SUMS = ("reads", "writes", "fetches", *KINDS, "relevant", "irrelevant", "exits",
              "violations")
_P = {name: i for i, name in enumerate(_PAGE_SUMS)}
_PAGE_COLUMNS = ("accesses", "reads", "writes", "fetches", "exits", *KINDS, "violations",
                 "relevant", "irrelevant")
_SUBPAGE_SUMS = ("writes", "violations", "relevant", "irrelevant")


# ============================================================================ reading inputs

@dataclass
class _Source:
    """A table read batch by batch: its row count up front, then bounded batches."""

    what: str  # "results" or "exits", for messages
    label: str  # the path, or a description of the object
    path: str | None
    format: str  # parquet, arrow, arrow-stream, memory
    num_rows: int
    names: list[str]
    _open: object  # () -> iterator of RecordBatch with the selected columns
    types: dict = field(default_factory=dict)  # name -> Arrow type, of names that appear once

    def batches(self, batch_size: int) -> Iterator[pa.RecordBatch]:
        try:
            for batch in self._open():
                for start in range(0, batch.num_rows, batch_size):
                    yield batch.slice(start, batch_size)
        except (pa.ArrowException, OSError) as exc:  # truncation shows only while reading
            raise cannot_read(self.what, self.label, exc) from None


def _types(schema: pa.Schema) -> dict:
    names = schema.names
    return {f.name: f.type for f in schema if names.count(f.name) == 1}


def _open_source(source, what: str, wanted: tuple[str, ...]) -> _Source:
    """Open results or an exit log for streaming, reading only the ``wanted`` columns that
    exist (the callers check which are required)."""
    if isinstance(source, (str, os.PathLike)):
        return _open_path(os.fspath(source), what, wanted)
    if isinstance(source, pa.RecordBatch):
        source = pa.Table.from_batches([source])
    elif isinstance(source, pa.RecordBatchReader):
        source = source.read_all()  # a reader is read once, and the epochs need the row count
    if not isinstance(source, pa.Table):
        raise TypeError(f"{what}: give a path, a pyarrow Table or RecordBatch, or a "
                        f"ReplayResult, not {type(source).__name__}")
    names = [n for n in wanted if n in source.schema.names]
    table = source.select(names)
    return _Source(what, f"the {what} table", None, "memory", table.num_rows,
                   source.schema.names, lambda: iter(table.to_batches()),
                   _types(source.schema))


def _open_path(path: str, what: str, wanted: tuple[str, ...]) -> _Source:
    magic = read_magic(path, what)
    if not magic:
        raise cannot_read(what, path, "the file is empty")
    try:
        if magic.startswith(PARQUET_MAGIC):
            parquet = pq.ParquetFile(path, memory_map=False)
            all_names = parquet.schema_arrow.names
            names = [n for n in wanted if n in all_names]
            num_rows = parquet.metadata.num_rows

            def read_parquet():
                # A fresh file object per pass: iter_batches is not restartable.
                f = pq.ParquetFile(path, memory_map=False)
                return f.iter_batches(batch_size=BATCH_ROWS, columns=names)

            return _Source(what, path, path, "parquet", num_rows, all_names, read_parquet,
                           _types(parquet.schema_arrow))
        if magic.startswith(ARROW_FILE_MAGIC):
            # Read, not memory-mapped (a mapped file's pages count in this process's RSS:
            # 1.2 GB for 100 M results rows; and a file that shrinks would kill it with
            # SIGBUS), batch by batch, and only the wanted columns' buffers are read.
            schema = ipc.open_file(pa.OSFile(path, "rb")).schema
            all_names = schema.names
            names = [n for n in wanted if n in all_names]
            fields = [all_names.index(n) for n in names]
            num_rows = ipc_file_rows(path)

            def read_file():
                r = ipc.open_file(pa.OSFile(path, "rb"),
                                  options=ipc.IpcReadOptions(included_fields=fields))
                return (r.get_batch(i).select(names) for i in range(r.num_record_batches))

            return _Source(what, path, path, "arrow", num_rows, all_names, read_file,
                           _types(schema))

        def read_stream():
            r = ipc.open_stream(pa.OSFile(path, "rb"))
            names = [n for n in wanted if n in r.schema.names]
            return (b.select(names) for b in r)

        stream = ipc.open_stream(pa.OSFile(path, "rb"))
        all_names = stream.schema.names
        num_rows = sum(b.num_rows for b in stream)  # a stream says its length only at its end
        return _Source(what, path, path, "arrow-stream", num_rows, all_names, read_stream,
                       _types(stream.schema))
    except (pa.ArrowException, OSError) as exc:
        if magic.startswith((PARQUET_MAGIC, ARROW_FILE_MAGIC, ARROW_STREAM_MARKER)):
            raise cannot_read(what, path, exc) from None
        raise cannot_read(what, path, "not a Parquet file nor an Arrow IPC file or stream "
                                      f"(the {what} of sppjit replay are one of these)") from None


def _require(src: _Source, columns: tuple[str, ...], hint: str) -> None:
    for name in columns:
        if name not in src.names:
            raise InputError(f"{src.what}: {src.label} has no column '{name}' ({hint})")


def _int_column(batch: pa.RecordBatch, name: str, dtype, src: _Source, first_row: int, *,
                default: int | None = None, hi: int = UINT64_MAX, lo: int = 0,
                must: str = "") -> np.ndarray:
    """A column as a numpy array of ``dtype``, checked by sppjit.io.columns as every input's
    columns are (no nulls, no negatives, ``lo..hi``); ``default`` everywhere when absent.
    InputError names the input, the column and the first bad row."""
    if name not in batch.schema.names:
        return np.full(batch.num_rows, default, dtype=dtype)
    column = batch.column(name)
    problem = type_problem(name, column.type)
    try:
        if problem is not None:
            raise BadValue(first_row, problem)
        return int_column(column, name=name, dtype=dtype, lo=lo, hi=hi, must=must,
                          first_row=first_row)
    except BadValue as bad:
        raise InputError(f"{src.what}: {src.label}: {bad.message}") from None


# ============================================================================ grouping

def group_keys(keys: np.ndarray):
    """Sort ``keys`` into groups: (unique sorted keys, group of each key, sort order, start of
    each group in sorted order)."""
    order = np.argsort(keys)
    k = keys[order]
    head = np.ones(k.shape[0], dtype=bool)
    if k.shape[0]:
        np.not_equal(k[1:], k[:-1], out=head[1:])
    inverse = np.empty(k.shape[0], dtype=np.int64)
    inverse[order] = np.cumsum(head) - 1
    return k[head], inverse, order, np.flatnonzero(head)


INDEX_SPAN = 1 << 22  # a running table whose keys span at most this is indexed directly (32 MiB)
DENSE_SLACK = 1 << 16  # a batch's keys are counted densely when they span at most 4 n + this


def group_index(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique sorted keys, group of each key): ``group_keys`` without the sort order.

    Keys that span little (a working set: the pages or sub-pages of one batch usually do)
    are grouped by counting, in time and memory linear in the batch: no sort, which cost
    three quarters of a report's time. Keys spread wider are sorted (group_keys)."""
    n = keys.shape[0]
    if n == 0:
        return keys.astype(np.uint64), np.zeros(0, dtype=np.int64)
    lo = keys.min()
    span = int(keys.max() - lo) + 1
    if span > 4 * n + DENSE_SLACK:
        unique, inverse, _, _ = group_keys(keys)
        return unique, inverse
    offset = (keys - lo).astype(np.intp)
    present = np.zeros(span, dtype=bool)
    present[offset] = True
    unique = np.flatnonzero(present)
    rank = np.cumsum(present, dtype=np.int64) - 1
    return unique.astype(np.uint64) + np.uint64(lo), rank[offset]


def _extremes(inverse: np.ndarray, rows: np.ndarray, groups: int):
    """(min, max) of ``rows`` per group."""
    lo = np.full(groups, np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full(groups, -1, dtype=np.int64)
    np.minimum.at(lo, inverse, rows)
    np.maximum.at(hi, inverse, rows)
    return lo, hi


def _counts(inverse: np.ndarray, category: np.ndarray, ngroups: int, ncats: int) -> np.ndarray:
    """counts[c, g]: how many rows of group g have category c (one bincount pass)."""
    flat = np.bincount(inverse * ncats + category, minlength=ngroups * ncats)
    return flat.reshape(ngroups, ncats).T


class _Grouped:
    """A running group-by (key -> summed count columns, and with ``extremes`` the min and max
    row) over many batches, in memory proportional to the distinct keys.

    Each batch arrives grouped on its own. Its keys already in the sorted running table are
    added in place (binary search); the new ones pile up until they hold half as many keys as
    the table (or COMPACT_ROWS), and are then grouped together and inserted in one pass. Every
    row is thus sorted a logarithmic number of times and the insertions cost O(1) per row.
    """

    def __init__(self, ncols: int, extremes: bool = False):
        self.ncols = ncols
        self.extremes = extremes
        self._table: tuple | None = None  # (keys, sums[ncols, n], mins, maxs)
        self._parts: list[tuple] = []
        self._pending = 0
        self._index = None  # (first key, position of each key - first, -1: none), or False

    def add(self, keys, sums, mins=None, maxs=None) -> None:
        """A grouped part: unique sorted keys, sums[ncols, len(keys)], min and max rows."""
        if keys.shape[0] == 0:
            return
        part = (keys, sums, mins, maxs) if self.extremes else (keys, sums, None, None)
        if self._table is None:
            self._table, self._index = part, None
            return
        new, _ = self._update(part)
        if not new.any():
            return
        self._parts.append(_select(part, new))
        self._pending += int(np.count_nonzero(new))
        if self._pending > max(self._table[0].shape[0] // 2, COMPACT_ROWS):
            self._insert(self._combine())

    def _update(self, part):
        """Add the part's rows whose keys the table holds; returns (mask of the other rows,
        their insertion positions)."""
        keys, sums, mins, maxs = self._table
        bkeys, bsums, bmins, bmaxs = part
        if bkeys.shape == keys.shape and np.array_equal(bkeys, keys):
            # The same keys as the table (a working set seen again): add whole rows.
            sums += bsums
            if self.extremes:
                np.minimum(mins, bmins, out=mins)
                np.maximum(maxs, bmaxs, out=maxs)
            return np.zeros(bkeys.shape[0], dtype=bool), None
        pos, found = self._positions(bkeys)
        at = pos[found]  # distinct positions: plain fancy-index updates are exact
        sums[:, at] += bsums[:, found]
        if self.extremes:
            mins[at] = np.minimum(mins[at], bmins[found])
            maxs[at] = np.maximum(maxs[at], bmaxs[found])
        return ~found, pos

    def _positions(self, bkeys):
        """(position of each key in the table, or where it would be inserted; whether the
        table holds it). Through a direct index of the table's keys when they span at most
        INDEX_SPAN (a binary search per key cost a fifth of a report), else searched."""
        keys = self._table[0]
        if self._index is None:
            span = int(keys[-1] - keys[0]) + 1
            if span <= INDEX_SPAN:
                index = np.full(span, -1, dtype=np.int64)
                index[(keys - keys[0]).astype(np.intp)] = np.arange(keys.shape[0])
                self._index = (keys[0], index)
            else:
                self._index = False
        if self._index:
            base, index = self._index
            offset = bkeys - base  # keys below the base wrap around to huge offsets
            if bkeys[0] >= base and offset[-1] < index.shape[0]:  # bkeys are sorted
                pos = index[offset.astype(np.intp)]
                found = pos >= 0
                if not found.all():
                    pos[~found] = np.searchsorted(keys, bkeys[~found])
                return pos, found
        pos = np.searchsorted(keys, bkeys)
        return pos, keys[np.minimum(pos, keys.shape[0] - 1)] == bkeys

    def _combine(self):
        """The pending parts as one grouped part."""
        parts, self._parts, self._pending = self._parts, [], 0
        if len(parts) == 1:
            return parts[0]
        keys, _, order, starts = group_keys(np.concatenate([p[0] for p in parts]))
        sums = np.concatenate([p[1] for p in parts], axis=1)[:, order]
        merged = np.empty((self.ncols, keys.shape[0]), dtype=np.int64)
        for c in range(self.ncols):
            merged[c] = np.add.reduceat(sums[c], starts)
        mins = maxs = None
        if self.extremes:
            mins = np.minimum.reduceat(np.concatenate([p[2] for p in parts])[order], starts)
            maxs = np.maximum.reduceat(np.concatenate([p[3] for p in parts])[order], starts)
        return keys, merged, mins, maxs

    def _insert(self, part) -> None:
        """Merge a grouped part into the sorted running table."""
        new, pos = self._update(part)
        if not new.any():
            return
        where = pos[new]
        keys, sums, mins, maxs = self._table
        bkeys, bsums, bmins, bmaxs = _select(part, new)
        self._index = None  # the positions move
        self._table = (np.insert(keys, where, bkeys), np.insert(sums, where, bsums, axis=1),
                       None if mins is None else np.insert(mins, where, bmins),
                       None if maxs is None else np.insert(maxs, where, bmaxs))

    def result(self):
        """(keys, sums[ncols, n], mins, maxs), sorted by key; mins / maxs None without
        ``extremes``."""
        if self._table is None:
            empty = np.zeros(0, dtype=np.int64)
            return (np.zeros(0, dtype=np.uint64), np.zeros((self.ncols, 0), dtype=np.int64),
                    empty, empty)
        if self._parts:
            self._insert(self._combine())
        return self._table


def _select(part, mask):
    keys, sums, mins, maxs = part
    return (keys[mask], sums[:, mask], None if mins is None else mins[mask],
            None if maxs is None else maxs[mask])


def _expand(q0: np.ndarray, q1: np.ndarray) -> np.ndarray:
    """Every integer of the inclusive ranges q0[i]..q1[i] (uint64), concatenated."""
    lengths = (q1 - q0).astype(np.int64) + 1
    total = int(lengths.sum())
    if total == q0.shape[0]:
        return q0
    first = np.cumsum(lengths) - lengths
    step = np.arange(total, dtype=np.int64) - np.repeat(first, lengths)
    return np.repeat(q0, lengths) + step.astype(np.uint64)


# ============================================================================ the exit log

class _ExitCursor:
    """The exit log read alongside the results: for each results batch, the exits of its rows.

    The log of ``sppjit replay`` is in trace-row order; a log that is not is refused (sort it
    by ``row`` first, stably, to keep the order of the exits of one access).
    """

    def __init__(self, src: _Source, batch_size: int):
        self.src = src
        self.hooks = "relevant" in src.names
        self._batches = src.batches(batch_size)
        self._seen = 0  # log rows read
        self._last = -1  # trace row of the last exit read
        self._buf = self._empty()
        self._done = False
        self.count = 0

    @staticmethod
    def _empty():
        return (np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.int64),
                np.zeros(0, np.int8))

    def _pull(self) -> None:
        batch = next(self._batches, None)
        if batch is None:
            self._done = True
            return
        src, first = self.src, self._seen
        row = _int_column(batch, "row", np.int64, src, first)
        gpa = _int_column(batch, "gpa", np.uint64, src, first)
        kinds = batch.column("kind")
        if not (pa.types.is_string(kinds.type) or pa.types.is_large_string(kinds.type)
                or pa.types.is_dictionary(kinds.type)):
            raise InputError(f"exits: {src.label}: column 'kind' has type {kinds.type}, not "
                             "string")
        code = pc.index_in(kinds.cast(pa.string()), value_set=_KIND_VALUES)
        if code.null_count:
            i = int(np.argmax(code.is_null().to_numpy(zero_copy_only=False)))
            raise InputError(f"exits: {src.label}: unknown exit kind {kinds[i].as_py()!r} at "
                             f"log row {first + i} (one of {', '.join(KINDS)})")
        kind = code.to_numpy(zero_copy_only=False).astype(np.int64)
        if self.hooks:
            rel = batch.column("relevant")
            relevant = rel.cast(pa.int8()).fill_null(-1).to_numpy(zero_copy_only=False)
        else:
            relevant = np.full(batch.num_rows, -1, dtype=np.int8)
        if row.size:
            steps = np.diff(np.concatenate(([self._last], row)))
            if (steps < 0).any():
                i = int(np.argmax(steps < 0))
                raise InputError(f"exits: {src.label}: rows are not in trace order (log row "
                                 f"{first + i} has trace row {int(row[i])} after "
                                 f"{int(row[i - 1]) if i else self._last}); sort by row")
            self._last = int(row[-1])
        self._seen += batch.num_rows
        self._buf = tuple(np.concatenate((a, b)) for a, b in
                          zip(self._buf, (row, gpa, kind, relevant.astype(np.int8))))

    def take(self, stop_row: int):
        """(row, gpa, kind, relevant) of the exits of trace rows before ``stop_row``."""
        while not self._done and (self._buf[0].size == 0 or self._buf[0][-1] < stop_row):
            self._pull()
        k = int(np.searchsorted(self._buf[0], stop_row, side="left"))
        out = tuple(a[:k] for a in self._buf)
        self._buf = tuple(a[k:] for a in self._buf)
        self.count += k
        return out

    def finish(self, rows: int) -> None:
        """Refuse exits of rows beyond the results."""
        while not self._done:
            self._pull()
        if self._buf[0].size:
            raise InputError(f"exits: {self.src.label}: an exit of trace row "
                             f"{int(self._buf[0][0])} but the results have {rows:,} rows: "
                             "the exit log and the results are not from the same replay")


# ============================================================================ analysis

@dataclass
class ReportStats:
    """What ``analyze`` computes; every table is a pyarrow Table."""

    per_page: pa.Table
    per_subpage: pa.Table
    epochs: pa.Table
    totals: dict
    rows: int
    exit_log: bool  # kinds known (an exit log was read)
    hooks: bool  # the exit log carried hook relevance
    inputs: dict = field(default_factory=dict)  # results / exits: path, format, rows
    warnings: list[str] = field(default_factory=list)


def _unwrap(results, exits):
    """A ReplayResult stands for its table, and for its exit log unless one is given."""
    if hasattr(results, "table") and hasattr(results, "exits") and hasattr(results, "summary"):
        return results.table, exits if exits is not None else results.exits
    return results, exits


def page_stats(results, exits=None, *, batch_size: int = BATCH_ROWS) -> tuple[pa.Table, pa.Table]:
    """Per-page and per-sub-page statistics of a replay: (per_page, per_subpage).

    per_page: gfn, accesses, reads, writes, fetches, exits, one column per exit kind (null
    without an exit log), violations (spp_violation + write_protect), relevant and irrelevant
    (when the exit log has hook relevance), first_row, last_row. per_subpage: gfn, subpage
    (0..31), writes, violations; only sub-pages with a write or a violation. Both sorted.
    """
    stats = analyze(results, exits, epochs=1, batch_size=batch_size)
    return stats.per_page, stats.per_subpage


class _ExitTotals:
    """What the exit log adds up to: exits by kind in all and per epoch, protection exits per
    epoch, relevant and irrelevant exits (analyze and analyze_exit_log alike)."""

    def __init__(self, n: int, n_epochs: int):
        self.n, self.n_epochs = n, n_epochs
        self.epoch_exits = np.zeros(n_epochs, dtype=np.int64)
        self.epoch_violations = np.zeros(n_epochs, dtype=np.int64)
        self.epoch_kinds = np.zeros((len(KINDS), n_epochs), dtype=np.int64)
        self.kinds = np.zeros(len(KINDS), dtype=np.int64)
        self.relevant = self.irrelevant = 0

    def add(self, erow, ekind, erel, prot) -> None:
        """One batch of the exit log: rows, kinds, relevance (-1 null), protection mask."""
        self.kinds += np.bincount(ekind, minlength=len(KINDS))
        self.relevant += int(np.count_nonzero(erel == 1))
        self.irrelevant += int(np.count_nonzero(erel == 0))
        eepoch = erow * self.n_epochs // self.n
        self.epoch_kinds += _counts(eepoch, ekind, self.n_epochs, len(KINDS))
        self.epoch_exits += np.bincount(eepoch, minlength=self.n_epochs)
        self.epoch_violations += np.bincount(eepoch[prot], minlength=self.n_epochs)


# From this many results rows on, a report goes through the compiled kernel (kernels/report.py):
# importing numba and loading the kernel from its cache cost about 0.45 s more than the numpy
# path's start, which the kernel (about 50 M rows/s against 10 M) wins back from about 6 M rows
# on (docs/performance.md, "sppjit report").
KERNEL_ROWS = 6_000_000
ENGINES = ("auto", "numpy", "jit")
# The results' column types sppjit replay writes: the kernel reads them as they are (one
# compiled signature); results in other integer types go through numpy.
_KERNEL_TYPES = {"gpa": pa.uint64(), "size": pa.uint16(), "kind": pa.uint8(),
                 "outcome": pa.uint8(), "exits": pa.uint8()}
_DEFAULTS = {"size": (DEFAULT_SIZE, np.uint16), "kind": (DEFAULT_KIND, np.uint8)}
DENSE_WINDOW = INDEX_SPAN  # the most keys a dense window of the kernel's tables holds


class _Totals:
    """What every batch of results adds to, whichever path: rows and writes per epoch, the
    access kinds and outcomes, the results' exits, and the exit log's totals (``log``, which
    also holds the exits and violations per epoch)."""

    def __init__(self, n: int, n_epochs: int):
        self.ep_start = _epoch_starts(n, n_epochs)
        self.ep_accesses = np.zeros(n_epochs, dtype=np.int64)
        self.ep_writes = np.zeros(n_epochs, dtype=np.int64)
        self.kinds = np.zeros(3, dtype=np.int64)
        self.outcomes = np.zeros(len(B.OUTCOME_NAMES), dtype=np.int64)
        self.results_exits = 0
        self.log = _ExitTotals(n, n_epochs)


def _batch_columns(batch: pa.RecordBatch, res: _Source, first: int):
    """gpa, size, kind, outcome, exits of a results batch, checked (InputError at the first bad
    row, column by column), and every access ending inside the 48-bit guest-physical space,
    as a trace's must (a replay's results hold no other)."""
    gpa = _int_column(batch, "gpa", np.uint64, res, first)
    size = _int_column(batch, "size", np.uint64, res, first, default=DEFAULT_SIZE, lo=1,
                       hi=MAX_ACCESS_SIZE, must=f"(must be 1..{MAX_ACCESS_SIZE})")
    kind = _int_column(batch, "kind", np.int64, res, first, default=DEFAULT_KIND,
                       hi=B.ACCESS_FETCH, must="(must be 0 read, 1 write, 2 fetch)")
    outcome = _int_column(batch, "outcome", np.int64, res, first, hi=len(B.OUTCOME_NAMES) - 1,
                          must=f"(must be 0..{len(B.OUTCOME_NAMES) - 1})")
    nexits = _int_column(batch, "exits", np.int64, res, first)
    i = first_beyond(gpa, size)  # (past it, the arithmetic below cannot wrap around)
    if i >= 0:
        raise InputError(f"results: {res.label}: access at row {first + i} {BEYOND_SPACE}")
    return gpa, size, kind, outcome, nexits


def _outside(log: _ExitCursor, erow, egpa, gpa, size, first: int, j: int) -> InputError:
    """The error for exit ``j`` of a batch, whose gpa is outside its row's access."""
    i = int(erow[j]) - first
    return InputError(
        f"exits: {log.src.label}: the exit of trace row {int(erow[j])} (gpa "
        f"{int(egpa[j]):#x}) is outside that row's access in the results (gpa "
        f"{int(gpa[i]):#x}, {int(size[i])} bytes): the exit log and the "
        "results are not from the same replay")


def _protection(ekind: np.ndarray) -> np.ndarray:
    return (ekind == PROTECTION_KINDS[0]) | (ekind == PROTECTION_KINDS[1])


def _numpy_batch(batch, first: int, res: _Source, log: _ExitCursor | None, t: _Totals,
                 pages: _Grouped, subpages: _Grouped, n: int) -> None:
    """One batch of results (and the exits of its rows), grouped with numpy into parts of the
    running tables ``pages`` and ``subpages``."""
    m = batch.num_rows
    n_epochs = t.ep_start.shape[0]
    gpa, size, kind, outcome, nexits = _batch_columns(batch, res, first)
    rows = np.arange(first, first + m, dtype=np.int64)
    end = gpa + size  # one past the last byte
    p0, p1 = gpa >> _PAGE, (end - np.uint64(1)) >> _PAGE
    cross = p1 != p0
    # The batch's rows are consecutive: the epochs it spans are runs of it, summed with
    # reduceat from their first rows (no epoch computed per row).
    e0, e1 = first * n_epochs // n, (first + m - 1) * n_epochs // n + 1
    runs = np.maximum(t.ep_start[e0:e1] - first, 0)

    # ---- totals and epochs
    t.kinds += np.bincount(kind, minlength=3)
    t.outcomes += np.bincount(outcome, minlength=len(B.OUTCOME_NAMES))
    t.results_exits += int(nexits.sum())
    is_write = kind == B.ACCESS_WRITE
    t.ep_accesses[e0:e1] += np.diff(np.append(runs, m))
    t.ep_writes[e0:e1] += np.add.reduceat(is_write, runs, dtype=np.int64)

    # ---- the exits of these rows, and the pieces of the protection exits
    if log is not None:
        erow, egpa, ekind, erel = log.take(first + m)
        i = erow - first
        inside = (egpa >= gpa[i]) & (egpa < end[i])
        if not inside.all():
            raise _outside(log, erow, egpa, gpa, size, first, int(np.argmax(~inside)))
        egfn = egpa >> _PAGE
        prot = _protection(ekind)
        t.log.add(erow, ekind, erel, prot)
        # the faulting piece: from the logged gpa to the end of the access or the page
        vstart = egpa[prot]
        vend = np.minimum(end[i[prot]], (egfn[prot] + np.uint64(1)) << _PAGE)
        vrel = erel[prot]
    else:
        # Without a log: exits on the access's first page; violations from the outcome,
        # on the piece of its first page.
        erow = np.zeros(0, dtype=np.int64)
        egfn = np.zeros(0, dtype=np.uint64)
        prot = (outcome == B.OUTCOME_SPP_VIOLATION) | (outcome == B.OUTCOME_WRITE_PROTECT_VIOLATION)
        t.log.epoch_exits[e0:e1] += np.add.reduceat(nexits, runs, dtype=np.int64)
        t.log.epoch_violations[e0:e1] += np.add.reduceat(prot, runs, dtype=np.int64)
        vstart = gpa[prot]
        vend = np.minimum(end[prot], (p0[prot] + np.uint64(1)) << _PAGE)
        vrel = np.full(vstart.shape[0], -1, dtype=np.int8)

    # ---- per page: every page an access touches, the page of every exit
    keys = np.concatenate((p0, p1[cross], egfn))
    at = np.concatenate((rows, rows[cross], erow))  # an exit's row touched its page too
    gfns, inverse = group_index(keys)
    u, na = gfns.shape[0], m + int(np.count_nonzero(cross))
    sums = np.zeros((len(_PAGE_SUMS), u), dtype=np.int64)
    sums[_P["reads"]:_P["fetches"] + 1] = _counts(
        inverse[:na], np.concatenate((kind, kind[cross])), u, 3)
    if log is not None:
        ie = inverse[na:]
        by_kind = _counts(ie, ekind, u, len(KINDS))
        sums[_P[KINDS[0]]:_P[KINDS[-1]] + 1] = by_kind
        sums[_P["exits"]] = by_kind.sum(axis=0)
        sums[_P["violations"]] = by_kind[PROTECTION_KINDS[0]] + by_kind[PROTECTION_KINDS[1]]
        if log.hooks:
            rel = _counts(ie, erel.astype(np.int64) + 1, u, 3)  # null, False, True
            sums[_P["relevant"]], sums[_P["irrelevant"]] = rel[2], rel[1]
    else:
        sums[_P["exits"]] = np.bincount(inverse[:m], weights=nexits, minlength=u)
        sums[_P["violations"]] = np.bincount(inverse[:m][prot], minlength=u)
    pages.add(gfns, sums, *_extremes(inverse, at, u))

    # ---- per sub-page: every sub-page written bytes or faulting bytes touch
    # (a protection exit's hook relevance goes with each sub-page of its piece)
    wq = _expand(gpa[is_write] >> _SUB, (end[is_write] - np.uint64(1)) >> _SUB)
    v0, v1 = vstart >> _SUB, (vend - np.uint64(1)) >> _SUB
    vq = _expand(v0, v1)
    vrel = np.repeat(vrel, (v1 - v0).astype(np.int64) + 1)
    qs, inverse = group_index(np.concatenate((wq, vq)))
    category = np.zeros(inverse.shape[0], dtype=np.int64)
    category[wq.shape[0]:] = 1
    sums = np.zeros((len(_SUBPAGE_SUMS), qs.shape[0]), dtype=np.int64)
    sums[:2] = _counts(inverse, category, qs.shape[0], 2)
    rel = _counts(inverse[wq.shape[0]:], vrel.astype(np.int64) + 1, qs.shape[0], 3)
    sums[2], sums[3] = rel[2], rel[1]  # True, False (null: no hooks)
    subpages.add(qs, sums)


class _KernelTables:
    """The running per-page and per-sub-page tables of the compiled path (kernels/report.py
    holds their layout): a dense window sized from the first batch, and hash tables grown by
    doubling."""

    def __init__(self, K):
        self.K = K
        self.state = np.zeros(K.STATE, dtype=np.int64)
        self.page_hot = self.page_cold = self.sub_hot = self.sub_cold = None
        self._defaults: dict[str, np.ndarray] = {}

    def place(self, gpa: np.ndarray) -> None:
        """Size the dense windows to the keys of the first batch when they span little (at
        most 4 n + DENSE_SLACK keys, as group_index counts, and DENSE_WINDOW)."""
        K, state = self.K, self.state
        limit = min(4 * gpa.shape[0] + DENSE_SLACK, DENSE_WINDOW)
        lo, hi = int(gpa.min()), int(gpa.max()) + MAX_ACCESS_SIZE - 1
        for base_at, span_at, shift in ((K.ST_PAGE_BASE, K.ST_PAGE_SPAN, B.PAGE_SHIFT),
                                        (K.ST_SUB_BASE, K.ST_SUB_SPAN, B.SUBPAGE_SHIFT)):
            span = (hi >> shift) - (lo >> shift) + 1
            state[base_at], state[span_at] = lo >> shift, span if span <= limit else 0
        slots = 1 << K.MIN_BITS
        self.page_hot, self.page_cold = self._empty(state[K.ST_PAGE_SPAN] + slots,
                                                    K.PAGE_HOT, K.PAGE_COLD)
        self.sub_hot, self.sub_cold = self._empty(state[K.ST_SUB_SPAN] + slots,
                                                  K.SUB_HOT, K.SUB_COLD)

    @staticmethod
    def _empty(rows: int, hot: int, cold: int):
        # zeroed: empty (the kernel's EMPTY is 0), and untouched pages cost no memory
        return np.zeros((rows, hot), dtype=np.int64), np.zeros((rows, cold), dtype=np.int64)

    def grow(self) -> None:
        """Double each hash table that the next row could fill past half (a GROW return)."""
        K, state = self.K, self.state
        span = state[K.ST_PAGE_SPAN]
        if state[K.ST_PAGES] > (self.page_hot.shape[0] - span) // 2 - K.MAX_PAGES_A_ROW:
            self.page_hot, self.page_cold = self._rehash(self.page_hot, self.page_cold,
                                                         state[K.ST_PAGE_BASE], span)
        span = state[K.ST_SUB_SPAN]
        if state[K.ST_SUBS] > (self.sub_hot.shape[0] - span) // 2 - K.MAX_SUBS_A_ROW:
            self.sub_hot, self.sub_cold = self._rehash(self.sub_hot, self.sub_cold,
                                                       state[K.ST_SUB_BASE], span)

    def _rehash(self, hot, cold, base, span):
        new_hot, new_cold = self._empty(span + 2 * (hot.shape[0] - span), hot.shape[1],
                                        cold.shape[1])
        self.K.rehash(hot, cold, new_hot, new_cold, base, span)
        return new_hot, new_cold

    def columns(self, batch: pa.RecordBatch):
        """The batch's columns as the kernel reads them (zero-copy, read-only; the defaults of
        absent ones kept from batch to batch), or None when one holds a null."""
        m = batch.num_rows
        out = []
        for name in _KERNEL_TYPES:
            if batch.schema.get_field_index(name) < 0:
                kept = self._defaults.get(name)
                if kept is None or kept.shape[0] < m:
                    value, dtype = _DEFAULTS[name]
                    kept = self._defaults[name] = np.full(m, value, dtype)
                    kept.flags.writeable = False  # as Arrow's: one compiled signature
                out.append(kept[:m])
                continue
            column = batch.column(name)
            if column.null_count:
                return None
            out.append(column.to_numpy(zero_copy_only=True))
        return out

    @staticmethod
    def _used_in_order(hot, cold):
        """The rows of a table that hold a key (column 0: the key plus one), by key."""
        used = hot[:, 0] != 0
        hot, cold = hot[used], cold[used]
        order = np.argsort(hot[:, 0])
        return hot[order], cold[order]

    def pages(self):
        """(keys, sums[_PAGE_SUMS, n], first rows, last rows), sorted by key."""
        K = self.K
        hot, cold = self._used_in_order(self.page_hot, self.page_cold)
        sums = np.empty((len(_PAGE_SUMS), hot.shape[0]), dtype=np.int64)
        sums[_P["reads"]:_P["fetches"] + 1] = hot[:, K.P_READS:K.P_READS + 3].T
        sums[_P[KINDS[0]]:_P[KINDS[-1]] + 1] = cold[:, :len(KINDS)].T
        sums[_P["relevant"]] = cold[:, K.PC_RELEVANT]
        sums[_P["irrelevant"]] = cold[:, K.PC_IRRELEVANT]
        sums[_P["exits"]] = hot[:, K.P_EXITS]
        sums[_P["violations"]] = hot[:, K.P_VIOLATIONS]
        return ((hot[:, 0] - 1).astype(np.uint64), sums, np.ascontiguousarray(hot[:, K.P_FIRST]),
                np.ascontiguousarray(hot[:, K.P_LAST]))

    def subpages(self):
        """(keys, sums[_SUBPAGE_SUMS, n]), sorted by key."""
        K = self.K
        hot, cold = self._used_in_order(self.sub_hot, self.sub_cold)
        sums = np.empty((len(_SUBPAGE_SUMS), hot.shape[0]), dtype=np.int64)
        sums[0] = hot[:, K.S_WRITES]
        sums[1] = cold[:, K.SC_VIOLATIONS]
        sums[2] = cold[:, K.SC_RELEVANT]
        sums[3] = cold[:, K.SC_IRRELEVANT]
        return (hot[:, 0] - 1).astype(np.uint64), sums


_NO_EXITS = (np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.int64),
             np.zeros(0, np.int8))


def _kernel_batch(batch, first: int, res: _Source, log: _ExitCursor | None, t: _Totals,
                  tables: _KernelTables, n: int) -> None:
    """One batch of results (and the exits of its rows) through the compiled kernel, straight
    into the running tables; the same figures and the same errors as _numpy_batch."""
    K = tables.K
    m = batch.num_rows
    cols = tables.columns(batch)
    if cols is None or K.check_columns(*cols[:4], 3, len(B.OUTCOME_NAMES), GPA_LIMIT):
        _batch_columns(batch, res, first)  # says what is wrong, as the numpy path does
        raise AssertionError("the report kernel refused a batch that numpy accepts")
    gpa, size, kind, outcome, nexits = cols
    if tables.page_hot is None:
        tables.place(gpa)
    erow, egpa, ekind, erel = _NO_EXITS if log is None else log.take(first + m)
    n_epochs = t.ep_start.shape[0]
    state = tables.state
    state[K.ST_ROW] = state[K.ST_EXIT] = 0
    while True:
        status = K.accumulate(gpa, size, kind, outcome, nexits, first, erow, egpa, ekind, erel,
                              log is not None, t.ep_start, first * n_epochs // n,
                              t.ep_accesses, t.ep_writes, t.log.epoch_exits,
                              t.log.epoch_violations, t.kinds, t.outcomes, tables.page_hot,
                              tables.page_cold, tables.sub_hot, tables.sub_cold, state)
        if status == K.DONE:
            break
        if status == K.OUTSIDE:
            raise _outside(log, erow, egpa, gpa, size, first, int(state[K.ST_BAD]))
        tables.grow()
    if log is not None:
        t.log.add(erow, ekind, erel, _protection(ekind))


def _use_kernel(engine: str, res: _Source) -> bool:
    """Whether analyze goes through the compiled kernel (``engine``: analyze's docstring)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "numpy" or (engine == "auto" and res.num_rows < KERNEL_ROWS):
        return False
    return all(res.types.get(name, wanted) == wanted for name, wanted in _KERNEL_TYPES.items())


def analyze(results, exits=None, *, epochs: int = DEFAULT_EPOCHS,
            batch_size: int = BATCH_ROWS,
            summary: ReplaySummary | Mapping | None = None,
            engine: str = "auto") -> ReportStats:
    """Read results (and an exit log) once, in bounded batches, and compute every statistic.

    ``engine``: "numpy" groups each batch with numpy; "jit" attributes it row by row in a
    compiled kernel (kernels/report.py) when the results' columns have the types sppjit
    replay writes (others go through numpy); "auto", the default, takes the kernel from
    KERNEL_ROWS results rows on, where it pays for loading numba. Both give the same figures
    and the same errors.

    Without results (``results`` None), from the exit log and the replay's ``summary``
    alone: see analyze_exit_log."""
    if epochs < 1:
        raise InputError(f"epochs must be at least 1, not {epochs}")
    if results is None:
        if exits is None or summary is None:
            raise InputError("a report needs the results, or the exit log and the summary")
        return analyze_exit_log(exits, summary, epochs=epochs, batch_size=batch_size)
    results, exits = _unwrap(results, exits)
    res = _open_source(results, "results", tuple(_KERNEL_TYPES))
    _require(res, ("gpa", "outcome", "exits"),
             "RESULTS is the --out file of sppjit replay")
    log = None
    if exits is not None:
        log_src = _open_source(exits, "exits", ("row", "gpa", "kind", "relevant"))
        _require(log_src, ("row", "gpa", "kind"), "EXITS is the --exits file of sppjit replay")
        log = _ExitCursor(log_src, batch_size)
    n = res.num_rows
    if n == 0:
        raise InputError(f"results: {res.label} has no rows")
    n_epochs = min(epochs, n)
    t = _Totals(n, n_epochs)
    if _use_kernel(engine, res):
        from sppjit.kernels import report as K

        tables = _KernelTables(K)

        def add(batch, first):
            _kernel_batch(batch, first, res, log, t, tables, n)
    else:
        pages = _Grouped(len(_PAGE_SUMS), extremes=True)
        subpages = _Grouped(len(_SUBPAGE_SUMS))
        tables = None

        def add(batch, first):
            _numpy_batch(batch, first, res, log, t, pages, subpages, n)

    first = 0
    for batch in res.batches(batch_size):
        m = batch.num_rows
        if first + m > n:
            raise InputError(f"results: {res.label} holds more rows than its metadata says")
        add(batch, first)
        first += m

    if first != n:
        raise InputError(f"results: {res.label} holds {first:,} rows, its metadata says {n:,}")
    if tables is not None:
        page_result, subpage_result = tables.pages(), tables.subpages()
        results_exits = int(tables.state[tables.K.ST_EXITS_TOTAL])
    else:
        page_result, subpage_result = pages.result(), subpages.result()[:2]
        results_exits = t.results_exits
    warnings = []
    if log is not None:
        log.finish(n)
        if log.count != results_exits:
            warnings.append(f"the exit log holds {log.count:,} exits but the results count "
                            f"{results_exits:,}: a filtered log, or not the same replay")

    totals_of_log = t.log
    ep_viol = totals_of_log.epoch_violations
    exit_kinds_total = totals_of_log.kinds
    kinds_total, outcomes_total = t.kinds, t.outcomes
    per_page = _page_table(*page_result, exit_log=log is not None,
                           hooks=log is not None and log.hooks)
    per_subpage = _subpage_table(*subpage_result, hooks=log is not None and log.hooks)
    epochs_table = _epoch_table(n, n_epochs, t.ep_accesses, t.ep_writes,
                                totals_of_log.epoch_exits, ep_viol,
                                totals_of_log.epoch_kinds if log is not None else None)

    writes = int(kinds_total[B.ACCESS_WRITE])
    total_exits = log.count if log is not None else results_exits
    exits = {"total": total_exits}
    for code, name in enumerate(KINDS):
        exits[name] = int(exit_kinds_total[code]) if log is not None else None
    viol = per_page.column("violations")
    totals = {
        "rows": n,
        "counts": {
            "accesses": n, "reads": int(kinds_total[B.ACCESS_READ]), "writes": writes,
            "fetches": int(kinds_total[B.ACCESS_FETCH]),
            **{name.lower(): int(outcomes_total[c]) for c, name in enumerate(B.OUTCOME_NAMES)},
        },
        "exits": exits,
        "exits_per_1000_writes": (1000.0 * total_exits / writes) if writes else None,
        "violations": int(ep_viol.sum()),
        # protection exits over writes only: what a monitor pays per write it guards
        "protection_exits_per_1000_writes": (1000.0 * int(ep_viol.sum()) / writes
                                             if writes else None),
        "pages": {
            "touched": per_page.num_rows,
            "with_exits": int(pc.sum(pc.greater(per_page.column("exits"), 0)).as_py() or 0),
            "with_violations": int(pc.sum(pc.greater(viol, 0)).as_py() or 0),
        },
        "subpages": {
            "written": int(pc.sum(pc.greater(per_subpage.column("writes"), 0)).as_py() or 0),
            "violated": int(pc.sum(pc.greater(per_subpage.column("violations"), 0)).as_py() or 0),
        },
        "exits_source": "exit_log" if log is not None else "results",
    }
    if log is not None and log.hooks:
        totals["hooks"] = {"relevant": totals_of_log.relevant,
                           "irrelevant": totals_of_log.irrelevant}
    inputs = {"results": {"path": res.path, "format": res.format, "rows": n}}
    if log is not None:
        inputs["exits"] = {"path": log.src.path, "format": log.src.format,
                           "rows": log.src.num_rows}
    return ReportStats(per_page=per_page, per_subpage=per_subpage, epochs=epochs_table,
                       totals=totals, rows=n, exit_log=log is not None,
                       hooks=log is not None and log.hooks, inputs=inputs, warnings=warnings)


# ============================================================ from the exit log and summary

# What a report without the per-access results can and cannot tell (docs/performance.md,
# "End to end"): every exit figure comes from the exit log, the trace's length and the access
# counts from the summary; what needs each access (accesses, reads, writes and fetches per
# page, writes per sub-page and per epoch) is null.
EXIT_LOG_ONLY_NOTE = ("report from the exit log and the summary alone: accesses, reads, "
                      "writes and fetches per page, writes per sub-page and per epoch need the "
                      "results (null here); a protection exit counts on the sub-page of its "
                      "logged gpa only (its first faulting byte)")


def _replay_summary(summary) -> ReplaySummary:
    """The replay's summary, typed (its JSON read by sppjit.report.document.as_summary)."""
    from .document import as_summary

    summary = as_summary(summary)
    if not isinstance(summary, ReplaySummary):
        raise InputError("summary: a report without results needs the --summary of sppjit "
                         "replay, not a compare document (it has one replay's rows)")
    return summary


def _count(value) -> int | None:
    """A count the summary holds, or None where its JSON holds no integer there."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _summary_rows(summary: ReplaySummary) -> int:
    """The trace's rows, as a replay summary records them (input.rows, else counts)."""
    for value in (summary.input.get("rows"), summary.counts.accesses):
        if _count(value) is not None and value > 0:
            return value
    raise InputError("summary: it records no number of rows (input.rows), which a report "
                     "without results needs")


def _summary_counts(summary: ReplaySummary, rows: int) -> dict:
    out = {"accesses": rows}
    for key in ("reads", "writes", "fetches", *(n.lower() for n in B.OUTCOME_NAMES)):
        out[key] = _count(getattr(summary.counts, key))
    return out


def analyze_exit_log(exits, summary: ReplaySummary | Mapping, *, epochs: int = DEFAULT_EPOCHS,
                     batch_size: int = BATCH_ROWS) -> ReportStats:
    """The report's statistics from the exit log and the replay's summary, without the
    per-access results: exits by kind per page, per epoch and in total, protection exits per
    sub-page (on the logged gpa's sub-page), hook relevance; the access counts come from the
    summary, the per-access columns are null (EXIT_LOG_ONLY_NOTE)."""
    if epochs < 1:
        raise InputError(f"epochs must be at least 1, not {epochs}")
    if hasattr(exits, "exits") and hasattr(exits, "summary"):  # a ReplayResult
        exits = exits.exits
    summary = _replay_summary(summary)
    n = _summary_rows(summary)
    log_src = _open_source(exits, "exits", ("row", "gpa", "kind", "relevant"))
    _require(log_src, ("row", "gpa", "kind"), "EXITS is the --exits file of sppjit replay")
    log = _ExitCursor(log_src, batch_size)
    n_epochs = min(epochs, n)
    pages = _Grouped(len(_PAGE_SUMS), extremes=True)
    subpages = _Grouped(len(_SUBPAGE_SUMS))
    totals_of_log = _ExitTotals(n, n_epochs)
    ep_exits, ep_viol = totals_of_log.epoch_exits, totals_of_log.epoch_violations
    ep_kinds, exit_kinds_total = totals_of_log.epoch_kinds, totals_of_log.kinds
    # Trace rows in windows of batch_size: each window's exits are one bounded batch.
    for stop in range(batch_size, n + batch_size, batch_size):
        erow, egpa, ekind, erel = log.take(min(stop, n))
        if not erow.shape[0]:
            continue
        egfn = egpa >> _PAGE
        prot = (ekind == PROTECTION_KINDS[0]) | (ekind == PROTECTION_KINDS[1])
        totals_of_log.add(erow, ekind, erel, prot)
        gfns, inverse = group_index(egfn)
        u = gfns.shape[0]
        sums = np.zeros((len(_PAGE_SUMS), u), dtype=np.int64)
        by_kind = _counts(inverse, ekind, u, len(KINDS))
        sums[_P[KINDS[0]]:_P[KINDS[-1]] + 1] = by_kind
        sums[_P["exits"]] = by_kind.sum(axis=0)
        sums[_P["violations"]] = by_kind[PROTECTION_KINDS[0]] + by_kind[PROTECTION_KINDS[1]]
        if log.hooks:
            rel = _counts(inverse, erel.astype(np.int64) + 1, u, 3)  # null, False, True
            sums[_P["relevant"]], sums[_P["irrelevant"]] = rel[2], rel[1]
        pages.add(gfns, sums, *_extremes(inverse, erow, u))
        qs, inverse = group_index(egpa[prot] >> _SUB)
        sums = np.zeros((len(_SUBPAGE_SUMS), qs.shape[0]), dtype=np.int64)
        sums[:2] = _counts(inverse, np.ones(inverse.shape[0], dtype=np.int64), qs.shape[0], 2)
        if log.hooks:  # a protection exit's hook relevance goes with its sub-page
            rel = _counts(inverse, erel[prot].astype(np.int64) + 1, qs.shape[0], 3)
            sums[2], sums[3] = rel[2], rel[1]  # True, False
        subpages.add(qs, sums)
    log.finish(n)

    per_page = _page_table(*pages.result(), exit_log=True, hooks=log.hooks, accesses=False)
    per_subpage = _subpage_table(*subpages.result()[:2], writes=False, hooks=log.hooks)
    starts = _epoch_starts(n, n_epochs)
    rows_per_epoch = np.diff(np.append(starts, n))
    epochs_table = _epoch_table(n, n_epochs, rows_per_epoch, None, ep_exits, ep_viol, ep_kinds)
    counts = _summary_counts(summary, n)
    writes = counts["writes"]
    exits_out = {"total": log.count,
                 **{name: int(exit_kinds_total[code]) for code, name in enumerate(KINDS)}}
    touched = summary.pages.touched
    viol = per_page.column("violations")
    totals = {
        "rows": n,
        "counts": counts,
        "exits": exits_out,
        "exits_per_1000_writes": (1000.0 * log.count / writes) if writes else None,
        "violations": int(ep_viol.sum()),
        # protection exits over writes only (the writes from the summary's counts)
        "protection_exits_per_1000_writes": (1000.0 * int(ep_viol.sum()) / writes
                                             if writes else None),
        "pages": {
            "touched": _count(touched),
            "with_exits": int(pc.sum(pc.greater(per_page.column("exits"), 0)).as_py() or 0),
            "with_violations": int(pc.sum(pc.greater(viol, 0)).as_py() or 0),
        },
        "subpages": {
            "written": None,
            "violated": int(pc.sum(pc.greater(per_subpage.column("violations"), 0)).as_py() or 0),
        },
        "exits_source": "exit_log",
    }
    if log.hooks:
        totals["hooks"] = {"relevant": totals_of_log.relevant,
                           "irrelevant": totals_of_log.irrelevant}
    warnings = [EXIT_LOG_ONLY_NOTE]
    recorded = _count(summary.exits.total)
    if recorded is not None and recorded != log.count:
        warnings.append(f"the exit log holds {log.count:,} exits but the summary counts "
                        f"{recorded:,}: a filtered log, or not the same replay")
    inputs = {"results": None,
              "exits": {"path": log_src.path, "format": log_src.format, "rows": log_src.num_rows}}
    return ReportStats(per_page=per_page, per_subpage=per_subpage, epochs=epochs_table,
                       totals=totals, rows=n, exit_log=True, hooks=log.hooks, inputs=inputs,
                       warnings=warnings)


def _schema_metadata() -> dict[bytes, bytes]:
    return {**schema_metadata(), b"sppjit.version": __version__.encode()}


_ACCESS_COLUMNS = ("accesses", "reads", "writes", "fetches")  # known from the results only


def _page_table(keys, sums, mins, maxs, *, exit_log: bool, hooks: bool,
                accesses: bool = True) -> pa.Table:
    n = keys.shape[0]
    fields, arrays = [pa.field("gfn", pa.uint64(), nullable=False)], [pa.array(keys, pa.uint64())]
    for name in _PAGE_COLUMNS:
        if name in ("relevant", "irrelevant") and not hooks:
            continue
        if name == "accesses":
            values = sums[_P["reads"]] + sums[_P["writes"]] + sums[_P["fetches"]]
        else:
            values = sums[_P[name]]
        nullable = (name in KINDS and not exit_log) or (name in _ACCESS_COLUMNS and not accesses)
        fields.append(pa.field(name, pa.int64(), nullable=nullable))
        arrays.append(pa.nulls(n, pa.int64()) if nullable else pa.array(values))
    fields += [pa.field("first_row", pa.int64(), nullable=False),
               pa.field("last_row", pa.int64(), nullable=False)]
    arrays += [pa.array(mins.astype(np.int64)), pa.array(maxs.astype(np.int64))]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=_schema_metadata()))


def _subpage_table(keys, sums, *, writes: bool = True, hooks: bool = False) -> pa.Table:
    """gfn, subpage, writes (null without the results), violations, and with hook relevance
    in the exit log the protection exits on the sub-page that were relevant and irrelevant."""
    fields = [pa.field("gfn", pa.uint64(), nullable=False),
              pa.field("subpage", pa.uint8(), nullable=False),
              pa.field("writes", pa.int64(), nullable=not writes),
              pa.field("violations", pa.int64(), nullable=False)]
    arrays = [pa.array(keys >> _SUB_PER_PAGE_SHIFT, pa.uint64()),
              pa.array((keys & np.uint64(B.SUBPAGES_PER_PAGE - 1)).astype(np.uint8)),
              pa.array(sums[0]) if writes else pa.nulls(keys.shape[0], pa.int64()),
              pa.array(sums[1])]
    if hooks:
        fields += [pa.field("relevant", pa.int64(), nullable=False),
                   pa.field("irrelevant", pa.int64(), nullable=False)]
        arrays += [pa.array(sums[2]), pa.array(sums[3])]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=_schema_metadata()))


def _epoch_starts(n: int, n_epochs: int) -> np.ndarray:
    """The first row of each epoch: row r is in epoch r * n_epochs // n."""
    e = np.arange(n_epochs, dtype=np.int64)
    return (e * n + n_epochs - 1) // n_epochs  # ceil(e * n / n_epochs)


def _epoch_table(n, n_epochs, accesses, writes, exits, violations, kinds) -> pa.Table:
    e = np.arange(n_epochs, dtype=np.int64)
    start = _epoch_starts(n, n_epochs)
    stop = np.append(start[1:], n)
    fields = [pa.field("epoch", pa.int32(), nullable=False),
              pa.field("first_row", pa.int64(), nullable=False),
              pa.field("rows", pa.int64(), nullable=False),
              pa.field("accesses", pa.int64(), nullable=False),
              pa.field("writes", pa.int64(), nullable=writes is None),
              pa.field("exits", pa.int64(), nullable=False)]
    arrays = [pa.array(e.astype(np.int32)), pa.array(start), pa.array(stop - start),
              pa.array(accesses),
              pa.nulls(n_epochs, pa.int64()) if writes is None else pa.array(writes),
              pa.array(exits)]
    for code, name in enumerate(KINDS):
        fields.append(pa.field(name, pa.int64(), nullable=kinds is None))
        arrays.append(pa.nulls(n_epochs, pa.int64()) if kinds is None else pa.array(kinds[code]))
    fields.append(pa.field("violations", pa.int64(), nullable=False))
    arrays.append(pa.array(violations))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=_schema_metadata()))


def top_pages(per_page: pa.Table, n: int = TEXT_TOP, by: str = "exits") -> list[dict]:
    """The ``n`` pages with the most ``by`` (ties: lower gfn first), as dicts; pages with none
    are left out."""
    if per_page.num_rows == 0:
        return []
    keyed = per_page.filter(pc.greater(per_page.column(by), 0))
    if keyed.num_rows == 0:
        return []
    order = pc.sort_indices(keyed, sort_keys=[(by, "descending"), ("gfn", "ascending")])
    return keyed.take(order[:n]).to_pylist()


