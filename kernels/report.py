"""The per-access work of ``sppjit report`` on one batch of results, in one compiled pass.

sppjit.report.analysis groups a batch with a dozen numpy passes (checks, conversions,
grouping, per-group counts, merging into running tables); above a row count it calls these
kernels instead, which do the same attribution (the rules are in sppjit.report's docstring)
row by row, straight into running per-page and per-sub-page hash tables that live across
batches. The caller owns every array: the kernels allocate nothing and keep no state.

The tables are open-addressing hash tables (linear probing, a power-of-two capacity, at most
half full), keyed by gfn or by sub-page number (gpa >> 7; the caller has checked that every
access ends inside the 48-bit guest-physical space, so keys fit an int64 and -1 marks an
empty slot). Each table is split into a hot part, touched by every access, and a cold part,
touched by exits only, so that an access costs one cache line per table:

- pages, hot (PAGE_HOT columns): key, first row, last row, reads, writes, fetches, exits,
  violations; cold (PAGE_COLD): one count per exit kind, relevant, irrelevant exits;
- sub-pages, hot (SUB_HOT): key, writes; cold (SUB_COLD): violations, relevant, irrelevant.

Rows arrive in trace order, so a key's first row is the row that inserts it and its last
row the latest that touches it. A kernel returns GROW (with where it stopped in ``state``)
when a table could pass half full within the next row; the caller doubles it
(``rehash``) and calls again from there.
"""

import numpy as np

from sppjit import bits as B

from ._jit import U1, U_PAGE_SHIFT, U_SUBPAGE_SHIFT, inline, kernel

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

# state[]: in and out of accumulate.
ST_PAGES, ST_SUBS, ST_ROW, ST_EXIT, ST_BAD, ST_EXITS_TOTAL = 0, 1, 2, 3, 4, 5
STATE = 6
# accumulate's return values.
DONE, GROW, OUTSIDE = 0, 1, 2

EMPTY = -1
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
def _find(table, key, mask):
    """(slot of ``key``, whether this call inserted it)."""
    slot = _home(key, mask)
    while True:
        held = table[slot, 0]
        if held == key:
            return slot, False
        if held == EMPTY:
            table[slot, 0] = key
            return slot, True
        slot = (slot + 1) & mask


@kernel
def check_columns(gpa, size, kind, outcome, kinds, outcomes, gpa_limit):
    """The first row with a size outside 1..4096, a kind or an outcome beyond its codes, or an
    access ending beyond ``gpa_limit`` (the 48-bit guest-physical space); -1 if none. (The
    caller then lets the numpy checks say which, as the numpy path would.)"""
    limit = np.uint64(gpa_limit)
    top = np.uint64(B.PAGE_SIZE)
    for i in range(gpa.shape[0]):
        s = np.uint64(size[i])
        if s < U1 or s > top or np.int64(kind[i]) >= kinds or np.int64(outcome[i]) >= outcomes:
            return i
        if gpa[i] > limit - s:
            return i
    return -1


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
    pmask = page_hot.shape[0] - 1
    smask = sub_hot.shape[0] - 1
    plimit = page_hot.shape[0] // 2 - MAX_PAGES_A_ROW
    slimit = sub_hot.shape[0] // 2 - MAX_SUBS_A_ROW
    pages = state[ST_PAGES]
    subs = state[ST_SUBS]
    j = state[ST_EXIT]
    total_exits = state[ST_EXITS_TOTAL]
    e = e0
    # The last key found in each table: runs of accesses to one page or sub-page skip the probe.
    last_page, last_pslot = np.int64(EMPTY), np.int64(0)
    last_sub, last_sslot = np.int64(EMPTY), np.int64(0)
    status = DONE
    i = state[ST_ROW]
    while i < m:
        if pages > plimit or subs > slimit:
            status = GROW
            break
        r = first + i
        while e + 1 < n_epochs and r >= ep_start[e + 1]:
            e += 1
        g = gpa[i]
        end = g + np.uint64(size[i])
        k = np.int64(kind[i])
        o = np.int64(outcome[i])
        x = np.int64(nexits[i])
        kinds_total[k] += 1
        outcomes_total[o] += 1
        total_exits += x
        ep_accesses[e] += 1

        # ---- every page the access touches
        p0 = np.int64(g >> U_PAGE_SHIFT)
        p1 = np.int64((end - U1) >> U_PAGE_SHIFT)
        if p0 == last_page:
            slot0 = last_pslot
        else:
            slot0, new = _find(page_hot, p0, pmask)
            if new:
                page_hot[slot0, P_FIRST] = r
                pages += 1
        page_hot[slot0, P_LAST] = r
        page_hot[slot0, P_READS + k] += 1
        slot1 = slot0
        if p1 != p0:
            slot1, new = _find(page_hot, p1, pmask)
            if new:
                page_hot[slot1, P_FIRST] = r
                pages += 1
            page_hot[slot1, P_LAST] = r
            page_hot[slot1, P_READS + k] += 1
        last_page, last_pslot = p1, slot1

        # ---- every sub-page its bytes write
        if k == _WRITE:
            ep_writes[e] += 1
            for q in range(np.int64(g >> U_SUBPAGE_SHIFT), np.int64((end - U1) >> U_SUBPAGE_SHIFT) + 1):
                if q == last_sub:
                    sslot = last_sslot
                else:
                    sslot, new = _find(sub_hot, q, smask)
                    if new:
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
                        sslot, new = _find(sub_hot, q, smask)
                        if new:
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
            ep_exits[e] += x
            if o == _SPP_VIOLATION or o == _WP_VIOLATION:
                page_hot[slot0, P_VIOLATIONS] += 1
                ep_violations[e] += 1
                vend = min(end, (np.uint64(p0) + U1) << U_PAGE_SHIFT)
                for q in range(np.int64(g >> U_SUBPAGE_SHIFT),
                               np.int64((vend - U1) >> U_SUBPAGE_SHIFT) + 1):
                    sslot, new = _find(sub_hot, q, smask)
                    if new:
                        subs += 1
                    sub_cold[sslot, SC_VIOLATIONS] += 1
        i += 1
    state[ST_PAGES], state[ST_SUBS] = pages, subs
    state[ST_ROW], state[ST_EXIT] = i, j
    state[ST_EXITS_TOTAL] = total_exits
    return status


@kernel
def rehash(hot, cold, new_hot, new_cold):
    """Every key of (hot, cold) into the empty, larger (new_hot, new_cold), with its counts."""
    mask = new_hot.shape[0] - 1
    for slot in range(hot.shape[0]):
        key = hot[slot, 0]
        if key == EMPTY:
            continue
        to, _ = _find(new_hot, key, mask)
        for c in range(1, hot.shape[1]):
            new_hot[to, c] = hot[slot, c]
        for c in range(cold.shape[1]):
            new_cold[to, c] = cold[slot, c]
