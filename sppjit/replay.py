"""Replay driver: feeds trace batches to an engine and assembles results, exit log and summary.

Both engines fill the same arrays (outcome, exits, exit_reason per access; the exit log;
counters; the touched-page set), so everything downstream of them is shared.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from . import __version__, compilation
from . import bits as B
from .callable_module import make_callable
from .defaults import BATCH_SIZES, ENGINES
from .errors import InputError, VmEntryError
from .hooks import HookIndex
from .io.sizes import format_size
from .io.trace import TraceBatch, check_vcpus, open_trace, schema_metadata
from .kernels import layout as L
from .kernels.exits import kvm_handle_exit
from .kernels.mmu import ENTRY_FAILURE_MESSAGES, serve_requests
from .provenance import BackgroundDigests, generator_info, versions
from .reference import ModelLivelock, replay_access
from .stats import page_counts

replay_access_handlers = (kvm_handle_exit, serve_requests)  # the compiled rules it calls

SCHEMA_VERSION = 1
EXIT_LOG_CAPACITY = 1 << 16

RESULT_FIELDS = [
    pa.field("outcome", pa.uint8(), nullable=False),
    pa.field("exits", pa.uint8(), nullable=False),
    pa.field("exit_reason", pa.uint16(), nullable=False),
]
EXIT_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("vcpu", pa.uint16(), nullable=False),
        pa.field("gpa", pa.uint64(), nullable=False),
        pa.field("reason", pa.uint16(), nullable=False),
        pa.field("qualification", pa.uint64(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("userspace_exit", pa.uint16(), nullable=False),
        pa.field("insn_len", pa.uint8(), nullable=False),
    ],
    metadata=schema_metadata(),
)
_KIND_NAMES = pa.array(B.EXIT_KIND_NAMES, type=pa.string())


def discard_exits(batch: pa.RecordBatch) -> None:
    """An ``on_exits`` sink that keeps nothing: the counters keep the totals. Given it, and no
    hooks to count, a replay keeps counts only: the JIT kernel writes no exit-log rows at all
    (``Replay.counts_only``)."""


def _slice(batch: TraceBatch, start: int, stop: int) -> TraceBatch:
    """Rows start..stop-1 of a batch (views, no copies)."""
    return TraceBatch(
        gpa=batch.gpa[start:stop],
        size=batch.size[start:stop],
        vcpu=batch.vcpu[start:stop],
        kind=batch.kind[start:stop],
        record_batch=batch.record_batch.slice(start, stop - start),
        first_row=batch.first_row + start,
        insn_len=batch.insn_len[start:stop],
        vcpus_checked=batch.vcpus_checked,
    )


def kernel_columns(batch: TraceBatch) -> tuple[np.ndarray, ...]:
    """gpa, size, vcpu, kind, insn_len as read-only views: numba compiles one machine-code
    version of a kernel per array type, and read-only is part of the type. Columns come
    writable (numpy, generated) or not (zero-copy from Arrow) in any mix; one type for all
    means the replay kernel is compiled (and cached) once."""
    out = []
    for a in (batch.gpa, batch.size, batch.vcpu, batch.kind, batch.insn_len):
        view = a.view()
        view.flags.writeable = False
        out.append(view)
    return tuple(out)


def exit_batch(log: L.ExitLog, n: int, copy: bool = True) -> pa.RecordBatch:
    """The first ``n`` rows of an exit log as an Arrow batch: copies (the log is reused), or,
    with ``copy`` False, the log's own arrays (a log made for this batch alone)."""
    kinds = _KIND_NAMES.take(pa.array(log.kind[:n]))  # codes -> strings, in C++

    def column(a):
        return pa.array(a[:n].copy() if copy else a[:n])

    return pa.RecordBatch.from_arrays(
        [column(log.row), column(log.vcpu), column(log.gpa), column(log.reason), column(log.qual), kinds,
         column(log.user), column(log.insn_len)],
        schema=EXIT_SCHEMA,
    )


class TouchedPages:
    """The distinct gfns a replay touched below ``top`` (the top of the highest memslot), as
    kernels.replay's sparse set: a 32 KiB bitmap block per GiB touched, so memory follows the
    trace, not the guest's size. The JIT kernel fills it itself; the reference engine adds its
    gfns after each batch."""

    def __init__(self, top: int, capacity: int = 4):
        from .kernels.replay import TOUCHED_BLOCK_WORDS, TOUCHED_SHIFT

        self.shift, self.block = TOUCHED_SHIFT, TOUCHED_BLOCK_WORDS
        self.dir = np.full(-(-int(top) >> TOUCHED_SHIFT), -1, dtype=np.int64)
        self.words = L.lazy_zeros(max(1, min(capacity, self.dir.shape[0])) * self.block, np.uint64)
        self.n = np.zeros(1, dtype=np.int64)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.dir, self.words, self.n

    def grow(self, extra: int) -> None:
        """Room for ``extra`` more blocks (at least doubling); new blocks are zero."""
        used = int(self.n[0]) * self.block
        if self.words.shape[0] - used >= extra * self.block:
            return
        words = L.lazy_zeros(max(2 * self.words.shape[0], used + extra * self.block), np.uint64)
        words[:used] = self.words[:used]
        self.words = words

    def add(self, gfns: np.ndarray) -> None:
        gfns = gfns[(gfns >> np.uint64(self.shift)) < np.uint64(self.dir.shape[0])]
        if not gfns.size:
            return
        d = (gfns >> np.uint64(self.shift)).astype(np.int64)
        new = np.unique(d[self.dir[d] < 0])
        self.grow(new.size)
        used = int(self.n[0])
        self.dir[new] = np.arange(used, used + new.size) * self.block
        self.n[0] = used + new.size
        word = self.dir[d] + ((gfns >> np.uint64(6)) & np.uint64(self.block - 1)).astype(np.int64)
        np.bitwise_or.at(self.words, word, np.uint64(1) << (gfns & np.uint64(63)))

    def count(self) -> int:
        """How many gfns are in the set (a popcount over the blocks in use, a few at a time)."""
        total, used = 0, int(self.n[0]) * self.block
        step = 32 * self.block
        for i in range(0, used, step):
            total += int(np.unpackbits(self.words[i:min(used, i + step)].view(np.uint8)).sum(dtype=np.int64))
        return total


@dataclass(repr=False)
class ReplayResult:
    """What ``replay`` returns: ``table`` (the trace's columns plus outcome, exits and
    exit_reason), ``exits`` (the exit log) and ``summary`` (docs/contract.md §5.3)."""

    table: pa.Table
    exits: pa.Table
    summary: dict

    def _facts(self) -> list[tuple[str, str]]:
        """(label, text) rows that say what the result holds, for repr and the notebook."""
        s = self.summary
        config, counts, exits = s.get("config", {}), s.get("counts", {}), s.get("exits", {})
        outcomes = [n.lower() for n in B.OUTCOME_NAMES]
        path = (s.get("input") or {}).get("path")

        def nonzero(doc: dict, names) -> str:
            return ", ".join(f"{name} {doc[name]:,}" for name in names if doc.get(name))

        memory = format_size(int(config.get("memory_bytes", 0)))
        slots = len(config.get("memslots", []))
        facts = [
            ("trace", f"{path or 'in memory'}, {self.table.num_rows:,} rows"),
            ("VM", f"profile {config.get('profile')}, granularity {config.get('granularity')}, "
                   f"subpage_check {config.get('subpage_check')}, {memory} in {slots} "
                   f"memslot{'s' if slots != 1 else ''}, {config.get('vcpus')} vCPUs, "
                   f"engine {s.get('engine')}"),
            ("accesses", f"{counts.get('accesses', 0):,} ("
                         + (nonzero(counts, ("reads", "writes", "fetches")) or "none") + ")"),
            ("outcomes", nonzero(counts, outcomes) or "none"),
            ("exits", f"{exits.get('total', 0):,}"
                      + (f" ({kinds})" if (kinds := nonzero(exits, B.EXIT_KIND_NAMES)) else "")),
        ]
        pages = s.get("pages") or {}
        facts.append(("pages", f"{pages.get('touched', 0):,} touched, "
                               f"{pages.get('protected', 0):,} protected"))
        if "hooks" in s:
            facts.append(("hooks", f"{s['hooks']['relevant']:,} relevant, "
                                   f"{s['hooks']['irrelevant']:,} irrelevant protection exits"))
        return facts

    def __repr__(self) -> str:
        facts = "; ".join(f"{label} {text}" for label, text in self._facts())
        return (f"<ReplayResult {facts}. .table {self.table.num_rows:,} x "
                f"{self.table.num_columns}, .exits {self.exits.num_rows:,} rows, .summary>")

    def _repr_html_(self, preview: int = 5) -> str:
        """The notebook's view: what the result holds, then the first rows of ``table``."""
        from html import escape

        rows = "".join(f"<tr><th style='text-align:left'>{escape(label)}</th>"
                       f"<td style='text-align:left'>{escape(text)}</td></tr>"
                       for label, text in self._facts())
        head = self.table.slice(0, preview)
        names = head.column_names
        header = "".join(f"<th>{escape(name)}</th>" for name in names)
        body = "".join("<tr>" + "".join(f"<td>{escape(_cell(name, row[name]))}</td>" for name in names)
                       + "</tr>" for row in head.to_pylist())
        more = self.table.num_rows - head.num_rows
        caption = f"<p>.table: first {head.num_rows:,} of {self.table.num_rows:,} rows</p>" \
            if more else ""
        return (f"<div><table><caption>ReplayResult</caption>{rows}</table>{caption}"
                f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table></div>")


def _cell(name: str, value) -> str:
    """A result table cell as text (gpa in hex: that is how addresses are read)."""
    return f"{value:#x}" if name == "gpa" and isinstance(value, int) else str(value)


@dataclass
class Replay:
    """One replay of a trace on a VM: runs batches, keeps the counters, streams the exit log."""

    vm: object
    engine: str = "jit"
    on_exits: Callable[[pa.RecordBatch], None] | None = None
    hooks: HookIndex | None = None  # byte-range protection: exits get relevant / hook
    ops: list = field(default_factory=list)  # timeline operations, sorted by "at"
    counters: np.ndarray = field(default_factory=lambda: np.zeros(L.CT_LEN, dtype=np.int64))
    rows: int = 0
    seconds: float = 0.0
    threads: int | str = 1  # JIT engine: shard each batch by 2 MiB region (sppjit.shards)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise InputError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        from .shards import ShardRunner, parse_threads

        self.threads = parse_threads(self.threads)
        self._shards = ShardRunner(self, self.threads) if self.threads > 1 and self.engine == "jit" else None
        self.touched = TouchedPages(max(b + n for b, n in self.vm.config.memslots))
        self._log = L.empty_exit_log(EXIT_LOG_CAPACITY)
        self._exit_batches: list[pa.RecordBatch] = []
        self._batch: TraceBatch | None = None  # the batch whose exits the log holds
        self.ops = sorted(self.ops, key=lambda op: op["at"])
        self._next_op = 0
        self._scratch = None  # result columns reused by run(keep=False)
        self._compiled = False
        self.compile_seconds = 0.0

    # ---------------------------------------------------------------- exit log
    @property
    def counts_only(self) -> bool:
        """Whether nothing needs the exit-log rows (no sink keeps them, no hooks annotate
        them): the JIT kernel then skips writing them, and the counters are the same."""
        return self.on_exits is discard_exits and self.hooks is None

    def _flush_log(self) -> None:
        n = int(self._log.n[0])
        if n and self.on_exits is discard_exits and self.hooks is None:
            self._log.n[0] = 0
        elif n:
            self.emit_exits(exit_batch(self._log, n), self._log.row[:n])
            self._log.n[0] = 0

    def emit_exits(self, rb: pa.RecordBatch, rows: np.ndarray) -> None:
        """Hand on exit-log rows of the current batch (their trace ``rows``), after any the
        log holds: annotated with hook relevance when hooks are set."""
        if self.hooks is not None:
            b = self._batch
            i = rows - b.first_row
            rb = self.hooks.annotate(rb, b.gpa[i], b.size[i], b.kind[i])
        if self.on_exits is not None:
            self.on_exits(rb)
        else:
            self._exit_batches.append(rb)

    def exit_table(self) -> pa.Table:
        self._flush_log()
        return pa.Table.from_batches(self._exit_batches, schema=self.exit_schema)

    @property
    def exit_schema(self) -> pa.Schema:
        if self.hooks is None:
            return EXIT_SCHEMA
        return EXIT_SCHEMA.append(pa.field("relevant", pa.bool_())).append(pa.field("hook", pa.string()))

    # ---------------------------------------------------------------- batches
    def run(self, batch: TraceBatch, keep: bool = True) -> pa.RecordBatch | None:
        """Replay one batch; returns its rows with outcome, exits and exit_reason appended.

        Timeline operations due inside the batch split it: the rows before an operation's
        ``at`` are replayed, the operation is applied, and the replay goes on. With ``keep``
        False nothing is returned and the result columns reuse one buffer (a caller that only
        wants the exit log and the summary pays for no fresh memory per batch).
        """
        for f in RESULT_FIELDS:
            if f.name in batch.record_batch.schema.names:
                raise InputError(f"trace: column '{f.name}' is reserved for the replay's results")
        n = len(batch)
        check_vcpus(batch, self.vm.vcpus)  # the kernels index per-vCPU arrays with it unchecked
        outcome, exits, reason = self._result_columns(n, keep)
        if not self._compiled:
            self._compile(batch, outcome, exits, reason)
        # Kernels compiled lazily inside the loop (a timeline operation's, on a fresh cache)
        # count as compiling, not replaying.
        compiled0 = compilation.thread_seconds()
        t0 = time.perf_counter()
        start = 0
        while start < n:
            self._apply_due_ops(batch.first_row + start)
            stop = n
            if self._next_op < len(self.ops):
                stop = min(n, self.ops[self._next_op]["at"] - batch.first_row)
            piece = batch if (start, stop) == (0, n) else _slice(batch, start, stop)
            self._batch = piece
            # A batch (or the piece between two operations) is atomic for the control plane:
            # ioctls from other threads wait on mmu_lock and take effect at its boundary, as
            # a running guest sees them.
            with self.vm.mmu_lock:
                if self._shards is not None:
                    self._shards.run_piece(piece, outcome[start:stop], exits[start:stop], reason[start:stop], keep)
                elif self.engine == "jit":
                    self._run_jit(piece, outcome[start:stop], exits[start:stop], reason[start:stop])
                else:
                    self._run_reference(piece, outcome[start:stop], exits[start:stop], reason[start:stop])
            self._flush_log()
            start = stop
        compiled = compilation.thread_seconds() - compiled0
        self.seconds += time.perf_counter() - t0 - compiled
        self.compile_seconds += compiled
        self.rows += n
        if not keep:
            return None
        rb = batch.record_batch
        arrays = list(rb.columns) + [pa.array(outcome), pa.array(exits), pa.array(reason)]
        fields = list(rb.schema) + RESULT_FIELDS
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, metadata=schema_metadata()))

    def _compile(self, batch, outcome, exits, reason) -> None:
        """Compile (or load from numba's cache) what this engine calls, outside the timed
        replay: ``seconds`` and ``accesses_per_second`` measure replaying, and the summary
        reports ``compile_seconds`` apart."""
        t0 = time.perf_counter()
        st = self.vm.state
        if self.engine == "jit":
            from .kernels.replay import replay_batch

            # An empty batch of the same array types: compiles, replays nothing.
            empty = tuple(c[:0] for c in kernel_columns(batch))
            replay_batch(st, *empty, np.int64(0), np.int64(0), outcome[:0], exits[:0], reason[:0], self._log,
                         not self.counts_only, self.counters, *self.touched.arrays())
        elif hasattr(replay_access_handlers[0], "compile"):  # numba on
            import numba
            from numba import types

            i64, u64 = types.int64, types.uint64
            handle, serve = replay_access_handlers
            handle.compile((numba.typeof(st), i64, i64, u64, u64, i64))
            serve.compile((numba.typeof(st), i64))
        self.compile_seconds += time.perf_counter() - t0
        self._compiled = True

    def _result_columns(self, n: int, keep: bool):
        if keep:
            return np.empty(n, np.uint8), np.empty(n, np.uint8), np.empty(n, np.uint16)  # all filled
        if self._scratch is None or self._scratch[0].shape[0] < n:
            # np.empty: every row is written before it is read (the kernels preset theirs), and
            # zeroing recycled memory would cost a pass over it (kernels.layout.empty_exit_log).
            self._scratch = (np.empty(n, np.uint8), np.empty(n, np.uint8), np.empty(n, np.uint16))
        return tuple(a[:n] for a in self._scratch)

    def _apply_due_ops(self, row: int) -> None:
        """Apply the timeline operations whose ``at`` is at or before trace row ``row``."""
        while self._next_op < len(self.ops) and self.ops[self._next_op]["at"] <= row:
            self.vm.apply(self.ops[self._next_op])
            self._next_op += 1

    def _run_jit(self, batch, outcome, exits, reason) -> None:
        from .kernels.replay import (
            STATUS_DONE,
            STATUS_ENTRY_FAILED,
            STATUS_LIVELOCK,
            STATUS_NEED_LOG,
            STATUS_NEED_TABLES,
            STATUS_NEED_TOUCHED,
            replay_batch,
            table_margin,
        )

        vm = self.vm
        columns = kernel_columns(batch)
        keep_log = not self.counts_only
        row = 0
        while True:
            with vm.mmu_lock:
                vm.caches_in_use()  # under the lock: a control-plane reset cannot slip in between
                status, row, detail = replay_batch(
                    vm.state, *columns, np.int64(batch.first_row), np.int64(row), outcome, exits, reason, self._log,
                    keep_log, self.counters, *self.touched.arrays(),
                )
                if status == STATUS_NEED_TABLES:
                    vm.ensure_tables(table_margin(vm.vcpus) * 64)
            if status == STATUS_NEED_TOUCHED:
                self.touched.grow(2)
            if status == STATUS_DONE:
                return
            if status == STATUS_NEED_LOG:
                self._flush_log()
            elif status == STATUS_ENTRY_FAILED:
                v, code = divmod(int(detail), 16)
                raise VmEntryError(f"vCPU {v}: VM entry failed: {ENTRY_FAILURE_MESSAGES[code]}")
            elif status == STATUS_LIVELOCK:
                raise ModelLivelock(f"row {batch.first_row + row}: the guest keeps faulting on {int(detail):#x}")

    def _run_reference(self, batch, outcome, exits, reason) -> None:
        from .kernels.replay import table_margin

        vm, c, log = self.vm, self.counters, []
        touched: set[int] = set()
        margin = int(table_margin(vm.vcpus))
        for i in range(len(batch)):
            vm.ensure_tables(margin)
            gpa, size = int(batch.gpa[i]), int(batch.size[i])
            vcpu, kind = int(batch.vcpu[i]), int(batch.kind[i])
            row = batch.first_row + i
            with vm.mmu_lock:
                out, n, last = replay_access(vm, row, gpa, size, vcpu, kind, log, touched, int(batch.insn_len[i]))
            outcome[i], exits[i], reason[i] = out, n, last
            c[L.CT_ACCESSES] += 1
            c[L.CT_KIND + kind] += 1
            c[L.CT_OUTCOME + out] += 1
            c[L.CT_EXITS] += n
        self.touched.add(np.fromiter(touched, dtype=np.uint64, count=len(touched)))
        for rec in log:
            self.counters[L.CT_EXIT_KIND + rec.kind] += 1
            j = int(self._log.n[0])
            if j == self._log.row.shape[0]:
                self._flush_log()
                j = 0
            self._log.row[j], self._log.vcpu[j], self._log.gpa[j] = rec.row, rec.vcpu, rec.gpa
            self._log.reason[j], self._log.qual[j] = rec.reason, rec.qualification
            self._log.kind[j], self._log.user[j] = rec.kind, rec.userspace_exit
            self._log.insn_len[j] = rec.insn_len
            self._log.n[0] = j + 1

    # ---------------------------------------------------------------- summary
    def summary(self, input_info: dict | None = None, digests: dict | None = None,
                generator: dict | None = None) -> dict:
        """The summary JSON (docs/contract.md §5.3). ``digests`` (input name -> "blake3:...") and
        ``generator`` (scenario, seed from the trace's metadata) go into its provenance."""
        c = self.counters
        counts = {
            "accesses": int(c[L.CT_ACCESSES]),
            "reads": int(c[L.CT_KIND + B.ACCESS_READ]),
            "writes": int(c[L.CT_KIND + B.ACCESS_WRITE]),
            "fetches": int(c[L.CT_KIND + B.ACCESS_FETCH]),
        }
        for code, name in enumerate(B.OUTCOME_NAMES):
            counts[name.lower()] = int(c[L.CT_OUTCOME + code])
        exits = {"total": int(c[L.CT_EXITS])}
        for code, name in enumerate(B.EXIT_KIND_NAMES):
            exits[name] = int(c[L.CT_EXIT_KIND + code])
        pages = {"touched": self.touched.count()}
        pages.update(page_counts(self.vm.state))
        extra = {} if self.hooks is None else {"hooks": self.hooks.summary()}
        if self.ops:
            # Operations whose row the trace never reaches are not applied.
            extra["ops"] = {"count": len(self.ops), "applied": self._next_op}
        provenance = {"versions": versions(), "digests": dict(digests or {}), "generator": dict(generator or {})}
        info = dict(input_info or {}, rows=self.rows)
        if generator and "seed" in generator:
            info["seed"] = generator["seed"]
        return {
            "schema_version": SCHEMA_VERSION,
            "sppjit_version": __version__,
            "engine": self.engine,
            "config": dict(self.vm.config.as_dict(), engine=self.engine),
            "input": info,
            "counts": counts,
            "exits": exits,
            "pages": pages,
            "tlb_flushes": int(self.vm.state.scal[L.SC_TLB_FLUSHES]),
            "seconds": self.seconds,
            "compile_seconds": self.compile_seconds,
            "accesses_per_second": self.rows / self.seconds if self.seconds > 0 else 0.0,
            "provenance": provenance,
            **extra,
        }


class ReplayStream:
    """A replay that hands out its per-access results batch by batch (bounded memory).

    Iterate it for the result batches (the trace's columns plus outcome, exits and
    exit_reason); ``exits`` is the exit log so far (a table, whole once the stream is
    exhausted), ``summary`` the summary once it is exhausted, equal to ``replay``'s for the
    same trace apart from timings. The trace is opened and the hooks checked when the
    stream is made, so a bad source fails there, not at the first ``next()``.
    """

    def __init__(self, vm, source, engine: str = "jit", *, batch_size: int = BATCH_SIZES["jit"],
                 hooks=None, ops=None, on_exits: Callable[[pa.RecordBatch], None] | None = None,
                 threads: int | str = 1):
        ops = list(ops or [])
        index = _hook_index(hooks)
        check_hooks_protected(vm, index, ops)
        self._session = Replay(vm, engine, on_exits=on_exits, hooks=index, ops=ops,
                               threads=threads)
        self._reader = open_trace(source, batch_size=batch_size, vcpus=vm.vcpus)
        path = self._reader.path
        self._digests = BackgroundDigests({"trace": path}) if path else None
        self._summary: dict | None = None
        self._on_exits = on_exits
        self._failed: str | None = None  # the error that ended the stream early: no summary

    @property
    def schema(self) -> pa.Schema:
        """The schema of the result batches."""
        return pa.schema(list(self._reader.schema) + RESULT_FIELDS, metadata=schema_metadata())

    @property
    def rows(self) -> int:
        """Trace rows replayed so far."""
        return self._session.rows

    def __iter__(self) -> ReplayStream:
        return self

    def __next__(self) -> pa.RecordBatch:
        if self._failed is not None:
            raise RuntimeError(f"the replay stopped at an error ({self._failed}); it cannot go on")
        batch = None
        try:
            batch = next(self._reader, None)
            if batch is not None:
                return self._session.run(batch)
        except BaseException as exc:  # a half-replayed batch: no summary can be right
            self._failed = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise
        self._finish()
        raise StopIteration

    def _finish(self) -> None:
        if self._summary is None:
            digests = self._digests.result() if self._digests else None
            self._summary = self._session.summary({"path": self._reader.path}, digests,
                                                  generator_info(self._reader.schema))

    @property
    def exhausted(self) -> bool:
        return self._summary is not None

    @property
    def exits(self) -> pa.Table:
        """The exit log of the rows replayed so far (with ``relevant`` and ``hook`` when the
        stream has hooks)."""
        if self._on_exits is not None:
            raise RuntimeError("this stream hands its exit log to on_exits, and keeps none")
        return self._session.exit_table()

    @property
    def summary(self) -> dict:
        """The summary (docs/contract.md §5.3), once every batch has been handed out."""
        if self._failed is not None:
            raise RuntimeError(f"the replay stopped at an error ({self._failed}): no summary")
        if self._summary is None:
            raise RuntimeError(f"the replay is not finished ({self.rows:,} rows so far): iterate "
                               "the stream to its end first")
        return self._summary

    def __repr__(self) -> str:
        state = "finished" if self.exhausted else "streaming"
        return (f"<ReplayStream {state}: {self.rows:,} rows replayed, engine "
                f"{self._session.engine}, trace {self._reader.path or 'in memory'}>")


def replay_batches(vm, source, engine: str = "jit", *, batch_size: int = BATCH_SIZES["jit"],
                   hooks=None, ops=None,
                   on_exits: Callable[[pa.RecordBatch], None] | None = None,
                   threads: int | str = 1) -> ReplayStream:
    """Replay ``source`` batch by batch: a ReplayStream of the per-access result batches,
    with the exit log and, at its end, the summary. ``on_exits`` receives each exit-log
    batch instead of the stream keeping them (memory bounded in the exits too). ``threads``
    > 1 replays each batch on that many shards (docs/parallel.md)."""
    return ReplayStream(vm, source, engine, batch_size=batch_size, hooks=hooks, ops=ops,
                        on_exits=on_exits, threads=threads)


def _hook_index(hooks) -> HookIndex | None:
    if hooks is None or isinstance(hooks, HookIndex):
        return hooks
    return HookIndex.from_ranges(hooks)


def check_hooks_protected(vm, hooks: HookIndex | None, ops=()) -> None:
    """InputError naming the first hook (by address) whose bytes the VM does not write-protect.

    A hook is covered when every sub-page its bytes touch is write-protected in the VM's
    stored access maps (granularity page: when its page's map is not FULL, which protects the
    whole page), or a ``set_subpages`` operation of the timeline ``ops`` gives its page such a
    map. Without that, its relevant and irrelevant counts would be zero for want of
    protection, not for want of writes.
    """
    if hooks is None or not len(hooks.names):
        return
    start, end = hooks.start, hooks.end
    gfn = start >> np.uint64(B.PAGE_SHIFT)
    offset = start & np.uint64(B.PAGE_SIZE - 1)
    low = offset >> np.uint64(B.SUBPAGE_SHIFT)
    high = (offset + (end - start) + np.uint64(B.SUBPAGE_SIZE - 1)) >> np.uint64(B.SUBPAGE_SHIFT)
    one = np.uint64(1)
    needed = ((one << high) - one) ^ ((one << low) - one)  # the hook's sub-pages' bits
    page = vm.config.granularity == "page"

    def covered_by(maps: np.ndarray) -> np.ndarray:
        maps = maps.astype(np.uint64)
        if page:
            return maps != np.uint64(B.FULL_SPP_ACCESS)
        return (maps & needed) == 0

    with vm.mmu_lock:  # the maps of an inactive SPP are none (v12's memslot quirk)
        gfns, maps = L.stored_maps(vm.state) if vm.spp_active else (None, None)
    stored = np.full(gfn.shape[0], B.FULL_SPP_ACCESS, dtype=np.uint64)
    if gfns is not None and gfns.size:
        at = np.minimum(np.searchsorted(gfns, gfn), gfns.shape[0] - 1)
        hit = gfns[at] == gfn
        stored[hit] = maps[at[hit]]
    covered = covered_by(stored)
    for op in ops:
        if covered.all():
            break
        if not isinstance(op, dict) or op.get("op") != "set_subpages":
            continue
        try:
            base, count, access = (int(op["gfn"]), int(op.get("npages", 1)), int(op["access"]))
        except (KeyError, TypeError, ValueError):
            continue  # the replay reports a malformed operation itself
        inside = (gfn >= np.uint64(max(base, 0))) & (gfn < np.uint64(max(base + count, 0)))
        covered |= inside & covered_by(np.full(gfn.shape[0], access & B.FULL_SPP_ACCESS, np.uint64))
    if covered.all():
        return
    i = int(np.argmin(covered))
    raise InputError(
        f"hooks: hook {hooks.names[i]!r} (gpa {int(start[i]):#x}, {int(end[i] - start[i])} bytes) "
        "is not write-protected on this VM, so no exit could be told relevant: place the "
        "matching protection first (maps = sppjit.ranges_to_maps(ranges); "
        "vm.protect(maps.gfn, maps.access)), or give the VM a timeline that does")


def replay(vm, source, engine: str = "jit", *, batch_size: int = BATCH_SIZES["jit"], hooks=None,
           ops=None, threads: int | str = 1) -> ReplayResult:
    """Replay a whole trace and keep every result in memory (see replay_batches for streams).

    ``hooks`` (a sppjit.io.protect.ByteRanges or HookIndex) adds the hook relevance of
    docs/contract.md §2.2: ``relevant`` and ``hook`` in the exit log, ``hooks`` in the
    summary; the VM must already write-protect every hook (check_hooks_protected). ``ops`` is
    a timeline: dicts {"at", "op", "gfn", "npages", "access"} applied before the access at
    row ``at`` (see VM.apply). ``threads`` > 1 replays each batch on that many shards
    (docs/parallel.md): the same results, exit log, summary and state.
    """
    stream = ReplayStream(vm, source, engine, batch_size=batch_size, hooks=hooks, ops=ops,
                          threads=threads)
    batches = list(stream)
    if batches:
        table = pa.Table.from_batches(batches)
    else:
        table = pa.table({f.name: pa.array([], type=f.type) for f in stream.schema})
    return ReplayResult(table=table, exits=stream.exits, summary=stream.summary)


# ``sppjit.replay(...)`` calls replay(); the module's other names stay reachable.
make_callable(__name__, "replay")
