"""Exact multi-core replay of one trace: rows sharded by 2 MiB guest-physical region.

``Replay(vm, threads=N)`` hands each piece of a batch (the rows between two timeline
operations) to a ``ShardRunner``. The rules that keep the result equal to the serial replay's
are in docs/parallel.md; in short:

- The regions the piece touches are split into N contiguous ranges of about equal row counts
  (a sample of the rows decides); every row goes to the shard of its first byte's region and
  keeps its row index.
- Barrier rows run serially, on the VM's own state, in trace order: an access whose bytes
  span two regions, a vCPU's first row while it has requests pending, and a row that might
  allocate a table shared by regions (an EPT or SPPT table above the level-1 tables, i.e. its
  GiB has no level-2 table yet in a tree the row may build). Between two barriers the shards
  replay their own rows in parallel (the kernels release the GIL).
- Each shard runs the kernel on a state of its own that shares every array with the VM except
  the scalars and the VMCS: it allocates level-1 tables from chunks of the pool that it alone
  owns (its view of the pool ends at its chunk), keeps its own counters, exit log, touched
  set and exit fields. After the segment the chunks are compacted into the serial layout
  shape (shard by shard), the pointers to moved tables rewritten, the exit logs merged in row
  order, the VMCS exit fields of each vCPU taken from the shard with its latest exit.

Anything this scheme cannot make exact runs serially (docs/parallel.md, "Serial fallbacks").
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from . import bits as B
from .errors import InputError, VmEntryError
from .kernels import layout as L
from .kernels._jit import NUMBA_CACHE, U0, U_PAGE_SHIFT, U_SPP
from .kernels.mmu import ENTRY_FAILURE_MESSAGES, hpa_table, stored_map
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

MAX_THREADS = 64
# Heuristics (results never depend on them; tests set them to 0 to shard everything):
MIN_PIECE_ROWS = 1 << 15  # a smaller piece runs serially: sharding costs more than it gains
MIN_SEGMENT_ROWS = 1 << 12  # rows between two barriers below this run serially too
MIN_GAIN = 1.25  # the piece runs serially when the largest shard holds more than 1/MIN_GAIN of it
SAMPLE_ROWS = 1 << 13  # rows sampled to place the shard boundaries
RESERVE = 2  # pool room set aside per segment, in chunks: a shard that needs more waits a round

# Row flags of the partition pass.
F_STATIC = 1  # always a barrier (spans two regions; a vCPU's first row with requests pending)
F_EPT = 2  # its GiB had no EPT level-2 table when the piece started
F_SPPT = 4  # it may build SPPT paths and its GiB lacked a level-2 table in some SPPT tree
# GiB status bits.
G_EPT = 1
G_SPPT = 2
GIBS = 1 << (B.GPA_BITS - 30)

_U_RWX = np.uint64(B.VMX_EPT_RWX_MASK)
_U_PS = np.uint64(B.PT_PAGE_SIZE_MASK)
_U_ADDR = np.uint64(B.PT64_BASE_ADDR_MASK)
_U_POOL = np.uint64(B.TABLE_POOL_HPA)
_U_SPPT_PRESENT = np.uint64(B.SPPT_PRESENT_MASK)


def _njit(fn):
    return numba.njit(cache=NUMBA_CACHE, nogil=True, _nrt=False)(fn)


def parse_threads(threads) -> int:
    """``threads`` as a count: an integer 1..MAX_THREADS, or "auto" (the cores)."""
    if threads is None:
        return 1
    if isinstance(threads, str):
        if threads.strip().lower() == "auto":
            return max(1, min(MAX_THREADS, os.cpu_count() or 1))
        try:
            threads = int(threads)
        except ValueError:
            raise InputError(f"threads must be 1..{MAX_THREADS} or 'auto', not {threads!r}") from None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 1 <= threads <= MAX_THREADS:
        raise InputError(f"threads must be 1..{MAX_THREADS} or 'auto', not {threads!r}")
    return int(threads)


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        ex = _POOLS.get(workers)
        if ex is None:
            ex = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="sppjit-shard")
        return ex


# ----------------------------------------------------------------------------- compiled helpers
@_njit
def _ept_leaf_spp(st, gfn, spp):
    """Whether the EPT entry that maps ``gfn`` (4 KiB leaf, or a 2 MiB one) has the SPP bit."""
    gpa = gfn << U_PAGE_SHIFT
    t = st.scal[L.SC_EPT_ROOT]
    for lvl in range(4, 0, -1):
        e = st.tables[t, (gpa >> np.uint64(3 + 9 * lvl)) & np.uint64(511)]
        if lvl == 1 or (lvl <= 3 and (e & _U_PS) != U0):
            return (e & spp) != U0
        if (e & _U_RWX) == U0:
            return False
        t = hpa_table(st, e)
        if t < 0:
            return False
    return False


# The row loops below index with uint64 (as the kernels do): numba then emits no
# negative-index wraparound code, which made them 5x slower.
_U1 = np.uint64(1)
_U21 = np.uint64(21)
_U30 = np.uint64(30)
_U_GIB_MASK = np.uint64(GIBS - 1)


@_njit
def _classify(st, gpa, size, bounds, gib_status, flags, sid, r0, r1, spp):
    """Rows r0..r1-1 of a piece: each row's flags (F_*) and its shard (the region ranges split
    at ``bounds``). Chunks of rows are classified by several threads at once."""
    nb = bounds.shape[0]
    r = np.uint64(r0)
    end = np.uint64(r1)
    while r < end:
        first = gpa[r]
        last = first + np.uint64(size[r]) - _U1
        region = first >> _U21
        f = np.uint8(0)
        if (last >> _U21) != region:
            f = np.uint8(F_STATIC)
        gs = gib_status[(first >> _U30) & _U_GIB_MASK]
        if (gs & G_EPT) != 0:
            f |= np.uint8(F_EPT)
        if (gs & G_SPPT) != 0:
            risky = False
            for gfn in (first >> U_PAGE_SHIFT, last >> U_PAGE_SHIFT):
                if stored_map(st, gfn) != np.uint32(B.FULL_SPP_ACCESS) or _ept_leaf_spp(st, gfn, spp):
                    risky = True
            if risky:
                f |= np.uint8(F_SPPT)
        flags[r] = f
        s = np.uint8(0)
        for i in range(nb):
            s += np.uint8(region >= bounds[i])
        sid[r] = s
        r += _U1


@_njit
def _select(sid, s, out, gpa, size, vcpu, kind, insn, ogpa, osize, ovcpu, okind, oinsn):
    """The rows of shard ``s``, in order, into ``out`` and their columns into o* (all one
    longer than sid), in one branch-free pass; returns how many."""
    k = np.uint64(0)
    n = np.uint64(sid.shape[0])
    r = np.uint64(0)
    while r < n:
        out[k] = np.int64(r)
        ogpa[k] = gpa[r]
        osize[k] = size[r]
        ovcpu[k] = vcpu[r]
        okind[k] = kind[r]
        oinsn[k] = insn[r]
        k += np.uint64(sid[r] == s)
        r += _U1
    return np.int64(k)


@_njit
def _next_barrier(cand, cand_flags, cand_gib, k, pos, gib_status):
    """The first candidate at or after index ``k`` whose row is >= pos and is a barrier with
    the GiB status as it is now: (its index in cand, or cand's length)."""
    n = cand.shape[0]
    while k < n:
        if cand[k] >= pos:
            f = cand_flags[k]
            if (f & F_STATIC) != 0:
                return k
            gs = gib_status[cand_gib[k]]
            if (f & F_EPT) != 0 and (gs & G_EPT) != 0:
                return k
            if (f & F_SPPT) != 0 and (gs & G_SPPT) != 0:
                return k
        k += 1
    return n


@_njit
def _last_rows(rows, vcpus, n, last):
    for j in range(n):
        last[vcpus[j]] = rows[j]


@_njit
def _scatter(dst, rows, src, p0, p1):
    for i in range(p0, p1):
        dst[rows[i]] = src[i]


# ----------------------------------------------------------------------------- table structure
def _tree_lacks(st, root: int, present_mask: np.uint64, ept: bool) -> np.ndarray:
    """Per GiB of the 48-bit space: whether building a path down to a level-2 entry under
    ``root`` would allocate a table (an entry of level 4 or 3 on the way is not present), as
    kernels.mmu.ept_table_for / sppt_setup_structure decide it."""
    lacks = np.ones(GIBS, dtype=bool)
    used = int(st.scal[L.SC_NTABLES])
    l4 = st.tables[root]
    for i in np.flatnonzero((l4 & present_mask) != 0):
        e = l4[i]
        a = int(e & _U_ADDR)
        t = (a - B.TABLE_POOL_HPA) >> B.PAGE_SHIFT if a >= B.TABLE_POOL_HPA else -1
        if not 0 <= t < used:
            lacks[i * 512:(i + 1) * 512] = False  # the walk stops: nothing is allocated
            continue
        l3 = st.tables[t]
        lacks[i * 512:(i + 1) * 512] = (l3 & present_mask) == 0
    return lacks


def gib_status(st) -> np.ndarray:
    """G_EPT where the GiB has no EPT level-2 table yet, G_SPPT where some SPPT tree lacks one."""
    status = np.zeros(GIBS, dtype=np.uint8)
    status[_tree_lacks(st, int(st.scal[L.SC_EPT_ROOT]), _U_RWX, True)] |= G_EPT
    for root in sppt_trees(st):
        status[_tree_lacks(st, root, _U_SPPT_PRESENT, False)] |= G_SPPT
    return status


def sppt_trees(st) -> list[int]:
    roots = {int(r) for r in st.sppt_root if r >= 0}
    if st.scal[L.SC_SHARED_SPPT_ROOT] >= 0:
        roots.add(int(st.scal[L.SC_SHARED_SPPT_ROOT]))
    return sorted(roots)


def _index_of(entries: np.ndarray) -> np.ndarray:
    """Pool index an entry's address bits name (-1 below the pool)."""
    a = entries & _U_ADDR
    idx = ((a - _U_POOL) >> np.uint64(B.PAGE_SHIFT)).astype(np.int64)
    return np.where(a >= _U_POOL, idx, -1)


def dangling(st) -> bool:
    """Whether a pointer in the tables (levels 4..2) or a VMCS table pointer names a pool index
    not allocated yet: a table allocated later would give it a meaning that depends on the
    allocation order, which sharding changes (docs/parallel.md)."""
    used = int(st.scal[L.SC_NTABLES])
    top = L.MAX_TABLES
    upper = np.flatnonzero(st.table_level[:used] >= 2)
    if upper.size:
        e = st.tables[upper]
        idx = _index_of(e)
        ept = (st.table_kind[upper] == L.TABLE_EPT)[:, None]
        level = st.table_level[upper][:, None]
        pointer = np.where(ept, ((e & _U_RWX) != 0) & (((e & _U_PS) == 0) | (level == 4)), True)
        if np.any(pointer & (idx >= used) & (idx < top)):
            return True
    for col in (B.VMCS_COL_EPTP, B.VMCS_COL_SPPTP):
        idx = _index_of(st.vmcs[:, col])
        if np.any((idx >= used) & (idx < top)):
            return True
    return False


# ----------------------------------------------------------------------------- shards
class _Shard:
    """One shard's private part of the state, its rows in this piece and what it produced."""

    def __init__(self, index: int, rows: np.ndarray, columns, buffers, touched_top: int, log_capacity: int,
                 keep_log: bool, vcpus: int):
        from .replay import TouchedPages

        self.index = index
        self.rows = rows
        n = rows.shape[0]
        self.columns = []
        for i, c in enumerate(columns):
            view = buffers.get(("col", index, i), n, c.dtype).view()
            view.flags.writeable = False
            self.columns.append(view)
        self.results = tuple(buffers.get(("res", index, i), n, t) for i, t in
                             enumerate((np.uint8, np.uint8, np.uint16)))
        self.touched = TouchedPages(touched_top)
        self.log = L.empty_exit_log(log_capacity)
        self.keep_log = keep_log  # False: only each vCPU's last exit row is kept (discarded log)
        self.last_exit = np.full(vcpus, -1, dtype=np.int64)  # positions in the shard
        self.counters = np.zeros(L.CT_LEN, dtype=np.int64)
        self.chunk_size = 0  # tables it allocated in its last segment, then its chunks' size
        self.chunks: list[list[int]] = []  # [start, used] of each chunk of the pool, in order
        self.stashed: list[tuple] = []

    def close_chunk(self) -> None:
        """Record how much of the current chunk of the pool the shard used."""
        if self.chunks:
            c = self.chunks[-1]
            c[1] = int(self.scal[L.SC_NTABLES]) - c[0]

    def stash_log(self) -> None:
        n = int(self.log.n[0])
        if n:
            _last_rows(self.log.row, self.log.vcpu, n, self.last_exit)
            if self.keep_log:
                self.stashed.append(tuple(a[:n].copy() for a in self.log[:-1]))
            self.log.n[0] = 0

    def take_last_exits(self) -> np.ndarray:
        """Each vCPU's last exit row (of the piece) since the last call, -1 for none."""
        self.stash_log()
        out = np.where(self.last_exit >= 0, self.rows[np.maximum(self.last_exit, 0)], -1)
        self.last_exit[:] = -1
        return out

    def take_log(self) -> list[np.ndarray]:
        self.stash_log()
        parts, self.stashed = self.stashed, []
        if not parts:
            return [a[:0].copy() for a in self.log[:-1]]
        cols = [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
        cols[0] = self.rows[cols[0]]  # positions in the shard -> rows of the piece
        return cols


class _Buffers:
    """Arrays reused from batch to batch (fresh ones would be page-faulted in every batch)."""

    def __init__(self):
        self._arrays: dict = {}

    def get(self, key, n: int, dtype) -> np.ndarray:
        a = self._arrays.get(key)
        if a is None or a.shape[0] < n or a.dtype != np.dtype(dtype):
            a = self._arrays[key] = np.empty(max(n, 1), dtype=dtype)
        return a[:n]


class ShardRunner:
    """Replays pieces of batches for one Replay session on ``threads`` shards."""

    def __init__(self, session, threads: int):
        self.session = session
        self.threads = threads
        self.buffers = _Buffers()
        self.parallel_pieces = 0  # pieces that ran sharded (the others ran serially)
        self.segments = 0
        self.rounds = 0  # extra rounds of a segment, for shards that ran out of pool
        self.barriers = 0

    # ------------------------------------------------------------------ entry point
    def run_piece(self, piece, outcome, exits, reason, keep: bool) -> None:
        from .replay import kernel_columns

        rep, vm = self.session, self.session.vm
        n = len(piece)
        columns = kernel_columns(piece)
        if n < max(MIN_PIECE_ROWS, 1) or self.threads < 2 or dangling(vm.state):
            rep._run_jit(piece, outcome, exits, reason)
            return
        with vm.mmu_lock:  # the shards fill region caches: a control-plane reset must clear them
            vm.caches_in_use()
        bounds = self._bounds(piece.gpa)
        if bounds is None:
            rep._run_jit(piece, outcome, exits, reason)
            return
        st = vm.state
        nshards = bounds.shape[0] + 1
        status = gib_status(st)
        flags = self.buffers.get("flags", n, np.uint8)
        sid = self.buffers.get("sid", n, np.uint8)
        cuts = [n * i // self.threads for i in range(self.threads + 1)]
        self._map(lambda i: _classify(st, piece.gpa, piece.size, bounds, status, flags, sid, cuts[i], cuts[i + 1],
                                      U_SPP), range(self.threads))
        pending = np.flatnonzero(st.requests != 0)
        for v in pending:
            hit = np.flatnonzero(piece.vcpu == v)
            if hit.size:
                flags[hit[0]] |= F_STATIC
        cand = np.flatnonzero(flags)
        cand_flags = flags[cand]
        if np.count_nonzero(cand_flags & F_STATIC) * max(MIN_SEGMENT_ROWS, 1) > n:
            rep._run_jit(piece, outcome, exits, reason)  # barriers everywhere: nothing to gain
            return
        cand_gib = ((piece.gpa[cand] >> np.uint64(30)) & np.uint64(GIBS - 1)).astype(np.int64)
        top = rep.touched.dir.shape[0] << rep.touched.shift
        keep_log = not (rep.on_exits is _discard() and rep.hooks is None)

        for s in range(nshards):  # the buffers, before the threads fill them
            self.buffers.get(("rows", s), n + 1, np.int64)
            for i, c in enumerate(columns):
                self.buffers.get(("col", s, i), n + 1, c.dtype)
            for i, t in enumerate((np.uint8, np.uint8, np.uint16)):
                self.buffers.get(("res", s, i), n, t)

        def build(s):
            out = self.buffers.get(("rows", s), n + 1, np.int64)
            cols = [self.buffers.get(("col", s, i), n + 1, c.dtype) for i, c in enumerate(columns)]
            rows = out[:_select(sid, np.uint8(s), out, *columns, *cols)]
            return _Shard(s, rows, columns, self.buffers, top, rep._log.row.shape[0], keep_log, vm.vcpus)

        shards = self._map(build, range(nshards))
        self.parallel_pieces += 1
        res = (outcome, exits, reason)
        pos, k = 0, 0
        while pos < n:
            k = _next_barrier(cand, cand_flags, cand_gib, k, pos, status)
            b = int(cand[k]) if k < cand.shape[0] else n
            if b - pos >= max(MIN_SEGMENT_ROWS, 1):
                self._parallel(piece, columns, shards, res, keep, pos, b)
                pos = b
            if b < n:  # the barrier, with the short segment before it if there is one
                self._serial(piece, columns, res, pos, b + 1)
                self.barriers += 1
                if cand_flags[k] & (F_EPT | F_SPPT):
                    # It may have built its GiB's tables. (Statuses only ever go from lacking
                    # to present inside a piece: a stale "lacking" costs a barrier, no more.)
                    status = gib_status(vm.state)
            elif pos < n:
                self._serial(piece, columns, res, pos, n)
            pos = b + 1
        for sh in shards:
            merge_touched(rep.touched, sh.touched)

    def _map(self, fn, items) -> list:
        """fn over items, the first on this thread, the others on the pool."""
        items = list(items)
        futures = [_executor(self.threads - 1).submit(fn, x) for x in items[1:]]
        try:
            first = fn(items[0])
        finally:
            rest = [f.result() for f in futures]
        return [first] + rest

    def _bounds(self, gpa: np.ndarray):
        """Region boundaries splitting a sample of the rows into shards of equal weight, or None
        when the largest shard would hold too much of the piece to gain anything."""
        n = gpa.shape[0]
        step = max(1, n // SAMPLE_ROWS)
        regions, weight = np.unique(gpa[::step] >> np.uint64(21), return_counts=True)
        total = int(weight.sum())
        cum = np.cumsum(weight)
        bounds = []
        for s in range(1, self.threads):
            i = int(np.searchsorted(cum, total * s / self.threads, side="left")) + 1
            if i < regions.shape[0] and (not bounds or regions[i] > bounds[-1]):
                bounds.append(regions[i])
        edges = [0] + [int(np.searchsorted(regions, b)) for b in bounds] + [regions.shape[0]]
        shares = [int(cum[e1 - 1] - (cum[e0 - 1] if e0 else 0)) for e0, e1 in zip(edges, edges[1:]) if e1 > e0]
        if not bounds or max(shares) * MIN_GAIN > total:
            return None
        return np.array(bounds, dtype=np.uint64)

    # ------------------------------------------------------------------ serial rows
    def _serial(self, piece, columns, res, a: int, b: int) -> None:
        """Rows a..b-1 of the piece on the VM's own state, as Replay._run_jit runs them."""
        rep, vm = self.session, self.session.vm
        cols = [c[:b] for c in columns]
        out = [r[:b] for r in res]
        row = a
        while True:
            with vm.mmu_lock:
                vm.caches_in_use()
                # The log is always kept here: the merge reads each vCPU's last exit from it.
                status, row, detail = replay_batch(vm.state, *cols, np.int64(piece.first_row), np.int64(row), *out,
                                                   rep._log, True, rep.counters, *rep.touched.arrays())
                if status == STATUS_NEED_TABLES:
                    vm.ensure_tables(table_margin(vm.vcpus) * 64)
            if status == STATUS_DONE:
                return
            if status == STATUS_NEED_TOUCHED:
                rep.touched.grow(2)
            elif status == STATUS_NEED_LOG:
                rep._flush_log()
            elif status != STATUS_NEED_TABLES:
                raise _failure(status, piece.first_row + int(row), int(detail))

    # ------------------------------------------------------------------ parallel rows
    def _parallel(self, piece, columns, shards, res, keep: bool, a: int, b: int) -> None:
        """Rows a..b-1 (no barrier among them): every shard its own rows, in parallel."""
        vm = self.session.vm
        margin = int(table_margin(vm.vcpus))
        work = []
        for sh in shards:
            p0 = int(np.searchsorted(sh.rows, a))
            p1 = int(np.searchsorted(sh.rows, b))
            if p1 > p0:
                work.append([sh, p0, p1, p0])
        if not work:
            return
        self.segments += 1
        base = vm.state
        nt0 = int(base.scal[L.SC_NTABLES])
        alloc = _Allocator(vm, nt0, margin)
        ran = [item[0] for item in work]
        for sh in ran:
            sh.chunk_size = max(4 * margin, 2 * sh.chunk_size)
        alloc.reserve(sum(sh.chunk_size for sh in ran) * RESERVE)
        for sh in ran:
            sh.scal = base.scal.copy()
            sh.vmcs = base.vmcs.copy()
            sh.chunks = []
            alloc.chunk(sh, sh.chunk_size)
        errors = []
        while work:
            # A shard that failed stops; the others go on (one that waited for room may fail on
            # an earlier row, whose error the serial replay would raise).
            stopped = self._round(work, alloc, errors, res if keep else None)
            if not stopped:
                break
            alloc.reserve(sum(2 * item[0].chunk_size for item in stopped) * RESERVE)
            self.rounds += 1
            for item in stopped:
                alloc.chunk(item[0], 2 * item[0].chunk_size)
            work = stopped
        self._merge(piece, ran, nt0, alloc)  # after an error too: the pool stays well formed
        if errors:
            row, status, detail = min(errors)
            raise _failure(status, piece.first_row + row, detail)

    def _round(self, work, alloc, errors, res):
        """Run every shard of ``work`` to its segment's end (or until the pool is full) in
        parallel; returns the items that stopped for room in the pool."""
        stopped = []
        lock = threading.Lock()

        def one(item):
            sh, p0, p1, first = item
            cols = [c[:p1] for c in sh.columns]
            out = [r[:p1] for r in sh.results]
            row = p0
            while True:
                status, row, detail = replay_batch(sh.state, *cols, np.int64(0), np.int64(row), *out, sh.log,
                                                   True, sh.counters, *sh.touched.arrays())
                if status == STATUS_DONE:
                    break
                if status == STATUS_NEED_TABLES:
                    if not alloc.chunk(sh, 2 * sh.chunk_size, lock):
                        item[1] = int(row)
                        with lock:
                            stopped.append(item)
                        return
                elif status == STATUS_NEED_LOG:
                    sh.stash_log()
                elif status == STATUS_NEED_TOUCHED:
                    sh.touched.grow(2)
                else:
                    with lock:
                        errors.append((int(sh.rows[row]), int(status), int(detail)))
                    return
            if res is not None:
                for dst, src in zip(res, sh.results):
                    _scatter(dst, sh.rows, src, first, p1)

        if len(work) == 1:
            one(work[0])
        else:
            futures = [_executor(self.threads - 1).submit(one, item) for item in work[1:]]
            try:
                one(work[0])
            finally:
                for f in futures:
                    f.result()
        return stopped

    # ------------------------------------------------------------------ merge
    def _merge(self, piece, shards, nt0: int, alloc) -> None:
        rep, vm = self.session, self.session.vm
        for sh in shards:
            sh.close_chunk()
        _compact(vm, shards, nt0, alloc.next_free)
        for sh in shards:
            sh.chunk_size = sum(used for _, used in sh.chunks)
        st = vm.state
        base_mmio = int(st.scal[L.SC_MMIO_PAGES])
        for sh in shards:
            st.scal[L.SC_MMIO_PAGES] += int(sh.scal[L.SC_MMIO_PAGES]) - base_mmio
            other = np.arange(L.SC_LEN) != L.SC_NTABLES
            other &= np.arange(L.SC_LEN) != L.SC_MMIO_PAGES
            if np.any(sh.scal[other] != st.scal[other]):
                raise RuntimeError("sppjit internal error: a shard changed VM-wide state")
            rep.counters += sh.counters
            sh.counters[:] = 0
        # The exit fields of each vCPU: those of the shard that has its latest exit.
        last = np.full(vm.vcpus, -1, dtype=np.int64)
        owner = np.full(vm.vcpus, -1, dtype=np.int64)
        for i, sh in enumerate(shards):
            mine = sh.take_last_exits()
            better = mine > last
            last[better] = mine[better]
            owner[better] = i
        for v in np.flatnonzero(owner >= 0):
            st.vmcs[v] = shards[int(owner[v])].vmcs[v]
        if not shards[0].keep_log:
            return
        # Exits: in row order (a row's exits come from one shard, in piece order).
        logs = [sh.take_log() for sh in shards]
        cols = [np.concatenate([lg[i] for lg in logs]) for i in range(len(logs[0]))]
        order = np.argsort(cols[0], kind="stable")
        cols = [c[order] for c in cols]
        cols[0] = cols[0] + piece.first_row
        log = rep._log
        total, done = cols[0].shape[0], 0
        while done < total:
            j = int(log.n[0])
            if j == log.row.shape[0]:
                rep._flush_log()
                j = 0
            m = min(total - done, log.row.shape[0] - j)
            for dst, src in zip(log[:-1], cols):
                dst[j:j + m] = src[done:done + m]
            log.n[0] = j + m
            done += m


def _discard():
    from .replay import discard_exits

    return discard_exits


def _failure(status: int, row: int, detail: int) -> Exception:
    from .reference import ModelLivelock

    if status == STATUS_ENTRY_FAILED:
        v, code = divmod(detail, 16)
        return VmEntryError(f"vCPU {v}: VM entry failed: {ENTRY_FAILURE_MESSAGES[code]}")
    if status == STATUS_LIVELOCK:
        return ModelLivelock(f"row {row}: the guest keeps faulting on {detail:#x}")
    return RuntimeError(f"sppjit internal error: replay kernel status {status}")


class _Allocator:
    """Hands out chunks of the table pool to shards, above every table already allocated."""

    def __init__(self, vm, nt0: int, margin: int):
        self.vm = vm
        self.next_free = nt0
        self.margin = margin

    def reserve(self, extra: int) -> None:
        """Room for ``extra`` more tables beyond the chunks handed out (main thread only)."""
        vm = self.vm
        st = vm.state
        st.scal[L.SC_NTABLES] = self.next_free  # so that a grown pool keeps every chunk
        vm.ensure_tables(extra + self.margin)
        self.pool = vm.state

    def chunk(self, sh, size: int, lock=None) -> bool:
        """A new chunk of ``size`` tables for shard ``sh``; False when the pool has no room."""
        if lock is not None:
            lock.acquire()
        try:
            pool = self.pool
            if pool.tables.shape[0] - self.next_free < size:
                return False
            start = self.next_free
            self.next_free = start + size
            pool.scal[L.SC_NTABLES] = self.next_free
        finally:
            if lock is not None:
                lock.release()
        sh.close_chunk()
        sh.chunk_size = size
        sh.chunks.append([start, 0])
        sh.scal[L.SC_NTABLES] = start
        end = start + size
        sh.state = pool._replace(tables=pool.tables[:end], table_kind=pool.table_kind[:end],
                                 table_level=pool.table_level[:end], scal=sh.scal, vmcs=sh.vmcs)
        return True


def _compact(vm, shards, nt0: int, end: int) -> None:
    """Move the tables the shards allocated in [nt0, end) down to nt0.., shard by shard and
    chunk by chunk (their allocation order), rewrite the pointers to them (level-2 entries,
    region caches) and set the pool's counter: the pool is dense again, as a serial replay
    leaves it."""
    st = vm.state
    src = [np.arange(c0, c0 + used, dtype=np.int64) for sh in shards for c0, used in sh.chunks if used]
    src = np.concatenate(src) if src else np.zeros(0, dtype=np.int64)
    new_end = nt0 + src.shape[0]
    if src.size and np.any(st.table_level[src] != 1):
        raise RuntimeError("sppjit internal error: a shard allocated a table above level 1")
    dst = np.arange(nt0, new_end, dtype=np.int64)
    moved = src != dst
    if np.any(moved):
        remap = np.full(end - nt0, -1, dtype=np.int64)
        remap[src - nt0] = dst
        s, d = src[moved], dst[moved]
        st.tables[d] = st.tables[s]
        st.table_kind[d] = st.table_kind[s]
        st.table_level[d] = st.table_level[s]
        _relocate(st, remap, nt0, end)
    st.table_kind[new_end:end] = L.TABLE_FREE
    st.table_level[new_end:end] = 0
    st.scal[L.SC_NTABLES] = new_end


def _relocate(st, remap: np.ndarray, nt0: int, end: int) -> None:
    """Rewrite every pointer into [nt0, end) through ``remap`` (old index - nt0 -> new index)."""
    used = end
    l2 = np.flatnonzero(st.table_level[:used] == 2)
    if l2.size:
        e = st.tables[l2]
        idx = _index_of(e)
        ept = (st.table_kind[l2] == L.TABLE_EPT)[:, None]
        pointer = np.where(ept, ((e & _U_RWX) != 0) & ((e & _U_PS) == 0), True)
        hit = pointer & (idx >= nt0) & (idx < end)
        if np.any(hit):
            new = remap[idx[hit] - nt0]
            if np.any(new < 0):
                raise RuntimeError("sppjit internal error: a pointer into a shard's unused chunk")
            e[hit] = (e[hit] & ~_U_ADDR) | (_U_POOL + (new.astype(np.uint64) << np.uint64(B.PAGE_SHIFT)))
            st.tables[l2] = e
    # Region caches: payload (index << 4 | flags) for the EPT, the index itself for the SPPT.
    c = st.ept_cache
    valid = c >= 0
    idx = (c & L.CACHE_PAYLOAD_MASK) >> 4
    hit = valid & (idx >= nt0) & (idx < end)
    if np.any(hit):
        c[hit] = _with_index(c[hit], remap[idx[hit] - nt0], 4)
    s = st.sppt_cache
    valid = s >= 0
    idx = s & L.CACHE_PAYLOAD_MASK
    hit = valid & (idx >= nt0) & (idx < end)
    if np.any(hit):
        s[hit] = _with_index(s[hit], remap[idx[hit] - nt0], 0)


def _with_index(entries: np.ndarray, new: np.ndarray, shift: int) -> np.ndarray:
    """Cache entries with their table index replaced (CACHE_INVALID where it has no new home)."""
    low = entries & ((1 << shift) - 1)
    tag = entries & ~np.int64(L.CACHE_PAYLOAD_MASK)
    out = tag | (new << shift) | low
    return np.where(new >= 0, out, L.CACHE_INVALID)


def merge_touched(main, other) -> None:
    """OR the touched set ``other`` into ``main`` (both over the same guest-physical top)."""
    used = np.flatnonzero(other.dir >= 0)
    if not used.size:
        return
    new = used[main.dir[used] < 0]
    main.grow(new.size)
    n = int(main.n[0])
    main.dir[new] = np.arange(n, n + new.size) * main.block
    main.n[0] = n + new.size
    for d in used:
        a, b = int(main.dir[d]), int(other.dir[d])
        main.words[a:a + main.block] |= other.words[b:b + other.block]
