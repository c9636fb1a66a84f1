"""Reports on a replay's outputs: per-page and per-sub-page statistics, exits per epoch, plots.

The results (``sppjit replay --out``) and the exit log (``--exits``) are read together, batch by
batch and with only the columns needed, so memory grows with the number of distinct pages and
sub-pages, never with the trace: each batch is grouped with numpy (sort, reduceat) and the
partial groups are merged into running sorted tables, compacted when they grow.

Attribution rules (the same in the tables, the text report and the plots):

- An access counts on every page it touches (a write crossing a page boundary counts on both
  pages) and, for ``writes`` per sub-page, on every 128-byte sub-page its bytes touch.
- An exit counts on the page of its logged gpa (the start of the page piece that faulted). A
  protection exit (``spp_violation`` or ``write_protect``) counts, per sub-page, on every
  sub-page its faulting bytes touch: the piece from the logged gpa to the end of the access or
  of the page, whichever comes first.
- Without an exit log the exit kinds are unknown (null columns); ``exits`` then counts the
  results' ``exits`` column on the page of each access's first byte, and ``violations`` counts
  the accesses whose outcome is SPP_VIOLATION or WRITE_PROTECT_VIOLATION on the piece of their
  first page, as the exit log would for accesses that do not cross a page.
- Epochs split the trace rows into ``epochs`` runs of equal length (the first rows of the
  trace in epoch 0): row r is in epoch r * epochs // rows.

Python API::

    per_page, per_subpage = page_stats(results, exits)        # two pyarrow Tables
    stats = analyze(results, exits, epochs=100)                 # + epochs, totals
    plot_exits_over_time(stats.epochs, "exits.png")
    plot_violations_heatmap(stats.per_subpage, "heat.png", per_page=stats.per_page, top=32)
    plot_compare_bars(compare_document, "bars.png")

``results`` and ``exits`` are paths (Parquet, Arrow IPC file or stream), pyarrow Tables or
RecordBatches, or a ``ReplayResult`` (whose ``exits`` is used when ``exits`` is not given).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from . import __version__
from . import bits as B
from .errors import InputError
from .io.formats import ARROW_FILE_MAGIC, PARQUET_MAGIC, cannot_read, read_magic

REPORT_SCHEMA_VERSION = 1
DEFAULT_EPOCHS = 100
DEFAULT_TOP = 32
TEXT_TOP = 10  # pages listed in the printed report
BATCH_ROWS = 1 << 18  # results rows per batch: a batch of 4 KiB writes expands 33 times
COMPACT_ROWS = 1 << 20  # pending grouped rows merged into the running table past this

# Figures: 12 x 8 inches at 100 dpi = 1200 x 800 pixels, saved without tight cropping.
FIG_SIZE = (12.0, 8.0)
FIG_DPI = 100
PLOT_FILES = {
    "exits_over_time": "exits_over_time.png",
    "violations_heatmap": "violations_heatmap.png",
    "compare_bars": "compare_bars.png",
}
STATS_FILES = {
    "per_page": "per_page.parquet",
    "per_subpage": "per_subpage.parquet",
    "epochs": "epochs.parquet",
}
REPORT_FILE = "report.json"
MATPLOTLIB_MISSING = "sppjit report --plot needs matplotlib: pip install 'sppjit[plot]'"

KINDS = B.EXIT_KIND_NAMES
PROTECTION_KINDS = (B.EXIT_KIND_SPP_VIOLATION, B.EXIT_KIND_WRITE_PROTECT)
# One colour per exit kind, the same in every plot.
KIND_COLORS = {
    "ept_fault": "#4c72b0",
    "mmio": "#8c8c8c",
    "spp_miss": "#55a868",
    "spp_misconfig": "#8172b2",
    "spp_violation": "#c44e52",
    "write_protect": "#dd8452",
    "wp_fault": "#937860",
}

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
_SUBPAGE_SUMS = ("writes", "violations")


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

    def batches(self, batch_size: int) -> Iterator[pa.RecordBatch]:
        try:
            for batch in self._open():
                for start in range(0, batch.num_rows, batch_size):
                    yield batch.slice(start, batch_size)
        except (pa.ArrowException, OSError) as exc:  # truncation shows only while reading
            raise cannot_read(self.what, self.label, exc) from None


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
                   source.schema.names, lambda: iter(table.to_batches()))


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

            return _Source(what, path, path, "parquet", num_rows, all_names, read_parquet)
        if magic.startswith(ARROW_FILE_MAGIC):
            reader = ipc.open_file(pa.memory_map(path))
            all_names = reader.schema.names
            names = [n for n in wanted if n in all_names]
            num_rows = sum(reader.get_batch(i).num_rows
                           for i in range(reader.num_record_batches))  # zero-copy: headers

            def read_file():
                r = ipc.open_file(pa.memory_map(path))
                return (r.get_batch(i).select(names) for i in range(r.num_record_batches))

            return _Source(what, path, path, "arrow", num_rows, all_names, read_file)

        def read_stream():
            r = ipc.open_stream(pa.OSFile(path, "rb"))
            names = [n for n in wanted if n in r.schema.names]
            return (b.select(names) for b in r)

        stream = ipc.open_stream(pa.OSFile(path, "rb"))
        all_names = stream.schema.names
        num_rows = sum(b.num_rows for b in stream)  # a stream says its length only at its end
        return _Source(what, path, path, "arrow-stream", num_rows, all_names, read_stream)
    except (pa.ArrowException, OSError) as exc:
        if magic.startswith((PARQUET_MAGIC, ARROW_FILE_MAGIC, b"\xff\xff\xff\xff")):
            raise cannot_read(what, path, exc) from None
        raise cannot_read(what, path, "not a Parquet file nor an Arrow IPC file or stream "
                                      f"(the {what} of sppjit replay are one of these)") from None


def _require(src: _Source, columns: tuple[str, ...], hint: str) -> None:
    for name in columns:
        if name not in src.names:
            raise InputError(f"{src.what}: {src.label} has no column '{name}' ({hint})")


def _int_column(batch: pa.RecordBatch, name: str, dtype, src: _Source, first_row: int,
                *, default: int | None = None) -> np.ndarray:
    """A column as a numpy array of ``dtype``; InputError for nulls or a non-integer type."""
    if name not in batch.schema.names:
        return np.full(batch.num_rows, default, dtype=dtype)
    col = batch.column(name)
    if not (pa.types.is_integer(col.type) or pa.types.is_boolean(col.type)):
        raise InputError(f"{src.what}: {src.label}: column '{name}' has type {col.type}, "
                         "not an integer type")
    if col.null_count:
        row = first_row + int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
        raise InputError(f"{src.what}: {src.label}: column '{name}' is null at row {row}")
    values = col.to_numpy()
    if np.issubdtype(values.dtype, np.signedinteger) and values.size and values.min() < 0:
        row = first_row + int(np.argmax(values < 0))
        raise InputError(f"{src.what}: {src.label}: column '{name}' is negative at row {row}")
    return values.astype(dtype, copy=False)


def _check_range(values: np.ndarray, hi: int, name: str, src: _Source, first_row: int) -> None:
    if values.size and int(values.max()) > hi:
        row = first_row + int(np.argmax(values > hi))
        raise InputError(f"{src.what}: {src.label}: column '{name}' has {int(values.max())} at "
                         f"row {row} (at most {hi})")


# ============================================================================ grouping

def _groups(keys: np.ndarray):
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

    def add(self, keys, sums, mins=None, maxs=None) -> None:
        """A grouped part: unique sorted keys, sums[ncols, len(keys)], min and max rows."""
        if keys.shape[0] == 0:
            return
        part = (keys, sums, mins, maxs) if self.extremes else (keys, sums, None, None)
        if self._table is None:
            self._table = part
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
        pos = np.searchsorted(keys, bkeys)
        found = keys[np.minimum(pos, keys.shape[0] - 1)] == bkeys
        at = pos[found]  # distinct positions: plain fancy-index updates are exact
        sums[:, at] += bsums[:, found]
        if self.extremes:
            mins[at] = np.minimum(mins[at], bmins[found])
            maxs[at] = np.maximum(maxs[at], bmaxs[found])
        return ~found, pos

    def _combine(self):
        """The pending parts as one grouped part."""
        parts, self._parts, self._pending = self._parts, [], 0
        if len(parts) == 1:
            return parts[0]
        keys, _, order, starts = _groups(np.concatenate([p[0] for p in parts]))
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


def analyze(results, exits=None, *, epochs: int = DEFAULT_EPOCHS,
            batch_size: int = BATCH_ROWS) -> ReportStats:
    """Read results (and an exit log) once, in bounded batches, and compute every statistic."""
    if epochs < 1:
        raise InputError(f"--epochs must be at least 1, not {epochs}")
    results, exits = _unwrap(results, exits)
    res = _open_source(results, "results", ("gpa", "size", "kind", "outcome", "exits"))
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
    pages = _Grouped(len(_PAGE_SUMS), extremes=True)
    subpages = _Grouped(len(_SUBPAGE_SUMS))
    ep_accesses = np.zeros(n_epochs, dtype=np.int64)
    ep_writes = np.zeros(n_epochs, dtype=np.int64)
    ep_exits = np.zeros(n_epochs, dtype=np.int64)
    ep_viol = np.zeros(n_epochs, dtype=np.int64)
    ep_kinds = np.zeros((len(KINDS), n_epochs), dtype=np.int64)
    kinds_total = np.zeros(3, dtype=np.int64)
    outcomes_total = np.zeros(len(B.OUTCOME_NAMES), dtype=np.int64)
    exit_kinds_total = np.zeros(len(KINDS), dtype=np.int64)
    results_exits = 0
    relevant_total = irrelevant_total = 0

    first = 0
    for batch in res.batches(batch_size):
        m = batch.num_rows
        if first + m > n:
            raise InputError(f"results: {res.label} holds more rows than its metadata says")
        gpa = _int_column(batch, "gpa", np.uint64, res, first)
        size = _int_column(batch, "size", np.uint64, res, first, default=8)
        kind = _int_column(batch, "kind", np.int64, res, first, default=B.ACCESS_WRITE)
        outcome = _int_column(batch, "outcome", np.int64, res, first)
        nexits = _int_column(batch, "exits", np.int64, res, first)
        _check_range(kind, B.ACCESS_FETCH, "kind", res, first)
        _check_range(outcome, len(B.OUTCOME_NAMES) - 1, "outcome", res, first)
        if size.size and int(size.min()) < 1:
            raise InputError(f"results: {res.label}: column 'size' is 0 at row "
                             f"{first + int(np.argmax(size < 1))}")
        _check_range(size, B.PAGE_SIZE, "size", res, first)
        rows = np.arange(first, first + m, dtype=np.int64)
        end = gpa + size  # one past the last byte
        p0, p1 = gpa >> _PAGE, (end - np.uint64(1)) >> _PAGE
        cross = p1 != p0
        epoch = rows * n_epochs // n

        # ---- totals and epochs
        kinds_total += np.bincount(kind, minlength=3)
        outcomes_total += np.bincount(outcome, minlength=len(B.OUTCOME_NAMES))
        results_exits += int(nexits.sum())
        is_write = kind == B.ACCESS_WRITE
        ep_accesses += np.bincount(epoch, minlength=n_epochs)
        ep_writes += np.bincount(epoch[is_write], minlength=n_epochs)

        # ---- the exits of these rows, and the pieces of the protection exits
        if log is not None:
            erow, egpa, ekind, erel = log.take(first + m)
            i = erow - first
            inside = (egpa >= gpa[i]) & (egpa < end[i])
            if not inside.all():
                j = int(np.argmax(~inside))
                raise InputError(
                    f"exits: {log.src.label}: the exit of trace row {int(erow[j])} (gpa "
                    f"{int(egpa[j]):#x}) is outside that row's access in the results (gpa "
                    f"{int(gpa[i[j]]):#x}, {int(size[i[j]])} bytes): the exit log and the "
                    "results are not from the same replay")
            egfn = egpa >> _PAGE
            prot = (ekind == PROTECTION_KINDS[0]) | (ekind == PROTECTION_KINDS[1])
            exit_kinds_total += np.bincount(ekind, minlength=len(KINDS))
            relevant_total += int(np.count_nonzero(erel == 1))
            irrelevant_total += int(np.count_nonzero(erel == 0))
            eepoch = erow * n_epochs // n
            ep_kinds += _counts(eepoch, ekind, n_epochs, len(KINDS))
            ep_exits += np.bincount(eepoch, minlength=n_epochs)
            ep_viol += np.bincount(eepoch[prot], minlength=n_epochs)
            # the faulting piece: from the logged gpa to the end of the access or the page
            vstart = egpa[prot]
            vend = np.minimum(end[i[prot]], (egfn[prot] + np.uint64(1)) << _PAGE)
        else:
            # Without a log: exits on the access's first page; violations from the outcome,
            # on the piece of its first page.
            erow = np.zeros(0, dtype=np.int64)
            egfn = np.zeros(0, dtype=np.uint64)
            prot = (outcome == B.OUTCOME_SPP_VIOLATION) | (outcome == B.OUTCOME_WRITE_PROTECT_VIOLATION)
            ep_exits += np.bincount(epoch, weights=nexits, minlength=n_epochs).astype(np.int64)
            ep_viol += np.bincount(epoch[prot], minlength=n_epochs)
            vstart = gpa[prot]
            vend = np.minimum(end[prot], (p0[prot] + np.uint64(1)) << _PAGE)

        # ---- per page: every page an access touches, the page of every exit
        keys = np.concatenate((p0, p1[cross], egfn))
        at = np.concatenate((rows, rows[cross], erow))  # an exit's row touched its page too
        gfns, inverse, order, starts = _groups(keys)
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
        at = at[order]
        pages.add(gfns, sums, np.minimum.reduceat(at, starts), np.maximum.reduceat(at, starts))

        # ---- per sub-page: every sub-page written bytes or faulting bytes touch
        wq = _expand(gpa[is_write] >> _SUB, (end[is_write] - np.uint64(1)) >> _SUB)
        vq = _expand(vstart >> _SUB, (vend - np.uint64(1)) >> _SUB)
        qs, inverse, _, _ = _groups(np.concatenate((wq, vq)))
        category = np.zeros(inverse.shape[0], dtype=np.int64)
        category[wq.shape[0]:] = 1
        subpages.add(qs, _counts(inverse, category, qs.shape[0], 2))
        first += m

    if first != n:
        raise InputError(f"results: {res.label} holds {first:,} rows, its metadata says {n:,}")
    warnings = []
    if log is not None:
        log.finish(n)
        if log.count != results_exits:
            warnings.append(f"the exit log holds {log.count:,} exits but the results count "
                            f"{results_exits:,}: a filtered log, or not the same replay")

    per_page = _page_table(*pages.result(), exit_log=log is not None,
                           hooks=log is not None and log.hooks)
    per_subpage = _subpage_table(*subpages.result()[:2])
    epochs_table = _epoch_table(n, n_epochs, ep_accesses, ep_writes, ep_exits, ep_viol,
                                ep_kinds if log is not None else None)

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
        totals["hooks"] = {"relevant": relevant_total, "irrelevant": irrelevant_total}
    inputs = {"results": {"path": res.path, "format": res.format, "rows": n}}
    if log is not None:
        inputs["exits"] = {"path": log.src.path, "format": log.src.format,
                           "rows": log.src.num_rows}
    return ReportStats(per_page=per_page, per_subpage=per_subpage, epochs=epochs_table,
                       totals=totals, rows=n, exit_log=log is not None,
                       hooks=log is not None and log.hooks, inputs=inputs, warnings=warnings)


def _schema_metadata() -> dict[bytes, bytes]:
    from .io.trace import schema_metadata

    return {**schema_metadata(), b"sppjit.version": __version__.encode()}


def _page_table(keys, sums, mins, maxs, *, exit_log: bool, hooks: bool) -> pa.Table:
    n = keys.shape[0]
    fields, arrays = [pa.field("gfn", pa.uint64(), nullable=False)], [pa.array(keys, pa.uint64())]
    for name in _PAGE_COLUMNS:
        if name in ("relevant", "irrelevant") and not hooks:
            continue
        if name == "accesses":
            values = sums[_P["reads"]] + sums[_P["writes"]] + sums[_P["fetches"]]
        else:
            values = sums[_P[name]]
        nullable = name in KINDS and not exit_log
        fields.append(pa.field(name, pa.int64(), nullable=nullable))
        arrays.append(pa.nulls(n, pa.int64()) if nullable else pa.array(values))
    fields += [pa.field("first_row", pa.int64(), nullable=False),
               pa.field("last_row", pa.int64(), nullable=False)]
    arrays += [pa.array(mins.astype(np.int64)), pa.array(maxs.astype(np.int64))]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=_schema_metadata()))


def _subpage_table(keys, sums) -> pa.Table:
    schema = pa.schema([pa.field("gfn", pa.uint64(), nullable=False),
                        pa.field("subpage", pa.uint8(), nullable=False),
                        pa.field("writes", pa.int64(), nullable=False),
                        pa.field("violations", pa.int64(), nullable=False)],
                       metadata=_schema_metadata())
    return pa.Table.from_arrays(
        [pa.array(keys >> _SUB_PER_PAGE_SHIFT, pa.uint64()),
         pa.array((keys & np.uint64(B.SUBPAGES_PER_PAGE - 1)).astype(np.uint8)),
         pa.array(sums[0]), pa.array(sums[1])], schema=schema)


def _epoch_table(n, n_epochs, accesses, writes, exits, violations, kinds) -> pa.Table:
    e = np.arange(n_epochs, dtype=np.int64)
    start = (e * n + n_epochs - 1) // n_epochs  # ceil(e * n / n_epochs)
    stop = np.append(start[1:], n)
    fields = [pa.field("epoch", pa.int32(), nullable=False),
              pa.field("first_row", pa.int64(), nullable=False),
              pa.field("rows", pa.int64(), nullable=False),
              pa.field("accesses", pa.int64(), nullable=False),
              pa.field("writes", pa.int64(), nullable=False),
              pa.field("exits", pa.int64(), nullable=False)]
    arrays = [pa.array(e.astype(np.int32)), pa.array(start), pa.array(stop - start),
              pa.array(accesses), pa.array(writes), pa.array(exits)]
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


# ============================================================================ inputs of reports

def read_summary(path: str) -> dict:
    """A summary JSON (sppjit replay --summary) or a compare document (sppjit compare --json)."""
    read_magic(path, "summary")  # missing file, directory, unreadable: one clear message
    try:
        with open(path, encoding="utf-8") as handle:
            doc = json.load(handle)
    except (OSError, UnicodeDecodeError) as exc:
        raise cannot_read("summary", path, getattr(exc, "strerror", None) or exc) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"summary: {path} is not JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}") from None
    if not isinstance(doc, dict):
        raise InputError(f"summary: {path} holds a JSON {type(doc).__name__}, not an object "
                         "(the --summary of sppjit replay or sppjit compare --json)")
    return doc


def is_compare(doc: dict) -> bool:
    """A compare document (sppjit compare --json) has a "configs" key."""
    return "configs" in doc


def compare_configs(doc: dict) -> list[tuple[str, dict]]:
    """(name, exits by kind) of each configuration of a compare document.

    "configs" is a list of objects (or an object keyed by name); each holds its exits as
    "exits" ({"total": n, "<kind>": n, ...}) or inside "summary"; its name is "name", "label"
    or "id", else made from its "config" (granularity, profile, subpage_check).
    """
    configs = doc.get("configs")
    if isinstance(configs, dict):
        items = [(str(k), v) for k, v in configs.items()]
    elif isinstance(configs, list):
        items = [(None, v) for v in configs]
    else:
        raise InputError("summary: \"configs\" must be a list or an object of configurations")
    if not items:
        raise InputError("summary: the compare document has no configurations")
    out = []
    for index, (key, config) in enumerate(items):
        if not isinstance(config, dict):
            raise InputError(f"summary: configuration {index} is not an object")
        name = key or config.get("name") or config.get("label") or config.get("id")
        if not name:
            name = _config_name(config.get("config")) or f"config {index}"
        exits = config.get("exits")
        if not isinstance(exits, dict) and isinstance(config.get("summary"), dict):
            exits = config["summary"].get("exits")
        if not isinstance(exits, dict):
            raise InputError(f"summary: configuration {name!r} has no \"exits\" object")
        counts = {}
        for kind, value in exits.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            counts[str(kind)] = value
        if not counts:
            raise InputError(f"summary: configuration {name!r} has no exit counts")
        out.append((str(name), counts))
    return out


def _config_name(config) -> str | None:
    if not isinstance(config, dict):
        return None
    if config.get("granularity") == "page":
        name = "page"
    elif "profile" in config:
        name = f"SPP {config['profile']}"
    else:
        return None
    if config.get("granularity") != "page" and config.get("subpage_check") not in (None, "all"):
        name += f" ({config['subpage_check']})"
    return name


def find_seed(doc) -> object:
    """The first "seed" found in a summary (top level, input, generator, ...), else None."""
    if isinstance(doc, dict):
        if "seed" in doc:
            return doc["seed"]
        for value in doc.values():
            if isinstance(value, (dict, list)):
                found = find_seed(value)
                if found is not None:
                    return found
    elif isinstance(doc, list):
        for value in doc:
            found = find_seed(value)
            if found is not None:
                return found
    return None


def versions() -> dict[str, str | None]:
    """Versions of the tools that shaped a report (read from package metadata: no imports)."""
    import platform

    out: dict[str, str | None] = {"sppjit": __version__}
    for name in ("numba", "numpy", "pyarrow", "matplotlib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def file_digest(path: str) -> str:
    """"sha256:<hex>" of a file's bytes, read in 4 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def report_document(stats: ReportStats, *, results: str | None, exits: str | None,
                    summary_path: str | None, summary: dict | None, epochs: int, top: int,
                    outputs: list[str]) -> dict:
    """The report.json: what was read (paths, digests), with what, and the headline numbers."""
    inputs = {}
    for key, path in (("results", results), ("exits", exits), ("summary", summary_path)):
        if path is None:
            inputs[key] = None
            continue
        entry = dict(stats.inputs.get(key, {}))
        entry["path"] = path
        entry["digest"] = file_digest(path)
        inputs[key] = entry
    source = None
    if summary is not None:
        source = {"kind": "compare" if is_compare(summary) else "replay",
                  "sppjit_version": summary.get("sppjit_version"),
                  "seed": find_seed(summary)}
        if is_compare(summary):
            source["configs"] = [name for name, _ in compare_configs(summary)]
            source["config"] = summary.get("config")
        else:
            source["config"] = summary.get("config")
            source["input"] = summary.get("input")
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "report": "sppjit report",
        "sppjit_version": __version__,
        "versions": versions(),
        "inputs": inputs,
        "source": source,
        "options": {"epochs": epochs, "epochs_used": stats.epochs.num_rows, "top": top},
        "totals": stats.totals,
        "top_pages": [_page_json(p) for p in top_pages(stats.per_page, TEXT_TOP)],
        "warnings": stats.warnings,
        "outputs": outputs,
    }


def _page_json(page: dict) -> dict:
    return {"gfn": f"{page['gfn']:#x}", **{k: v for k, v in page.items() if k != "gfn"}}


# ============================================================================ plots

def require_matplotlib():
    """matplotlib, or InputError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise InputError(MATPLOTLIB_MISSING) from None
    return matplotlib


_RC = {
    "font.size": 12,
    "axes.titlesize": 16,
    "axes.labelsize": 13,
    "xtick.labelsize": 11,
    "ytick.labelsize": 11,
    "legend.fontsize": 11,
    "legend.title_fontsize": 12,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def _new_figure():
    """A 1200 x 800 figure on the Agg canvas (no pyplot: no global state, thread-safe)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIG_SIZE, dpi=FIG_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> str:
    """Write the PNG atomically; returns the path."""
    from .io.atomic import atomic_path

    path = os.fspath(path)
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", dpi=FIG_DPI)
    return path


def _thousands(value, _pos=None) -> str:
    return f"{value:,.0f}"


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=16,
            color="#555555", bbox={"boxstyle": "round,pad=0.6", "fc": "#f4f4f4", "ec": "#bbbbbb"})


def plot_exits_over_time(epochs: pa.Table, path: str | os.PathLike, *,
                         title: str | None = None) -> str:
    """Exits per epoch over the trace, stacked by exit kind (one bar per epoch)."""
    import matplotlib as mpl
    from matplotlib.ticker import FuncFormatter

    require_matplotlib()
    with mpl.rc_context(_RC):
        fig = _new_figure()
        ax = fig.add_subplot()
        start = epochs.column("first_row").to_numpy()
        width = epochs.column("rows").to_numpy()
        total = epochs.column("exits").to_numpy()
        known = epochs.column(KINDS[0]).null_count == 0
        bottom = np.zeros(epochs.num_rows, dtype=np.float64)
        series = ([(name, epochs.column(name).to_numpy()) for name in KINDS] if known
                  else [("all kinds (no exit log)", total)])
        for name, values in series:
            if not values.any():
                continue
            ax.bar(start, values, width=width, bottom=bottom, align="edge", linewidth=0,
                   color=KIND_COLORS.get(name, "#777777"), label=name)
            bottom += values
        rows = int(start[-1] + width[-1]) if epochs.num_rows else 0
        ax.set_xlim(0, max(rows, 1))
        ax.set_xlabel("trace row (access number)")
        ax.set_ylabel(f"VM exits per epoch (~{rows / max(epochs.num_rows, 1):,.0f} accesses)")
        ax.xaxis.set_major_formatter(FuncFormatter(_thousands))
        ax.yaxis.set_major_formatter(FuncFormatter(_thousands))
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(title or f"VM exits over the trace: {int(total.sum()):,} exits, "
                              f"{epochs.num_rows:,} epochs over {rows:,} accesses")
        if total.any():
            ax.legend(title="exit kind", loc="upper right", framealpha=0.9)
        else:
            ax.set_ylim(0, 1)
            _empty_note(ax, "no VM exits in this trace")
        return _save(fig, path)


def heatmap_matrix(per_subpage: pa.Table, *, top: int = DEFAULT_TOP,
                   per_page: pa.Table | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gfns, totals, matrix[gfn, subpage]) of the ``top`` pages with the most protection exits.

    Pages are ranked by per_page's ``violations`` (exits) when given, else by the sum of their
    sub-pages' violations; ties go to the lower gfn. Pages without violations are left out.
    """
    if per_page is not None:
        ranked = top_pages(per_page, top, by="violations")
        gfns = np.array([p["gfn"] for p in ranked], dtype=np.uint64)
        totals = np.array([p["violations"] for p in ranked], dtype=np.int64)
    else:
        keys, inverse, _, _ = _groups(per_subpage.column("gfn").to_numpy())
        vals = np.bincount(inverse, weights=per_subpage.column("violations").to_numpy(),
                           minlength=keys.shape[0]).astype(np.int64)
        keep = vals > 0
        keys, vals = keys[keep], vals[keep]
        order = np.lexsort((keys, -vals))[:top]
        gfns, totals = keys[order], vals[order]
    matrix = np.zeros((gfns.shape[0], B.SUBPAGES_PER_PAGE), dtype=np.int64)
    if gfns.shape[0]:
        sel = per_subpage.filter(pc.is_in(per_subpage.column("gfn"), value_set=pa.array(gfns)))
        g = sel.column("gfn").to_numpy()
        row = np.searchsorted(np.sort(gfns), g)
        rank = np.argsort(gfns)[row]  # position in the ranking
        np.add.at(matrix, (rank, sel.column("subpage").to_numpy().astype(np.int64)),
                  sel.column("violations").to_numpy())
    return gfns, totals, matrix


def plot_violations_heatmap(per_subpage: pa.Table, path: str | os.PathLike, *,
                            top: int = DEFAULT_TOP, per_page: pa.Table | None = None,
                            title: str | None = None) -> str:
    """Page x sub-page heatmap of protection exits for the ``top`` hottest protected pages:
    one row per gfn (hex, with its exit count), one column per 128-byte sub-page."""
    import matplotlib as mpl
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.ticker import FuncFormatter

    require_matplotlib()
    gfns, totals, matrix = heatmap_matrix(per_subpage, top=top, per_page=per_page)
    with mpl.rc_context(_RC):
        fig = _new_figure()
        ax = fig.add_subplot()
        ax.set_xlabel("sub-page (128 bytes each: byte offset = 128 x index)")
        ax.set_ylabel("gfn (protection exits on the page)")
        ax.set_xticks(range(B.SUBPAGES_PER_PAGE))
        ax.tick_params(axis="x", labelsize=10)
        if gfns.shape[0] == 0:
            ax.set_xlim(-0.5, B.SUBPAGES_PER_PAGE - 0.5)
            ax.set_yticks([])
            _empty_note(ax, "no protection exits (spp_violation, write_protect) in this replay")
            ax.set_title(title or "Protection exits by sub-page")
            return _save(fig, path)
        cmap = mpl.colormaps["YlOrRd"].with_extremes(bad="#eeeeee")
        vmax = int(matrix.max())
        positive = matrix[matrix > 0]
        log = vmax >= 1000 * max(int(positive.min()), 1)  # else the few hot cells hide the rest
        norm = LogNorm(vmin=1, vmax=vmax) if log else Normalize(vmin=0, vmax=vmax)
        shown = np.ma.masked_equal(matrix, 0)
        image = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        # cell borders, while the cells are large enough to show them
        ax.set_xticks(np.arange(-0.5, B.SUBPAGES_PER_PAGE, 1), minor=True)
        if gfns.shape[0] <= 64:
            ax.set_yticks(np.arange(-0.5, gfns.shape[0], 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.8)
        ax.tick_params(which="minor", length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        step = max(1, -(-gfns.shape[0] // 48))  # at most ~48 labels
        ticks = np.arange(0, gfns.shape[0], step)
        ax.set_yticks(ticks)
        ax.set_yticklabels([f"{int(gfns[i]):#x}  ({int(totals[i]):,})" for i in ticks],
                           fontsize=10 if gfns.shape[0] <= 32 else 8, family="monospace")
        bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02,
                           format=FuncFormatter(_thousands))
        bar.set_label("protection exits whose faulting bytes touch the sub-page")
        ax.set_title(title or f"Protection exits by sub-page: the {gfns.shape[0]} hottest "
                              f"protected page{'s' if gfns.shape[0] != 1 else ''}")
        return _save(fig, path)


def plot_compare_bars(document: dict | str | os.PathLike, path: str | os.PathLike, *,
                      title: str | None = None) -> str:
    """Exits by kind under each configuration of a compare document: grouped bars, one group
    per exit kind (and the total), one bar per configuration."""
    import matplotlib as mpl
    from matplotlib.ticker import FuncFormatter

    require_matplotlib()
    doc = read_summary(os.fspath(document)) if isinstance(document, (str, os.PathLike)) else document
    if not is_compare(doc):
        raise InputError("summary: not a compare document (no \"configs\"): compare bars need "
                         "the output of sppjit compare --json")
    configs = compare_configs(doc)
    kinds = [k for k in KINDS if any(c.get(k) for _, c in configs)]
    extra = sorted({k for _, c in configs for k in c} - set(KINDS) - {"total"})
    groups = kinds + [k for k in extra if any(c.get(k) for _, c in configs)]
    if any("total" in c for _, c in configs) or not groups:
        groups.append("total")
    values = np.array([[float(c.get(g, 0) or 0) for g in groups] for _, c in configs])
    with mpl.rc_context(_RC):
        fig = _new_figure()
        ax = fig.add_subplot()
        x = np.arange(len(groups), dtype=np.float64)
        width = 0.8 / len(configs)
        palette = mpl.colormaps["tab10"]
        positive = values[values > 0]
        log = positive.size > 0 and positive.max() >= 100 * positive.min()
        for j, (name, _) in enumerate(configs):
            bars = ax.bar(x - 0.4 + width * (j + 0.5), values[j], width=width * 0.95,
                          label=name, color=palette(j % 10))
            ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values[j]], padding=2,
                         fontsize=9 if len(configs) * len(groups) <= 24 else 7,
                         rotation=0 if len(configs) <= 3 else 90)
        ax.set_xticks(x)
        ax.set_xticklabels(groups)
        ax.set_xlabel("exit kind")
        ax.set_ylabel("VM exits" + (" (log scale)" if log else ""))
        if log:
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(positive.min() / 2, 0.5), top=positive.max() * 3)
        elif positive.size:
            ax.set_ylim(0, positive.max() * 1.12)
            ax.yaxis.set_major_formatter(FuncFormatter(_thousands))
        else:
            ax.set_ylim(0, 1)
            _empty_note(ax, "no VM exits under any configuration")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(title="configuration", loc="upper left", framealpha=0.9)
        trace = doc.get("input", {}).get("path") if isinstance(doc.get("input"), dict) else None
        ax.set_title(title or ("VM exits by configuration" + (f": {os.path.basename(str(trace))}"
                                                               if trace else "")))
        return _save(fig, path)


# ============================================================================ text

def format_report(stats: ReportStats, *, results: str, exits: str | None,
                  summary_path: str | None, summary: dict | None,
                  written: list[str]) -> str:
    """The printed report: inputs, totals and the pages with the most exits."""
    t = stats.totals
    counts, ex = t["counts"], t["exits"]
    fmt = stats.inputs["results"]["format"]
    rows = [("results", f"{results} ({fmt}, {stats.rows:,} rows)")]
    if exits is not None:
        hooks = ", with hook relevance" if stats.hooks else ""
        rows.append(("exits", f"{exits} ({ex['total']:,} exits{hooks})"))
    if summary is not None:
        if is_compare(summary):
            names = ", ".join(name for name, _ in compare_configs(summary))
            rows.append(("summary", f"{summary_path} (compare: {names})"))
        else:
            cfg = summary.get("config") or {}
            bits = [f"{k} {cfg[k]}" for k in ("granularity", "profile", "subpage_check")
                    if k in cfg]
            seed = find_seed(summary)
            if seed is not None:
                bits.append(f"seed {seed}")
            rows.append(("summary", f"{summary_path}" + (f" ({', '.join(bits)})" if bits else "")))
    rows.append(("accesses", _pairs([("total", counts["accesses"]), ("reads", counts["reads"]),
                                     ("writes", counts["writes"]),
                                     ("fetches", counts["fetches"])])))
    exit_items = [("total", ex["total"])]
    if stats.exit_log:
        exit_items += [(k, ex[k]) for k in KINDS if ex[k]]
    per_k = t["exits_per_1000_writes"]
    text = _pairs(exit_items) + (f"  ({per_k:,.1f} per 1,000 writes)" if per_k is not None else "")
    if not stats.exit_log:
        text += "  (kinds: give --exits)"
    rows.append(("VM exits", text))
    if "hooks" in t:
        rows.append(("hooks", _pairs([("relevant", t["hooks"]["relevant"]),
                                      ("irrelevant", t["hooks"]["irrelevant"])])))
    rows.append(("pages", _pairs([("touched", t["pages"]["touched"]),
                                  ("with exits", t["pages"]["with_exits"]),
                                  ("with violations", t["pages"]["with_violations"])])))
    top = top_pages(stats.per_page, TEXT_TOP)
    width = max(len(label) for label, _ in rows + [("wrote", "")])
    out = "".join(f"{label:<{width}}  {value}\n" for label, value in rows)
    if top:
        out += f"top pages by exits ({len(top)} of {t['pages']['with_exits']:,}):\n"
        header = ("gfn", "exits", "violations", "writes", "first_row", "last_row")
        table = [header] + [(f"{p['gfn']:#x}", f"{p['exits']:,}", f"{p['violations']:,}",
                             f"{p['writes']:,}", f"{p['first_row']:,}", f"{p['last_row']:,}")
                            for p in top]
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        for r in table:
            out += "  " + r[0].ljust(widths[0]) + "".join(
                "  " + c.rjust(w) for c, w in zip(r[1:], widths[1:])) + "\n"
    if written:
        out += f"{'wrote':<{width}}  {', '.join(written)}\n"
    return out


def _pairs(items) -> str:
    return "  ".join(f"{name} {value:,}" for name, value in items)


def write_table(table: pa.Table, path: str) -> str:
    """A statistics table as Parquet, atomically."""
    from .io.output import TableWriter

    with TableWriter(path, table.schema, option="--stats") as writer:
        writer.write_batch(table)
    return path
