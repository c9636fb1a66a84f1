"""The per-access work of ``sppjit report`` on one batch of results, in one compiled pass.

sppjit.report.analysis groups a batch with a dozen numpy passes (checks, conversions,
grouping, per-group counts, merging into running tables); above a row count it calls these
kernels instead, which do the same attribution (the rules are in sppjit.report's docstring)
row by row, straight into running per-page and per-sub-page hash tables that live across
batches. The caller owns every array: the kernels allocate nothing and keep no state.

Each table is keyed by gfn or by sub-page number (gpa >> 7; the caller has checked that every
access ends inside the 48-bit guest-physical space, so keys fit an int64). Its rows are a
dense window, row = key - base for the ``span`` keys from ``base`` (a working set: the caller
sizes it from the first batch; span 0 for none), then an open-addressing hash table (linear
probing, a power-of-two capacity, at most half full) for every other key. Column 0 holds the
key plus one, so that zeroed memory is an empty table (and the OS maps its pages only when
touched). Each table is split into a hot part, touched by every access, and a cold part,
touched by exits only, so that an access costs one cache line per table:

- pages, hot (PAGE_HOT columns): key, first row, last row, reads, writes, fetches, exits,
  violations; cold (PAGE_COLD): one count per exit kind, relevant, irrelevant exits;
- sub-pages, hot (SUB_HOT): key, writes; cold (SUB_COLD): violations, relevant, irrelevant.

Rows arrive in trace order, so a key's first row is the row that inserts it and its last
row the latest that touches it. A kernel returns GROW (with where it stopped in ``state``)
when a hash table could pass half full within the next row; the caller doubles it
(``rehash``) and calls again from there.
"""

import numpy as np

from sppjit import bits as B

from ._jit import U1, U_PAGE_SHIFT, U_SUBPAGE_SHIFT, inline, kernel, prefetch

# Hot page columns.
P_KEY, P_FIRST, P_LAST, P_READS, P_EXITS, P_VIOLATIONS = 0, 1, 2, 3, 6, 7
PAGE_HOT = 8  # P_READS + kind is reads, writes, fetches
# Cold page columns: exit kind codes 0..6, then hook relevance.
PC_RELEVANT = len(B.EXIT_KIND_NAMES)
PC_IRRELEVANT = PC_RELEVANT + 1
PAGE_COLD = PC_IRRELEVANT + 1
# Sub-page columns.
S_KEY, S_WRITES = 0, 1
SUB_HOT = 2
SC_VIOLATIONS, SC_RELEVANT, SC_IRRELEVANT = 0, 1, 2
SUB_COLD = 3

# state[]: in and out of accumulate (ST_PAGES, ST_SUBS: keys in the hash tables).
ST_PAGES, ST_SUBS, ST_ROW, ST_EXIT, ST_BAD, ST_EXITS_TOTAL = 0, 1, 2, 3, 4, 5
ST_PAGE_BASE, ST_PAGE_SPAN, ST_SUB_BASE, ST_SUB_SPAN = 6, 7, 8, 9  # the dense windows
STATE = 10
# accumulate's return values.
DONE, GROW, OUTSIDE = 0, 1, 2

EMPTY = 0
PREFETCH_DISTANCE = 16  # rows ahead whose table rows are prefetched (dense windows only)
MIN_BITS = 10  # the smallest table: 1024 slots
MAX_PAGES_A_ROW = 2  # an access of at most a page spans at most two pages
MAX_SUBS_A_ROW = B.PAGE_SIZE // B.SUBPAGE_SIZE + 1  # ... and at most 33 sub-pages

_U32 = np.uint64(0xFFFFFFFF)
_U16 = np.uint64(16)
_U13 = np.uint64(13)
_U32_SHIFT = np.uint64(32)
_MIX1 = np.uint64(0x85EBCA6B)  # murmur3's 32-bit finaliser constants
_MIX2 = np.uint64(0xC2B2AE35)
_GOLDEN = np.uint64(0x9E3779B9)
_WRITE = np.int64(B.ACCESS_WRITE)
_NEVER = np.int64(2**63 - 1)  # the next epoch's first row, in the last epoch
_ALLOWED = np.int64(B.OUTCOME_ALLOWED)
_SPP_VIOLATION = np.int64(B.OUTCOME_SPP_VIOLATION)
_WP_VIOLATION = np.int64(B.OUTCOME_WRITE_PROTECT_VIOLATION)
_KIND_SPP = np.int64(B.EXIT_KIND_SPP_VIOLATION)
_KIND_WP = np.int64(B.EXIT_KIND_WRITE_PROTECT)


@inline
def _fmix32(h):
    """murmur3's finaliser on a value below 2**32 (uint64): every product stays below 2**64,
    so the Python body (NUMBA_DISABLE_JIT) computes the same without overflow."""
    h ^= h >> _U16
    h = (h * _MIX1) & _U32
    h ^= h >> _U13
    h = (h * _MIX2) & _U32
    h ^= h >> _U16
    return h


@inline
def _home(key, mask):
    """The first slot probed for ``key`` (int64, below 2**41): both halves mixed, so that keys
    in runs, strides or far apart spread alike."""
    k = np.uint64(key)
    h = _fmix32((k & _U32) ^ ((_fmix32(k >> _U32_SHIFT) * _GOLDEN) & _U32))
    return np.int64(h & np.uint64(mask))


@inline
def _find(table, key, base, span, mask):
    """(row of ``key``, whether this call inserted it): in the dense window if it holds the
    key, else in the hash table after it (``mask``: its capacity - 1)."""
    stored = key + 1
    off = key - base
    if off >= 0 and off < span:
        if table[off, 0] == EMPTY:
            table[off, 0] = stored
            return off, True
        return off, False
    h = _home(key, mask)
    while True:
        slot = span + h
        held = table[slot, 0]
        if held == stored:
            return slot, False
        if held == EMPTY:
            table[slot, 0] = stored
            return slot, True
        h = (h + 1) & mask


@inline
def _page_slot(page_hot, p, r, pbase, pspan, pmask):
    """(row of page ``p``, 1 if it was new in the hash table else 0), its first row set to
    ``r`` when it is new."""
    slot, new = _find(page_hot, p, pbase, pspan, pmask)
    hashed = np.int64(0)
    if new:
        page_hot[slot, P_FIRST] = r
        if slot >= pspan:
            hashed = np.int64(1)
    return slot, hashed


@inline
def _page_access(page_hot, slot, r, k):
    """An access of kind ``k`` at row ``r`` to the page in row ``slot``."""
    page_hot[slot, P_LAST] = r
    page_hot[slot, P_READS + k] += 1


@kernel
def check_columns(gpa, size, kind, outcome, kinds, outcomes, gpa_limit):
    """Whether some row has a size outside 1..4096, a kind or an outcome beyond its codes, or
    an access ending beyond ``gpa_limit`` (the 48-bit guest-physical space). (The caller then
    lets the numpy checks say which, as the numpy path would; no early exit keeps the loop
    vectorised.)"""
    limit = np.uint64(gpa_limit)
    top = np.uint64(B.PAGE_SIZE)
    bad = False
    for i in range(gpa.shape[0]):
        s = np.uint64(size[i])
        bad |= ((s < U1) | (s > top) | (np.int64(kind[i]) >= kinds)
                | (np.int64(outcome[i]) >= outcomes) | (gpa[i] > limit - s))
    return bad


@kernel
def accumulate(gpa, size, kind, outcome, nexits, first, erow, egpa, ekind, erel, has_log,
               ep_start, e0, ep_accesses, ep_writes, ep_exits, ep_violations, kinds_total,
               outcomes_total, page_hot, page_cold, sub_hot, sub_cold, state):
    """Attribute results rows state[ST_ROW].. of a batch (global rows first + i), and with an
    exit log (``has_log``) the exits state[ST_EXIT].. of those rows (erow, egpa, ekind, erel:
    trace row, gpa, kind code, relevance -1 null / 0 / 1), to the tables, the epochs (row r in
    the epoch e with ep_start[e] <= r < ep_start[e + 1], e0 that of the batch's first row) and
    the totals. Without a log, the results' exits and protection outcomes count on each
    access's first page (the log's exits per epoch are the caller's).

    Returns DONE, GROW (state[ST_ROW], state[ST_EXIT]: where to resume) or OUTSIDE
    (state[ST_BAD]: the first exit whose gpa is outside its row's access)."""
    m = gpa.shape[0]
    n_exits = erow.shape[0]
    n_epochs = ep_start.shape[0]
    pbase, pspan = state[ST_PAGE_BASE], state[ST_PAGE_SPAN]
    sbase, sspan = state[ST_SUB_BASE], state[ST_SUB_SPAN]
    pmask = page_hot.shape[0] - pspan - 1
    smask = sub_hot.shape[0] - sspan - 1
    plimit = (pmask + 1) // 2 - MAX_PAGES_A_ROW
    slimit = (smask + 1) // 2 - MAX_SUBS_A_ROW
    pages = state[ST_PAGES]
    subs = state[ST_SUBS]
    j = state[ST_EXIT]
    total_exits = state[ST_EXITS_TOTAL]
    # Counted in registers and added to the arrays when the epoch ends or the call returns:
    # the rows, writes, results' exits and protection outcomes of epoch e so far, the writes
    # and the allowed accesses (the common kind and outcome; the others go to the arrays).
    e = e0
    next_start = ep_start[e + 1] if e + 1 < n_epochs else _NEVER
    e_rows = e_writes = e_exits = e_violations = np.int64(0)
    n_writes = n_allowed = np.int64(0)
    # The last key found in each table: runs of accesses to one page or sub-page skip the probe.
    last_page, last_pslot = np.int64(-1), np.int64(0)
    last_sub, last_sslot = np.int64(-1), np.int64(0)
    status = DONE
    sub_base = np.uint64(sub_hot.ctypes.data)
    page_base = np.uint64(page_hot.ctypes.data)
    i = state[ST_ROW]
    while i < m:
        if i + PREFETCH_DISTANCE < m:
            ahead = gpa[i + PREFETCH_DISTANCE]
            off = np.int64(ahead >> U_SUBPAGE_SHIFT) - sbase
            if off >= 0 and off < sspan:
                prefetch(sub_base + np.uint64(off) * np.uint64(SUB_HOT * 8))
            off = np.int64(ahead >> U_PAGE_SHIFT) - pbase
            if off >= 0 and off < pspan:
                prefetch(page_base + np.uint64(off) * np.uint64(PAGE_HOT * 8))
        if pages > plimit or subs > slimit:
            status = GROW
            break
        r = first + i
        if r >= next_start:
            ep_accesses[e] += e_rows
            ep_writes[e] += e_writes
            ep_exits[e] += e_exits
            ep_violations[e] += e_violations
            e_rows = e_writes = e_exits = e_violations = 0
            while e + 1 < n_epochs and r >= ep_start[e + 1]:
                e += 1
            next_start = ep_start[e + 1] if e + 1 < n_epochs else _NEVER
        g = gpa[i]
        end = g + np.uint64(size[i])
        k = np.int64(kind[i])
        o = np.int64(outcome[i])
        x = np.int64(nexits[i])
        if k == _WRITE:
            n_writes += 1
        else:
            kinds_total[k] += 1
        if o == _ALLOWED:
            n_allowed += 1
        else:
            outcomes_total[o] += 1
        total_exits += x
        e_rows += 1

        # ---- every page the access touches
        p0 = np.int64(g >> U_PAGE_SHIFT)
        p1 = np.int64((end - U1) >> U_PAGE_SHIFT)
        if p0 == last_page:
            slot0 = last_pslot
        else:
            slot0, hashed = _page_slot(page_hot, p0, r, pbase, pspan, pmask)
            pages += hashed
        _page_access(page_hot, slot0, r, k)
        slot1 = slot0
        if p1 != p0:
            slot1, hashed = _page_slot(page_hot, p1, r, pbase, pspan, pmask)
            pages += hashed
            _page_access(page_hot, slot1, r, k)
        last_page, last_pslot = p1, slot1

        # ---- every sub-page its bytes write
        if k == _WRITE:
            e_writes += 1
            for q in range(np.int64(g >> U_SUBPAGE_SHIFT),
                           np.int64((end - U1) >> U_SUBPAGE_SHIFT) + 1):
                if q == last_sub:
                    sslot = last_sslot
                else:
                    sslot, new = _find(sub_hot, q, sbase, sspan, smask)
                    if new and sslot >= sspan:
                        subs += 1
                    last_sub, last_sslot = q, sslot
                sub_hot[sslot, S_WRITES] += 1

        if has_log:
            # ---- its exits: on the page of the logged gpa; a protection exit's faulting
            # piece (the logged gpa to the end of the access or the page) per sub-page
            while j < n_exits and erow[j] == r:
                eg = egpa[j]
                if eg < g or eg >= end:
                    state[ST_BAD] = j
                    state[ST_PAGES], state[ST_SUBS] = pages, subs
                    return OUTSIDE
                egfn = eg >> U_PAGE_SHIFT
                slot = slot0 if np.int64(egfn) == p0 else slot1
                ek = ekind[j]
                rel = erel[j]
                page_cold[slot, ek] += 1
                page_hot[slot, P_EXITS] += 1
                if rel == 1:
                    page_cold[slot, PC_RELEVANT] += 1
                elif rel == 0:
                    page_cold[slot, PC_IRRELEVANT] += 1
                if ek == _KIND_SPP or ek == _KIND_WP:
                    page_hot[slot, P_VIOLATIONS] += 1
                    vend = min(end, (egfn + U1) << U_PAGE_SHIFT)
                    for q in range(np.int64(eg >> U_SUBPAGE_SHIFT),
                                   np.int64((vend - U1) >> U_SUBPAGE_SHIFT) + 1):
                        sslot, new = _find(sub_hot, q, sbase, sspan, smask)
                        if new and sslot >= sspan:
                            subs += 1
                        sub_cold[sslot, SC_VIOLATIONS] += 1
                        if rel == 1:
                            sub_cold[sslot, SC_RELEVANT] += 1
                        elif rel == 0:
                            sub_cold[sslot, SC_IRRELEVANT] += 1
                j += 1
        else:
            # ---- no log: the results' exits and a protection outcome on the first page
            page_hot[slot0, P_EXITS] += x
            e_exits += x
            if o == _SPP_VIOLATION or o == _WP_VIOLATION:
                page_hot[slot0, P_VIOLATIONS] += 1
                e_violations += 1
                vend = min(end, (np.uint64(p0) + U1) << U_PAGE_SHIFT)
                for q in range(np.int64(g >> U_SUBPAGE_SHIFT),
                               np.int64((vend - U1) >> U_SUBPAGE_SHIFT) + 1):
                    sslot, new = _find(sub_hot, q, sbase, sspan, smask)
                    if new and sslot >= sspan:
                        subs += 1
                    sub_cold[sslot, SC_VIOLATIONS] += 1
        i += 1
    ep_accesses[e] += e_rows
    ep_writes[e] += e_writes
    ep_exits[e] += e_exits
    ep_violations[e] += e_violations
    kinds_total[_WRITE] += n_writes
    outcomes_total[_ALLOWED] += n_allowed
    state[ST_PAGES], state[ST_SUBS] = pages, subs
    state[ST_ROW], state[ST_EXIT] = i, j
    state[ST_EXITS_TOTAL] = total_exits
    return status


@kernel
def rehash(hot, cold, new_hot, new_cold, base, span):
    """(hot, cold) into the empty (new_hot, new_cold), whose hash table is larger: the dense
    window's rows as they are, every hashed key anew, with its counts."""
    mask = new_hot.shape[0] - span - 1
    for slot in range(hot.shape[0]):
        stored = hot[slot, 0]
        if stored == EMPTY:
            continue
        to = slot
        if slot >= span:
            to, _ = _find(new_hot, stored - 1, base, span, mask)
        for c in range(hot.shape[1]):
            new_hot[to, c] = hot[slot, c]
        for c in range(cold.shape[1]):
            new_cold[to, c] = cold[slot, c]
