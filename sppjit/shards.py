"""Exact multi-core replay of one trace: rows sharded by 2 MiB guest-physical region.

``Replay(vm, threads=N)`` hands each piece of a batch (the rows between two timeline
operations) to a ``ShardRunner``. The rules that keep the result equal to the serial replay's
are in docs/parallel.md; in short:

- The regions the piece touches are split into N contiguous ranges of about equal row counts
  (a sample of the rows decides); every row goes to the shard of its first byte's region and
  keeps its row index. One pass over the rows, shared by all shards and split among the
  threads (_partition), flags the barrier candidates and buckets the rows by shard.
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

Anything this scheme cannot make exact runs serially, and so does a piece that cannot gain
(a hot working set, few regions: docs/parallel.md, "Serial fallbacks").
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from . import bits as B
from .errors import InputError, VmEntryError
from .io.trace import MAX_ACCESS_SIZE
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
MIN_REGIONS = 64  # a piece whose sample sees fewer 2 MiB regions runs serially (a hot working set)
HOT_SAMPLE_ROWS = 1 << 10  # rows sampled for that rule
MAX_PLAN_ROWS = 1 << 30  # positions in a shard are int32: a longer piece is planned in parts
SAMPLE_ROWS = 1 << 13  # rows sampled to place the shard boundaries
RESERVE = 2  # a stalled shard's next chunk, times this, is how much the pool grows between rounds
HEADROOM = 8  # room made in the pool for each shard's chunks, in accesses' worth (table_margin)
GUESS_TABLES = True  # a shard's first chunk of a piece fits the sampled regions that lack tables
# The rows of a shard's exit log (32 bytes each, mapped only as they are written): a segment's
# exits are merged from the shard's own buffer, and only a segment with more (exits on every
# row of a batch larger than a Mi rows) hands some aside on the way.
LOG_ROWS_LIMIT = 1 << 20

# Row flags of the partition pass.
F_STATIC = 1  # always a barrier (spans two regions; a vCPU's first row with requests pending)
F_EPT = 2  # its GiB had no EPT level-2 table when the piece started
F_SPPT = 4  # it may build SPPT paths and its GiB lacked a level-2 table in some SPPT tree
# GiB status bits (the same bits as the row flags they raise).
G_EPT = F_EPT
G_SPPT = F_SPPT
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


@_njit
def _gib_spp_free(st, gib, spp):
    """Whether no row of GiB ``gib`` can build SPPT paths: no map of the GiB is stored (every
    map there is FULL) and no EPT entry that _ept_leaf_spp can reach under it has the SPP bit
    (a level-1 table counts whole, present or not: conservative). Then _row_flags would give
    none of its rows F_SPPT, and none gains it inside a piece (only the control plane stores
    maps; the fault path sets the SPP bit only where the map is not FULL)."""
    if gib < np.uint64(st.map_dir.shape[0]) and st.map_dir[np.int64(gib)] >= 0:
        return False
    gpa = gib << _U30
    t = st.scal[L.SC_EPT_ROOT]
    for lvl in range(4, 2, -1):  # down to the GiB's level-2 table, as _ept_leaf_spp walks
        e = st.tables[t, (gpa >> np.uint64(3 + 9 * lvl)) & np.uint64(511)]
        if lvl == 3 and (e & _U_PS) != U0:
            return (e & spp) == U0
        if (e & _U_RWX) == U0:
            return True
        t = hpa_table(st, e)
        if t < 0:
            return True
    for i in range(512):
        e = st.tables[t, i]
        if (e & _U_PS) != U0:
            if (e & spp) != U0:
                return False
            continue
        if (e & _U_RWX) == U0:
            continue
        t1 = hpa_table(st, e)
        if t1 < 0:
            continue
        acc = U0
        for j in range(512):
            acc |= st.tables[t1, j]
        if (acc & spp) != U0:
            return False
    return True


@_njit
def _clear_spp_free(st, gibs, status, spp):
    """Clear G_SPPT in ``status`` for each GiB of ``gibs`` where _gib_spp_free holds."""
    for i in range(gibs.shape[0]):
        g = gibs[i]
        if (status[np.int64(g)] & G_SPPT) != 0 and _gib_spp_free(st, g, spp):
            status[np.int64(g)] &= np.uint8(~G_SPPT & 0xFF)


@_njit
def _mark_lacking(st, root, present, bit, status, used):
    """status[g] |= bit for each GiB g where building a path down to a level-2 entry under
    ``root`` would allocate a table (an entry of level 4 or 3 on the way is not present), as
    kernels.mmu.ept_table_for / sppt_setup_structure decide it."""
    for i in range(512):
        e = st.tables[root, i]
        base = i * 512
        if (e & present) == U0:
            for j in range(512):
                status[base + j] |= bit
            continue
        a = e & _U_ADDR
        if a < _U_POOL:
            continue  # the walk stops: nothing is allocated
        t = np.int64((a - _U_POOL) >> U_PAGE_SHIFT)
        if t >= used:
            continue
        for j in range(512):
            if (st.tables[t, j] & present) == U0:
                status[base + j] |= bit


@_njit
def _dangling_tables(st, used, top):
    """Whether an entry of a table of level 4..2 points at a pool index in [used, top)."""
    for t in range(used):
        level = st.table_level[t]
        if level < 2:
            continue
        ept = st.table_kind[t] == L.TABLE_EPT
        for i in range(512):
            e = st.tables[t, i]
            if ept and ((e & _U_RWX) == U0 or ((e & _U_PS) != U0 and level != 4)):
                continue
            a = e & _U_ADDR
            if a >= _U_POOL:
                idx = np.int64((a - _U_POOL) >> U_PAGE_SHIFT)
                if used <= idx < top:
                    return True
    return False


# The row loops below index with uint64 (as the kernels do): numba then emits no
# negative-index wraparound code, which made them 5x slower.
_U1 = np.uint64(1)
_U21 = np.uint64(21)
_U30 = np.uint64(30)
_U_GIB_MASK = np.uint64(GIBS - 1)
_FULL = np.uint32(B.FULL_SPP_ACCESS)


@numba.njit(inline="always", cache=NUMBA_CACHE, nogil=True, _nrt=False)
def _row_flags(st, gpa, size, status, spp, r):
    """Row r's barrier flags (F_*) with the GiB status ``status``."""
    first = gpa[r]
    last = first + np.uint64(size[r]) - _U1
    f = np.uint8((last >> _U21) != (first >> _U21))  # F_STATIC: it spans two regions
    gs = status[(first >> _U30) & _U_GIB_MASK]
    f |= gs & np.uint8(G_EPT)  # F_EPT
    if (gs & G_SPPT) != 0 and (f & F_STATIC) == 0:  # a spanning row is a barrier anyway
        g0 = first >> U_PAGE_SHIFT
        g1 = last >> U_PAGE_SHIFT
        if (stored_map(st, g0) != _FULL or stored_map(st, g1) != _FULL or _ept_leaf_spp(st, g0, spp)
                or _ept_leaf_spp(st, g1, spp)):
            f |= np.uint8(F_SPPT)
    return f


@numba.njit(inline="always", cache=NUMBA_CACHE, nogil=True, _nrt=False)
def _note_barrier(st, gpa, size, status, spp, r, cand, cand_flags, k):
    """Append row r to the barrier candidates (cand[k], cand_flags[k]) when it has flags;
    returns the new count. Rare, or (a GiB's first piece) every row: the test predicts well."""
    f = _row_flags(st, gpa, size, status, spp, r)
    if f != 0:
        cand[k] = np.int64(r)
        cand_flags[k] = f
        k += 1
    return k


@numba.njit(inline="always", cache=NUMBA_CACHE, nogil=True, _nrt=False)
def _put_row(rows, ogpa, osize, ovcpu, okind, oinsn, d, r, g, size, vcpu, kind, insn):
    """Row r (its gpa ``g`` already loaded) into position d of its shard's buffers."""
    rows[d] = np.int32(r)
    ogpa[d] = g
    osize[d] = size[r]
    ovcpu[d] = vcpu[r]
    okind[d] = kind[r]
    oinsn[d] = insn[r]


@_njit
def _partition(st, gpa, size, vcpu, kind, insn, bounds, status, spp, r0, r1, down, stride, rows, ogpa, osize,
               ovcpu, okind, oinsn, counts, cand, cand_flags, info):
    """One chunk of a piece (rows r0..r1-1) in one pass: each row's barrier flags (the flagged
    rows and their flags into cand / cand_flags from index r0 on, in the pass's order) and
    each row into its shard's part of the flat buffers (shard s's at s * stride): its index
    into ``rows``, its columns into ``ogpa`` .. ``oinsn`` (copied here, while the row is in
    hand: on a trace whose small columns all vary, as real ones do, a gather of each
    afterwards made two shards 1.17-1.27x the serial replay where this gives 1.41-1.44x;
    with constant ones the two cost the same). ``down`` False: the chunk's rows of a shard
    go to positions r0, r0+1, ... of its part; True: the pass runs from the last row to the
    first and they end at r1 - 1, in order. So an even chunk (down) and the odd one after it
    meet at their boundary and need no moving afterwards. Out: counts[s] the chunk's rows of
    shard s, info[0] its flagged rows."""
    nb = bounds.shape[0]
    k = np.int64(r0)
    n = np.int64(r1) - np.int64(r0)
    step = np.int64(-1) if down else np.int64(1)
    at = np.int64(r1) if down else np.int64(r0)  # the shards' cursors start here (down: exclusive)
    first = np.int64(r1) - 1 if down else np.int64(r0)
    if nb == 1 and not down:  # two shards: the cursors stay in registers, the loop has no branch
        b = bounds[0]
        d0 = at
        d1 = np.int64(stride) + at
        r = np.uint64(r0)
        while r < np.uint64(r1):
            k = _note_barrier(st, gpa, size, status, spp, r, cand, cand_flags, k)
            g = gpa[r]
            s = np.int64((g >> _U21) >= b)
            d = np.uint64(d0 + s * (d1 - d0))
            _put_row(rows, ogpa, osize, ovcpu, okind, oinsn, d, r, g, size, vcpu, kind, insn)
            d0 += 1 - s
            d1 += s
            r += _U1
        counts[0] = d0 - at
        counts[1] = d1 - np.int64(stride) - at
    elif nb == 1:  # the same, from the last row down
        b = bounds[0]
        d0 = at
        d1 = np.int64(stride) + at
        r = np.uint64(r1)
        while r > np.uint64(r0):
            r -= _U1
            k = _note_barrier(st, gpa, size, status, spp, r, cand, cand_flags, k)
            g = gpa[r]
            s = np.int64((g >> _U21) >= b)
            d0 -= 1 - s
            d1 -= s
            d = np.uint64(d0 + s * (d1 - d0))
            _put_row(rows, ogpa, osize, ovcpu, okind, oinsn, d, r, g, size, vcpu, kind, insn)
        counts[0] = at - d0
        counts[1] = np.int64(stride) + at - d1
    else:
        for i in range(nb + 1):
            counts[i] = np.int64(i) * np.int64(stride) + at  # the cursors, first
        for j in range(n):
            r = np.uint64(first + step * j)
            k = _note_barrier(st, gpa, size, status, spp, r, cand, cand_flags, k)
            g = gpa[r]
            region = g >> _U21
            s = 0
            for i in range(nb):
                s += region >= bounds[i]
            d = counts[s]
            if down:
                d -= 1
            counts[s] = d + 1 - np.int64(down)
            _put_row(rows, ogpa, osize, ovcpu, okind, oinsn, d, r, g, size, vcpu, kind, insn)
        for i in range(nb + 1):
            counts[i] = (counts[i] - np.int64(i) * np.int64(stride) - at) * step
    info[0] = k - np.int64(r0)


@_njit
def _regions_without_leaves(st, regions, out):
    """out[i] = 1 where region regions[i] has no EPT level-1 table nor 2 MiB leaf yet (its
    level-2 entry, or an entry above it, is not present)."""
    for i in range(regions.shape[0]):
        gpa = regions[i] << _U21
        t = st.scal[L.SC_EPT_ROOT]
        out[i] = 1
        for lvl in range(4, 1, -1):
            e = st.tables[t, (gpa >> np.uint64(3 + 9 * lvl)) & np.uint64(511)]
            if (e & _U_RWX) == U0:
                break
            if lvl == 2 or (e & _U_PS) != U0:
                out[i] = 0
                break
            t = hpa_table(st, e)
            if t < 0:
                break


@_njit
def _next_barrier(cand, cand_flags, gpa, k, pos, gib_status):
    """The first candidate at or after index ``k`` whose row is >= pos and is a barrier with
    the GiB status as it is now: (its index in cand, or cand's length)."""
    n = cand.shape[0]
    while k < n:
        if cand[k] >= pos:
            f = cand_flags[k]
            if (f & F_STATIC) != 0:
                return k
            gs = gib_status[(gpa[cand[k]] >> _U30) & _U_GIB_MASK]
            if (f & F_EPT) != 0 and (gs & G_EPT) != 0:
                return k
            if (f & F_SPPT) != 0 and (gs & G_SPPT) != 0:
                return k
        k += 1
    return n


@_njit
def _first_rows_of(gpa, gibs, found, limit):
    """The row by which every GiB of ``gibs`` (sorted; ``found`` zeros, one per GiB) has had
    a row, if that is below ``limit``; else -1."""
    seen = 0
    for r in range(min(limit, gpa.shape[0])):
        g = gpa[r] >> _U30
        i = np.searchsorted(gibs, g)
        if i < gibs.shape[0] and gibs[i] == g and found[i] == 0:
            found[i] = 1
            seen += 1
            if seen == gibs.shape[0]:
                return r
    return -1


@_njit
def _last_exit_rows(exits, vcpu, p0, p1, last):
    """last[v] = the last position in p0..p1-1 of a row of vCPU v that exited (exits > 0),
    where it is later than last[v]: a backward scan that stops when every vCPU has one."""
    missing = 0
    for v in range(last.shape[0]):
        missing += last[v] < p0
    p = p1 - 1
    while p >= p0 and missing > 0:
        if exits[p] != 0:
            v = vcpu[p]
            if last[v] < p0:
                last[v] = p
                missing -= 1
        p -= 1


@_njit
def _last_rows(rows, vcpus, n, last):
    for j in range(n):
        last[vcpus[j]] = rows[j]


@numba.njit(inline="always", cache=NUMBA_CACHE, nogil=True, _nrt=False)
def _copy_exits(src, i, e, dst, j, first_row):
    """Exits i..e-1 of one shard's log (as _merge_logs reads it) to dst from j on, as many as
    fit; returns (i, j) after them."""
    pos, rows, vcpu, gpa, reason, qual, kind, user, insn = src
    d_row, d_vcpu, d_gpa, d_reason, d_qual, d_kind, d_user, d_insn = dst
    cap = d_row.shape[0]
    while j < cap and i < e:
        d_row[j] = np.int64(rows[pos[i]]) + first_row
        d_vcpu[j] = vcpu[i]
        d_gpa[j] = gpa[i]
        d_reason[j] = reason[i]
        d_qual[j] = qual[i]
        d_kind[j] = kind[i]
        d_user[j] = user[i]
        d_insn[j] = insn[i]
        i += 1
        j += 1
    return i, j


@_njit
def _merge_logs(cursor, end, src, first_row, dst, dst_n):
    """Merge the shards' exit logs, each in row order, into the log ``dst`` (its ``dst_n[0]``
    rows filled; ShardRunner._merge gives one with room for them all) until it is full or
    every source is used up. ``src[s]`` is shard
    s's log as (positions in the shard, the shard's rows of the piece, then the other ExitLog
    columns), its entries ``cursor[s]`` to ``end[s]`` still to go. A row's exits all come from
    one shard, in piece order, so taking the lowest row each time is the stable sort by row.
    Linear, and it reads the shards' own buffers: no argsort, no copy of whole logs."""
    j = dst_n[0]
    cap = dst[0].shape[0]
    k = cursor.shape[0]
    while j < cap:
        best = -1
        low = np.int64(0)
        nxt = np.int64(-1)  # the lowest next row of the other shards
        for s in range(k):
            if cursor[s] < end[s]:
                pos, rows = src[s][0], src[s][1]
                r = np.int64(rows[pos[cursor[s]]])
                if best < 0 or r < low:
                    if best >= 0:
                        nxt = low
                    best, low = s, r
                elif nxt < 0 or r < nxt:
                    nxt = r
        if best < 0:
            break
        pos, rows = src[best][0], src[best][1]
        # The run of this shard's exits below every other shard's next row goes in one go (at
        # least one exit: a stuck merge is impossible even if two shards claimed one row).
        stop = cursor[best] + 1
        while stop < end[best] and (nxt < 0 or np.int64(rows[pos[stop]]) < nxt):
            stop += 1
        i, j = _copy_exits(src[best], cursor[best], stop, dst, j, first_row)
        cursor[best] = i
    dst_n[0] = j


@_njit
def _merge_two(cursor, end, a, b, first_row, dst, dst_n):
    """_merge_logs for two shards (the common case), with each source's arrays named. The
    shards' rows alternate every exit or two, at random: while both have exits left, every
    column is chosen by a select rather than a branch (alone, 10 ns an exit against 13 with a
    branch; indexing a tuple of sources at run time cost more still)."""
    pa, ra, va, ga, rsa, qa, ka, ua, ia = a
    pb, rb, vb, gb, rsb, qb, kb, ub, ib = b
    d_row, d_vcpu, d_gpa, d_reason, d_qual, d_kind, d_user, d_insn = dst
    i, ea, m, eb = cursor[0], end[0], cursor[1], end[1]
    j = dst_n[0]
    cap = d_row.shape[0]
    while j < cap and i < ea and m < eb:
        xa = np.int64(ra[pa[i]])
        xb = np.int64(rb[pb[m]])
        t = xa < xb
        d_row[j] = (xa if t else xb) + first_row
        d_vcpu[j] = va[i] if t else vb[m]
        d_gpa[j] = ga[i] if t else gb[m]
        d_reason[j] = rsa[i] if t else rsb[m]
        d_qual[j] = qa[i] if t else qb[m]
        d_kind[j] = ka[i] if t else kb[m]
        d_user[j] = ua[i] if t else ub[m]
        d_insn[j] = ia[i] if t else ib[m]
        i += np.int64(t)
        m += np.int64(not t)
        j += 1
    i, j = _copy_exits(a, i, ea, dst, j, first_row)  # one shard's exits left, at most
    m, j = _copy_exits(b, m, eb, dst, j, first_row)
    cursor[0], cursor[1] = i, m
    dst_n[0] = j


@_njit
def _scatter(d0, d1, d2, rows, s0, s1, s2, p0, p1):
    """The three result columns of a shard's positions p0..p1-1 into their rows."""
    for i in range(p0, p1):
        r = rows[i]
        d0[r] = s0[i]
        d1[r] = s1[i]
        d2[r] = s2[i]


def _mark_lacking_numpy(st, root, present, bit, status, used):
    """_mark_lacking's rule in numpy, for runs with NUMBA_DISABLE_JIT (the test suite's pass
    over the kernels' Python bodies), where its loops over every GiB would take a second a
    call. tests/test_shards.py checks the two agree."""
    top = st.tables[root]
    view = status.reshape(512, 512)
    lacking = (top & present) == U0
    view[lacking] |= bit
    a = top & _U_ADDR
    t = np.where(~lacking & (a >= _U_POOL), ((a - _U_POOL) >> U_PAGE_SHIFT).astype(np.int64), used)
    inside = np.flatnonzero(t < used)
    below = (st.tables[t[inside]] & present) == U0
    view[inside] |= np.where(below, bit, np.uint8(0)).astype(np.uint8)


_MARK_LACKING = _mark_lacking_numpy if numba.config.DISABLE_JIT else _mark_lacking


# ----------------------------------------------------------------------------- table structure
def gib_status(st, out: np.ndarray | None = None) -> np.ndarray:
    """G_EPT where the GiB has no EPT level-2 table yet, G_SPPT where some SPPT tree lacks one
    (into ``out`` when given)."""
    status = np.zeros(GIBS, dtype=np.uint8) if out is None else out
    status[:] = 0
    used = np.int64(st.scal[L.SC_NTABLES])
    _MARK_LACKING(st, np.int64(st.scal[L.SC_EPT_ROOT]), _U_RWX, np.uint8(G_EPT), status, used)
    for root in sppt_trees(st):
        _MARK_LACKING(st, np.int64(root), _U_SPPT_PRESENT, np.uint8(G_SPPT), status, used)
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
    if _dangling_tables(st, np.int64(used), np.int64(top)):
        return True
    for col in (B.VMCS_COL_EPTP, B.VMCS_COL_SPPTP):
        idx = _index_of(st.vmcs[:, col])
        if np.any((idx >= used) & (idx < top)):
            return True
    return False


# ----------------------------------------------------------------------------- shards
def _private(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` in cache lines of its own: small arrays that two shards write (counters
    every row, exit fields every exit) would otherwise share lines (false sharing)."""
    pad = 128 // a.itemsize
    buf = np.zeros(a.size + 2 * pad, dtype=a.dtype)
    out = buf[pad:pad + a.size].reshape(a.shape)
    out[...] = a
    return out


class _Shard:
    """One shard's private part of the state, its rows in this piece and what it produced."""

    def __init__(self, index: int, rows: np.ndarray, columns, results, touched, log, keep_log: bool, vcpus: int):
        self.index = index
        self.rows = rows  # int32: the rows of the piece, in order
        self.columns = columns  # the kernel's columns (read-only views), one entry per row
        self.results = results
        # The shard's touched set and exit log, kept from piece to piece by the runner (the
        # touched set is OR-ed into the replay's after each piece: bits seen before are no harm).
        self.touched = touched
        self.log = log
        log.n[0] = 0
        self.keep_log = keep_log  # False: only each vCPU's last exit row is kept (discarded log)
        self.last_exit = np.full(vcpus, -1, dtype=np.int64)  # positions in the shard
        self.counters = _private(np.zeros(L.CT_LEN, dtype=np.int64))  # written every row
        self.chunk_size = 0  # tables it allocated in its last segment, then its chunks' size
        self.chunks: list[list[int]] = []  # [start, used] of each chunk of the pool, in order
        self.stashed: list[tuple] = []

    def close_chunk(self) -> None:
        """Record how much of the current chunk of the pool the shard used."""
        if self.chunks:
            c = self.chunks[-1]
            c[1] = int(self.scal[L.SC_NTABLES]) - c[0]

    def stash_log(self) -> None:
        """The shard's log is full (STATUS_NEED_LOG, rare: it holds LOG_ROWS_LIMIT rows): keep
        its rows aside and go on."""
        n = int(self.log.n[0])
        if n:
            _last_rows(self.log.row, self.log.vcpu, n, self.last_exit)
            if self.keep_log:
                self.stashed.append(tuple(a[:n].copy() for a in self.log[:-1]))
            self.log.n[0] = 0

    def take_last_exits(self) -> np.ndarray:
        """Each vCPU's last exit row (of the piece) since the last call, -1 for none."""
        n = int(self.log.n[0])
        if n:  # the rows still in the log (take_log hands them on)
            _last_rows(self.log.row, self.log.vcpu, n, self.last_exit)
        out = np.where(self.last_exit >= 0, self.rows[np.maximum(self.last_exit, 0)].astype(np.int64), -1)
        self.last_exit[:] = -1
        return out

    def take_log(self) -> tuple:
        """The exit log since the last call as _merge_logs reads it: (positions in the shard,
        the shard's rows, the other ExitLog columns). The log's own buffers (valid until the
        shard runs again), or one copy of all its parts when it filled."""
        n = int(self.log.n[0])
        self.log.n[0] = 0
        current = tuple(a[:n] for a in self.log[:-1])
        if self.stashed:
            parts, self.stashed = self.stashed + [current], []
            current = tuple(np.concatenate([p[i] for p in parts]) for i in range(len(current)))
        return (current[0], self.rows) + current[1:]


# The shards' buffers, flat: shard s's entries start at s * stride. The trace's columns in the
# kernel's order, then the row index, then the results.
_RESULTS = (np.uint8, np.uint8, np.uint16)


class _Layout:
    """Flat per-shard buffers of one stride, reused by the next pieces that fit (of any replay:
    fresh buffers would be page-faulted in, ~1 ms per 4 MiB, each time)."""

    def __init__(self, shards: int, stride: int, dtypes):
        self.shards = shards
        self.stride = stride
        self.dtypes = list(dtypes)
        self.status = np.empty(GIBS, dtype=np.uint8)
        self.flag_status = np.empty(GIBS, dtype=np.uint8)
        size = shards * stride
        self.rows = np.empty(size, dtype=np.int32)
        self.columns = [np.empty(size, dtype=d) for d in dtypes]
        self.results = [np.empty(size, dtype=d) for d in _RESULTS]
        self.cand = np.empty(stride, dtype=np.int64)
        self.cand_flags = np.empty(stride, dtype=np.uint8)
        self.nbytes = sum(a.nbytes for a in [self.rows, self.cand, self.cand_flags, *self.columns, *self.results])


_LAYOUTS: list[_Layout] = []  # free layouts, largest last
_LAYOUTS_LOCK = threading.Lock()
KEEP_LAYOUTS = 2  # free layouts kept for later pieces (the others are dropped)
KEEP_LAYOUT_BYTES = 256 << 20  # and at most this much memory in them


def _take_layout(shards: int, n: int, dtypes) -> _Layout:
    dtypes = list(dtypes)
    with _LAYOUTS_LOCK:
        for i, lay in enumerate(_LAYOUTS):
            if lay.shards >= shards and lay.stride >= n and lay.dtypes == dtypes:
                return _LAYOUTS.pop(i)
    return _Layout(shards, n, dtypes)


def _give_layout(lay: _Layout) -> None:
    with _LAYOUTS_LOCK:
        _LAYOUTS.append(lay)
        _LAYOUTS.sort(key=lambda x: x.shards * x.stride)
        del _LAYOUTS[:-KEEP_LAYOUTS]
        while _LAYOUTS and sum(x.nbytes for x in _LAYOUTS) > KEEP_LAYOUT_BYTES:
            _LAYOUTS.pop()  # the largest first: memory stays bounded once replays are done


class ShardRunner:
    """Replays pieces of batches for one Replay session on ``threads`` shards."""

    def __init__(self, session, threads: int):
        self.session = session
        self.threads = threads
        self.parallel_pieces = 0  # pieces that ran sharded (the others ran serially)
        self.segments = 0
        self.rounds = 0  # extra rounds of a segment, for shards that ran out of pool
        self.barriers = 0
        self.view_segments = 0  # segments whose shards shared the VM's write view
        self.hot_pieces = 0  # pieces run serially by the working-set rule (docs/parallel.md)
        self._headroom = False  # whether the pool was grown for the shards' chunks
        self._scratch: dict = {}  # shard index -> its touched set and exit log

    # ------------------------------------------------------------------ entry point
    def run_piece(self, piece, outcome, exits, reason, keep: bool, first_rows: bool = True) -> None:
        from .replay import _slice

        rep, vm = self.session, self.session.vm
        n = len(piece)
        if n > MAX_PLAN_ROWS:  # shard positions are int32: a longer piece goes in parts (exact: no op between)
            for a in range(0, n, MAX_PLAN_ROWS):
                b = min(n, a + MAX_PLAN_ROWS)
                self.run_piece(_slice(piece, a, b), outcome[a:b], exits[a:b], reason[a:b], keep)
            return
        if n < max(MIN_PIECE_ROWS, 1) or self.threads < 2:
            rep._run_jit(piece, outcome, exits, reason)
            return
        if MIN_REGIONS and np.unique(_sample(piece.gpa, HOT_SAMPLE_ROWS) >> np.uint64(21)).shape[0] < MIN_REGIONS:
            # A hot working set: its tables and maps stay in the caches, the serial replay runs
            # at a few ns a row, and the planning alone costs about as much (docs/parallel.md).
            self.hot_pieces += 1
            rep._run_jit(piece, outcome, exits, reason)
            return
        if dangling(vm.state):
            rep._run_jit(piece, outcome, exits, reason)
            return
        with vm.mmu_lock:  # the shards fill region caches: a control-plane reset must clear them
            vm.caches_in_use()
        plan = self._bounds(piece.gpa)
        if plan is None:
            rep._run_jit(piece, outcome, exits, reason)
            return
        bounds, regions, edges = plan
        if first_rows:
            # GiBs the sample sees without an EPT level-2 table (a fresh VM): every row there is
            # a barrier candidate until the first builds it. When their first rows all come
            # early, those rows run serially first and the rest is planned without them.
            status = gib_status(vm.state)
            gibs = np.unique(regions >> np.uint64(9))
            lacking = gibs[(status[gibs.astype(np.int64)] & G_EPT) != 0]
            if lacking.size:
                r = int(_first_rows_of(piece.gpa, lacking.astype(np.uint64), np.zeros(lacking.size, np.uint8),
                                       np.int64(n // 8)))
                if 0 <= r < n - 1:
                    rep._run_jit(_slice(piece, 0, r + 1), outcome[:r + 1], exits[:r + 1], reason[:r + 1])
                    self.barriers += 1
                    self.run_piece(_slice(piece, r + 1, n), outcome[r + 1:], exits[r + 1:], reason[r + 1:], keep,
                                   first_rows=False)
                    return
        if not self._headroom:
            # Room in the pool for the shards' chunks beyond what the VM sized it for, made
            # now, while growing it copies few tables (later it would copy them all).
            self._headroom = True
            st = vm.state
            margin = int(table_margin(vm.vcpus))
            vm.ensure_tables(int(st.tables.shape[0]) - int(st.scal[L.SC_NTABLES]) + HEADROOM * margin * self.threads)
        lay = _take_layout(self.threads, n, [c.dtype for c in _kernel_columns(piece)])
        try:
            self._run_split(piece, outcome, exits, reason, keep, lay, bounds, regions, edges)
        finally:
            _give_layout(lay)

    def _run_split(self, piece, outcome, exits, reason, keep, lay, bounds, regions, edges) -> None:
        rep, vm = self.session, self.session.vm
        n = len(piece)
        shards = self._split(piece, lay, bounds, regions, edges)
        if shards is None:
            rep._run_jit(piece, outcome, exits, reason)  # barriers everywhere: nothing to gain
            return
        shards, cand, cand_flags, status = shards
        self.parallel_pieces += 1
        columns = [c for c in _kernel_columns(piece)]
        res = (outcome, exits, reason)
        pos, k = 0, 0
        while pos < n:
            k = _next_barrier(cand, cand_flags, piece.gpa, k, pos, status)
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
                    status = gib_status(vm.state, status)
            elif pos < n:
                self._serial(piece, columns, res, pos, n)
            pos = b + 1
        for sh in shards:
            merge_touched(rep.touched, sh.touched)

    def _split(self, piece, lay, bounds, regions, edges):
        """Classify the piece's rows and copy each into its shard, all threads at once, one
        pass over the rows (_partition); None when barriers are everywhere."""
        rep, vm = self.session, self.session.vm
        st = vm.state
        n = len(piece)
        nshards = bounds.shape[0] + 1
        columns = _kernel_columns(piece)
        stride = lay.stride
        status = gib_status(st, lay.status)
        flag_status = lay.flag_status
        flag_status[:] = status
        # GiBs (those the sample sees) where no row can build SPPT paths: no per-row test there.
        _clear_spp_free(st, np.unique(regions >> np.uint64(9)), flag_status, U_SPP)
        threads = self.threads
        cuts = [n * t // threads for t in range(threads + 1)]
        counts = np.zeros((threads, nshards), dtype=np.int64)
        info = np.zeros((threads, 1), dtype=np.int64)
        out = lay.columns

        def part(t):
            down = t % 2 == 0  # chunks 2j and 2j+1 meet at cuts[2j+1] (see _partition)
            _partition(st, *columns, bounds, flag_status, U_SPP, np.int64(cuts[t]), np.int64(cuts[t + 1]), down,
                       np.int64(stride), lay.rows, *out, counts[t], lay.cand, lay.cand_flags, info[t])
            if down and info[t, 0] > 1:  # flagged rows, last first: in order again
                c = slice(cuts[t], cuts[t] + int(info[t, 0]))
                lay.cand[c] = lay.cand[c][::-1].copy()
                lay.cand_flags[c] = lay.cand_flags[c][::-1].copy()

        self._map(part, range(threads))
        total = counts.sum(axis=0)
        # Where each shard's rows start: its part of the first pair of chunks (see _partition).
        start = cuts[1] - counts[0]
        if threads > 2:
            def finish(s):  # the shard's parts (one per pair of chunks) made contiguous
                base = s * stride
                at = int(start[s] + counts[0, s] + counts[1, s])
                for j in range(2, threads, 2):
                    c0 = int(counts[j, s])
                    c1 = int(counts[j + 1, s]) if j + 1 < threads else 0
                    src = cuts[j + 1] - c0
                    if c0 + c1 and at != src:
                        for a in (lay.rows, *out):
                            a[base + at:base + at + c0 + c1] = a[base + src:base + src + c0 + c1]
                    at += c0 + c1

            self._map(finish, range(nshards))
        parts = [(cuts[t], cuts[t] + int(info[t, 0])) for t in range(threads) if info[t, 0]]
        if len(parts) == 1:
            cand, cand_flags = lay.cand[parts[0][0]:parts[0][1]], lay.cand_flags[parts[0][0]:parts[0][1]]
        else:
            cand = np.concatenate([lay.cand[a:b] for a, b in parts] or [lay.cand[:0]])
            cand_flags = np.concatenate([lay.cand_flags[a:b] for a, b in parts] or [lay.cand_flags[:0]])
        pending = np.flatnonzero(st.requests != 0)
        if pending.size:  # each such vCPU's first row is a barrier
            first = sorted({int(np.argmax(piece.vcpu == v)) for v in pending if np.any(piece.vcpu == v)})
            if first:
                at = np.searchsorted(cand, first)
                there = np.array([i < cand.shape[0] and cand[i] == r for i, r in zip(at, first)], dtype=bool)
                cand_flags = cand_flags.copy()
                cand_flags[at[there]] |= F_STATIC
                new = np.array(first, dtype=np.int64)[~there]
                cand = np.insert(cand, at[~there], new)
                cand_flags = np.insert(cand_flags, at[~there], np.uint8(F_STATIC))
        if np.count_nonzero(cand_flags & F_STATIC) * max(MIN_SEGMENT_ROWS, 1) > n:
            return None
        top = rep.touched.dir.shape[0] << rep.touched.shift
        keep_log = not (rep.on_exits is _discard() and rep.hooks is None)
        self._plan_regions, self._plan_edges = regions, edges
        shards = []
        for s in range(nshards):
            a, m = s * stride + int(start[s]), int(total[s])
            cols = []
            for c in out:
                view = c[a:a + m].view()
                view.flags.writeable = False
                cols.append(view)
            if s not in self._scratch:
                from .replay import TouchedPages

                # Only the rows a segment writes are ever mapped (32 bytes a row: empty_exit_log)
                self._scratch[s] = (TouchedPages(top), L.empty_exit_log(max(LOG_ROWS_LIMIT, rep._log.row.shape[0])))
            sh = _Shard(s, lay.rows[a:a + m], cols, tuple(r[a:a + m] for r in lay.results), *self._scratch[s],
                        keep_log, vm.vcpus)
            shards.append(sh)
        return shards, cand, cand_flags, status

    def _view_shared(self, piece) -> bool:
        """Whether the shards may use the VM's write view: when no two regions of the piece
        share a region-cache entry (every region below the caches' size: all RAM of a guest
        of up to 512 GiB, the usual case). Each shard then writes only the view rows of its
        own regions' entries, as it writes only their cache entries. Where regions share an
        entry, two shards would race on its row of 512 entries, which unlike the caches'
        single words is not benign: the shards then run without a view."""
        st = self.session.vm.state
        entries = st.write_view.shape[1]
        if entries == 0 or entries != st.ept_cache.shape[0]:
            return False
        top = piece.gpa_max if piece.gpa_max is not None else int(piece.gpa.max())
        last = (top + MAX_ACCESS_SIZE) // (B.PAGE_SIZE * B.PAGES_PER_2M)  # a crossing row's second piece too
        return last < min(entries, L.CACHE_REGION_LIMIT)

    def _lacking(self, st, regions, edges) -> list[int]:
        """Per shard, a guess of the tables its rows allocate: the sampled regions without an
        EPT level-1 table, times the trees (the EPT and each SPPT tree) that may need one.
        (Only the pool's layout before compaction depends on it, never a result.)"""
        flags = np.zeros(regions.shape[0], dtype=np.uint8)
        _regions_without_leaves(st, regions, flags)
        trees = 1 + len(sppt_trees(st))
        # A quarter more: the sample misses some regions (a chunk too large costs nothing).
        return [int(flags[e0:e1].sum()) * trees * 5 // 4 for e0, e1 in zip(edges, edges[1:])]

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
        """Region boundaries splitting a sample of the rows into shards of equal weight, with
        the sampled regions (sorted) and each shard's range of them, or None when the largest
        shard would hold too much of the piece to gain anything."""
        regions, weight = np.unique(_sample(gpa) >> np.uint64(21), return_counts=True)
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
        return np.array(bounds, dtype=np.uint64), regions, edges

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
            p0 = int(np.searchsorted(sh.rows, np.int32(a)))  # (an int64 key would copy rows to int64)
            p1 = int(np.searchsorted(sh.rows, np.int32(b)))
            if p1 > p0:
                work.append([sh, p0, p1, p0])
        if not work:
            return
        self.segments += 1
        base = vm.state
        nt0 = int(base.scal[L.SC_NTABLES])
        alloc = _Allocator(vm, nt0, margin)
        alloc.view = self._view_shared(piece)
        self.view_segments += alloc.view
        if not alloc.view:
            # Shards run with no write view: the VM's is zeroed first, so that nothing the
            # shards change can leave it stale for the barrier rows.
            vm.forget_write_view()
        ran = [item[0] for item in work]
        spans = [(item[1], item[2]) for item in work]
        if GUESS_TABLES:
            guess = self._lacking(base, self._plan_regions, self._plan_edges)
        for sh in ran:
            sh.chunk_size = max(4 * margin, guess[sh.index] if GUESS_TABLES else 2 * sh.chunk_size)
        # The chunks come out of the pool's free room; it grows (a copy of every table) only
        # when that room cannot give each shard a few accesses' worth: a serial replay grows
        # it when the room runs out, so sharding should not grow it sooner.
        want = sum(sh.chunk_size for sh in ran)
        free = int(base.tables.shape[0]) - nt0 - margin
        if want > free >= 2 * margin * len(ran):
            for sh in ran:
                sh.chunk_size = max(2 * margin, sh.chunk_size * free // want)
        alloc.reserve(sum(sh.chunk_size for sh in ran))
        for sh in ran:
            sh.scal = _private(base.scal)
            sh.vmcs = _private(base.vmcs)
            sh.chunks = []
            alloc.chunk(sh, sh.chunk_size)
        errors = []
        while work:
            # A shard that failed stops; the others go on (one that waited for room may fail on
            # an earlier row, whose error the serial replay would raise).
            stopped = self._round(work, alloc, errors)
            if not stopped:
                break
            alloc.reserve(sum(2 * item[0].chunk_size for item in stopped) * RESERVE)
            self.rounds += 1
            for item in stopped:
                alloc.chunk(item[0], 2 * item[0].chunk_size)
            work = stopped
        self._merge(piece, ran, nt0, alloc, spans)  # after an error too: the pool stays well formed
        if not errors:
            self._output(piece, ran, spans, res if keep else None, a, b)
        if errors:
            row, status, detail = min(errors)
            raise _failure(status, piece.first_row + row, detail)

    def _round(self, work, alloc, errors):
        """Run every shard of ``work`` to its segment's end (or until the pool is full) in
        parallel; returns the items that stopped for room in the pool."""
        stopped = []
        lock = threading.Lock()

        def one(item):
            sh, p0, p1, _ = item
            cols = [c[:p1] for c in sh.columns]
            out = [r[:p1] for r in sh.results]
            row = p0
            while True:
                # A discarded log is not written (as serially): each vCPU's last exit row is then
                # found from the results instead (_last_exit_rows, in _merge).
                status, row, detail = replay_batch(sh.state, *cols, np.int64(0), np.int64(row), *out, sh.log,
                                                   sh.keep_log, sh.counters, *sh.touched.arrays())
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
    def _merge(self, piece, shards, nt0: int, alloc, spans) -> None:
        rep, vm = self.session, self.session.vm
        for sh, (p0, p1) in zip(shards, spans):
            if not sh.keep_log:
                _last_exit_rows(sh.results[1], sh.columns[2], np.int64(p0), np.int64(p1), sh.last_exit)
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

    # ------------------------------------------------------------------ output
    def _output(self, piece, shards, spans, res, a: int, b: int) -> None:
        """The segment's result columns (``res``, None when the results are not kept) and its
        exits, on every thread at once: thread t takes the rows of its part of a..b-1 from
        every shard. Split by row, no two threads write the same cache line of a result column
        (split by shard, as the rows of two shards interleave, they would write every line
        both), and each part's exits, merged in row order, become an exit batch of their own,
        handed on in row order after the exits the replay's log already holds (those of the
        barrier rows before the segment)."""
        rep = self.session
        keep_log = shards[0].keep_log
        if res is None and not keep_log:
            return
        parts = self.threads
        cuts = np.array([a + (b - a) * t // parts for t in range(parts + 1)], dtype=np.int32)
        # Per shard, the positions of its rows at each cut (its rows of a..b-1 are p0..p1-1).
        at = [np.clip(np.searchsorted(sh.rows, cuts), p0, p1) for sh, (p0, p1) in zip(shards, spans)]
        src = tuple(sh.take_log() for sh in shards) if keep_log else ()
        # Per shard, its exits at each cut: those of the positions before it (the log holds
        # positions, in order).
        log_at = [np.searchsorted(part[0], pos) for part, pos in zip(src, at)]
        first_row = np.int64(piece.first_row)
        if keep_log:
            # Each part's exits start where the earlier parts' end, in one log of the
            # segment's size allocated here: threads that map memory would wait on each
            # other's page faults. Its slices become the exit batches themselves (no copy into
            # the replay's log, then out of it); the merge writes every row.
            lo = np.array(log_at, dtype=np.int64).reshape(len(src), parts + 1)
            counts = (lo[:, 1:] - lo[:, :-1]).sum(axis=0)
            offset = np.concatenate([[0], np.cumsum(counts)])
            log = L.empty_exit_log(int(offset[-1]))

        def part(t):
            if res is not None:
                for sh, pos in zip(shards, at):
                    _scatter(*res, sh.rows, *sh.results, np.int64(pos[t]), np.int64(pos[t + 1]))
            if not keep_log or counts[t] == 0:
                return None
            cursor, end = lo[:, t].copy(), lo[:, t + 1].copy()
            j0, j1 = int(offset[t]), int(offset[t + 1])
            out = tuple(c[j0:j1] for c in log[:-1])
            filled = np.zeros(1, dtype=np.int64)
            if len(src) == 2:
                _merge_two(cursor, end, src[0], src[1], first_row, out, filled)
            else:
                _merge_logs(cursor, end, src, first_row, out, filled)
            if not np.array_equal(cursor, end) or int(filled[0]) != j1 - j0:
                raise RuntimeError("sppjit internal error: the shards' exit logs did not merge")
            from .replay import exit_batch

            return exit_batch(L.ExitLog(*out, filled), j1 - j0, copy=False), out[0]

        batches = self._map(part, range(parts))
        if keep_log:
            rep._flush_log()
            for made in batches:
                if made is not None:
                    rep.emit_exits(*made)


SAMPLE_RUN = 32  # the sample takes runs of consecutive rows: a cache line brings several


def _sample(a: np.ndarray, rows: int | None = None) -> np.ndarray:
    """About ``rows`` (SAMPLE_ROWS) rows of ``a``, spread evenly over it in runs of SAMPLE_RUN."""
    rows = SAMPLE_ROWS if rows is None else rows
    n = a.shape[0]
    if n <= rows:
        return a
    runs = max(1, rows // SAMPLE_RUN)
    starts = np.arange(runs, dtype=np.int64) * ((n - SAMPLE_RUN) // runs)
    return a[(starts[:, None] + np.arange(SAMPLE_RUN, dtype=np.int64)).ravel()]


def _kernel_columns(piece):
    from .replay import kernel_columns

    return kernel_columns(piece)


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
        self.view = False  # whether the shards share the VM's write view (ShardRunner._view_shared)

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
            room = pool.tables.shape[0] - self.next_free
            if room < size:
                if lock is None or room < 2 * self.margin:
                    return False
                size = max(2 * self.margin, room // 2)  # room is short: half of it, some for the others
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
                                 table_level=pool.table_level[:end], scal=sh.scal, vmcs=sh.vmcs,
                                 write_view=pool.write_view if self.view else pool.write_view[:, :0])
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
        runs, at = [], nt0  # (from, to, tables) per chunk: contiguous copies
        for sh in shards:
            for c0, used in sh.chunks:
                if used and c0 != at:
                    runs.append((c0, at, used))
                at += used
        _move_runs((st.tables, st.table_kind, st.table_level), runs)
        _relocate(st, remap, nt0, end)
    st.table_kind[new_end:end] = L.TABLE_FREE
    st.table_level[new_end:end] = 0
    st.scal[L.SC_NTABLES] = new_end


def _memmove(a: np.ndarray, dst: int, src: int, m: int) -> None:
    """a[dst:dst+m] = a[src:src+m] in place. numpy copies an overlapping source aside first
    (a fresh array, page-faulted in): this copies blocks as long as the shift instead, each
    clear of its own source, in the order that reads every block before it is overwritten."""
    shift = abs(src - dst)
    if shift == 0 or m == 0:
        return
    if shift >= m:
        a[dst:dst + m] = a[src:src + m]
        return
    blocks = range(0, m, shift) if dst < src else reversed(range(0, m, shift))
    for k in blocks:
        e = min(m, k + shift)
        a[dst + k:dst + e] = a[src + k:src + e]


def _move_runs(arrays, runs) -> None:
    """a[to:to+m] = a[from:from+m] for each run (from, to, m) of each array, as if all at once:
    a run goes when its destination overlaps no source still to go (a plain memmove), and
    where they form a cycle the smallest is first copied aside."""
    def overlap(a0, n0, a1, n1):
        return a0 < a1 + n1 and a1 < a0 + n0

    pending, aside = list(runs), []
    while pending:
        for i, (s0, d, m) in enumerate(pending):
            if not any(overlap(d, m, s1, m1) for j, (s1, _, m1) in enumerate(pending) if j != i):
                for a in arrays:
                    _memmove(a, d, s0, m)
                del pending[i]
                break
        else:
            i = min(range(len(pending)), key=lambda j: pending[j][2])
            s0, d, m = pending.pop(i)
            aside.append((d, m, [a[s0:s0 + m].copy() for a in arrays]))
    for d, m, copies in aside:
        for a, c in zip(arrays, copies):
            a[d:d + m] = c


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
    valid = c != L.CACHE_INVALID
    idx = (c & L.CACHE_PAYLOAD_MASK) >> 4
    hit = valid & (idx >= nt0) & (idx < end)
    # The write view's rows stay: a moved table keeps every entry, so a row filled under the
    # old cache entry describes the same leaves and vectors under the new one (the one change
    # of an entry's value that keeps its meaning; zeroing the rows would map their pages
    # and make the next segment refill them).
    if np.any(hit):
        new = remap[idx[hit] - nt0]
        c[hit] = _with_index(c[hit], new, 4)
        gone = np.flatnonzero(hit)[new < 0]  # entries left empty: an empty entry has no rows (rule 1)
        if gone.size and st.write_view.shape[1] != 0:
            st.write_view[:, gone, :] = 0
    s = st.sppt_cache
    valid = s != L.CACHE_INVALID
    idx = s & L.CACHE_PAYLOAD_MASK
    hit = valid & (idx >= nt0) & (idx < end)
    if np.any(hit):
        new = remap[idx[hit] - nt0]
        s[hit] = _with_index(s[hit], new, 0)
        lost = new < 0
        if st.write_view.shape[1] != 0 and np.any(lost):  # and their vector-decided entries (rule 2)
            v, slot = np.nonzero(hit)
            st.write_view[v[lost], slot[lost], :] = 0


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
