"""The batch replay kernel: semantics section 6 over arrays, with a cached fast path.

One call replays rows ``start..n-1`` of a batch and stops early, with a status, when the table
pool or the exit log might not have room for the next access (the control plane grows or
flushes them and calls again from that row), or when a VM entry fails. Every access goes
through ``fast_check`` first; anything it cannot decide from the caches takes the full
``hardware_check`` / ``kvm_handle_exit`` loop, exactly as the reference engine does.
"""

import numpy as np

from sppjit import bits as B

from ._jit import U1, U_PAGE_OFFSET, U_PAGE_SHIFT, inline, kernel, prefetch
from .exits import kvm_handle_exit
from .hardware import FAST_ALLOWED, FAST_VIOLATION, fast_check, hardware_check
from .layout import CT_ACCESSES, CT_EXIT_KIND, CT_EXITS, CT_KIND, CT_OUTCOME, SC_NTABLES, SC_NVCPUS
from .mmu import RESUME, serve_requests

STATUS_DONE = 0
STATUS_NEED_TABLES = 1
STATUS_NEED_LOG = 2
STATUS_ENTRY_FAILED = 3
STATUS_LIVELOCK = 4

# At most this many exits on one piece before the model calls it a livelock (a model bug or a
# hand-poked state no KVM handler can repair): the worst legitimate case is 4.
MAX_EXITS_PER_PIECE = 8
LOG_MARGIN = 2 * MAX_EXITS_PER_PIECE + 2

_U_511 = np.uint64(511)
_NO_QUAL = np.uint64(0xFFFFFFFFFFFFFFFF)
_NO_PAGE = np.uint64(0xFFFFFFFFFFFFFFFF)  # no gfn is this large (48-bit guest-physical space)
_I_REASON = B.VMCS_COL_EXIT_REASON
_I_QUAL = B.VMCS_COL_EXIT_QUAL
_I_GPA = B.VMCS_COL_GPA
_I_INSN_LEN = B.VMCS_COL_INSN_LEN


def table_margin(vcpus: int) -> int:
    """Tables one access may allocate: two pieces, each an EPT path (3) and SPPT paths (3 per
    vCPU, or one 2 MiB block in v12), plus slack."""
    return 2 * (3 + 3 * max(vcpus, 1)) + 8


@kernel
def slow_piece(st, v, first, plast, k, row, insn, known_qual, log, counters):
    """Bytes first..plast of one page through the full check / exit / retry loop.

    ``known_qual`` is the qualification of the EPT violation fast_check already established
    for the first attempt, or -1 (as uint64: all ones) when the first attempt needs the full
    hardware_check too.

    Kept out of line: inlining the whole exit machinery into replay_batch's loop costs the
    fast path an order of magnitude (register pressure and lost memory-level parallelism).
    Returns (exits taken, last exit reason, outcome, ok) with ok False on a livelock.
    """
    nexits = 0
    reason_last = 0
    tries = 0
    while True:
        if tries == 0 and known_qual != _NO_QUAL:
            reason, qual = B.EXIT_REASON_EPT_VIOLATION, known_qual
        else:
            reason, qual = hardware_check(st, v, first, plast, k)
        if reason == 0:
            return nexits, reason_last, B.OUTCOME_ALLOWED, True
        st.vmcs[v, _I_REASON] = np.uint64(reason)
        st.vmcs[v, _I_QUAL] = qual
        st.vmcs[v, _I_GPA] = first
        st.vmcs[v, _I_INSN_LEN] = insn
        ek, user, res = kvm_handle_exit(st, v, reason, qual, first, k)
        j = log.n[0]
        log.row[j] = row
        log.vcpu[j] = v
        log.gpa[j] = first
        log.reason[j] = reason
        log.qual[j] = qual
        log.kind[j] = ek
        log.user[j] = user
        log.insn_len[j] = insn
        log.n[0] = j + 1
        counters[CT_EXIT_KIND + ek] += 1
        nexits += 1
        reason_last = reason
        if res != RESUME:
            return nexits, reason_last, res, True
        tries += 1
        if tries > MAX_EXITS_PER_PIECE:
            return nexits, reason_last, B.OUTCOME_ALLOWED, False


# Rows ahead whose table entries are prefetched: enough to cover a memory latency with the
# work of the rows in between, few enough that the lines are still cached when used.
PREFETCH_DISTANCE = 12


@inline
def prefetch_leaf(st, tables_base, regions, gfn):
    """Hint the cache about the EPT leaf of a later access's page, found through the region
    cache; nothing when it holds no walk for that region."""
    region = gfn >> np.uint64(9)
    if region >= regions:
        return
    c = st.ept_cache[region]
    if c < 0:
        return
    index = region & _U_511 if (c & 8) != 0 else gfn & _U_511
    prefetch(tables_base + ((np.uint64(c) >> np.uint64(4)) * np.uint64(512) + index) * np.uint64(8))


@inline
def count_access(counters, k, out, nexits):
    counters[CT_ACCESSES] += 1
    counters[CT_KIND + k] += 1
    counters[CT_OUTCOME + out] += 1
    counters[CT_EXITS] += nexits


@kernel
def replay_batch(st, gpa, size, vcpu, kind, insn_len, row0, start, outcome, exits, exit_reason, log, counters,
                 touched):
    """Replay rows start.. of one batch. Returns (status, row to resume from, detail)."""
    n = gpa.shape[0]
    margin = 2 * (3 + 3 * max(st.scal[SC_NVCPUS], 1)) + 8
    touched_bits = np.uint64(touched.shape[0]) << np.uint64(3)
    # Room in the table pool and the exit log changes only on the slow path: track it in
    # locals so the fast path pays two register compares per access.
    tables_free = st.tables.shape[0] - st.scal[SC_NTABLES]
    log_free = log.row.shape[0] - log.n[0]
    tables_base = np.uint64(st.tables.ctypes.data)  # the pool is never reallocated in here
    # The last page the fast path allowed and its walk's cumulative R/W/X: an access to the
    # same page that those rights allow needs no lookup at all (runs of accesses to one page
    # are the common case). Tables change only in slow_piece, which forgets it.
    memo_gfn = _NO_PAGE
    memo_cum = np.uint64(0)
    regions = np.uint64(st.ept_cache.shape[0])
    for r in range(start, n):
        ahead = r + PREFETCH_DISTANCE
        if ahead < n:
            page_ahead = gpa[ahead] >> U_PAGE_SHIFT
            if page_ahead != (gpa[ahead - 1] >> U_PAGE_SHIFT):  # runs on one page: once
                prefetch_leaf(st, tables_base, regions, page_ahead)
        if tables_free < margin:
            return STATUS_NEED_TABLES, r, 0
        if log_free < LOG_MARGIN:
            return STATUS_NEED_LOG, r, 0
        v = np.int64(vcpu[r])
        if st.requests[vcpu[r]] != 0:
            rc = serve_requests(st, v)
            if rc != 0:
                return STATUS_ENTRY_FAILED, r, v * 16 + rc
        k = np.int64(kind[r])
        first = gpa[r]
        last = first + np.uint64(size[r]) - U1
        plast = min(last, first | U_PAGE_OFFSET)
        gfn = first >> U_PAGE_SHIFT
        if gfn == memo_gfn and plast == last and ((memo_cum >> np.uint64(k)) & U1) != np.uint64(0):
            outcome[r] = B.OUTCOME_ALLOWED  # touched already marked for this page
            exits[r] = 0
            exit_reason[r] = 0
            count_access(counters, k, B.OUTCOME_ALLOWED, 0)
            continue
        code, qual = fast_check(st, v, first, plast, k)
        if code == FAST_ALLOWED and plast == last:
            # The common case, straight-line: one page, allowed by the cached walk.
            memo_gfn = gfn
            memo_cum = qual
            if gfn < touched_bits:
                touched[gfn >> np.uint64(3)] |= np.uint8(1) << np.uint8(gfn & np.uint64(7))
            outcome[r] = B.OUTCOME_ALLOWED
            exits[r] = 0
            exit_reason[r] = 0
            count_access(counters, k, B.OUTCOME_ALLOWED, 0)
            continue
        out = B.OUTCOME_ALLOWED
        nexits = 0
        reason_last = 0
        while True:
            gfn = first >> U_PAGE_SHIFT
            if gfn < touched_bits:
                touched[gfn >> np.uint64(3)] |= np.uint8(1) << np.uint8(gfn & np.uint64(7))
            if code != FAST_ALLOWED:
                known = qual if code == FAST_VIOLATION else _NO_QUAL
                ne, rl, out, ok = slow_piece(st, v, first, plast, k, row0 + r, np.uint64(insn_len[r]), known, log,
                                             counters)
                memo_gfn = _NO_PAGE
                tables_free = st.tables.shape[0] - st.scal[SC_NTABLES]
                log_free = log.row.shape[0] - log.n[0]
                if not ok:
                    return STATUS_LIVELOCK, r, v
                if ne > 0:
                    nexits += ne
                    reason_last = rl
                if out != B.OUTCOME_ALLOWED:
                    break
            if plast == last:
                break
            first = plast + U1
            plast = min(last, first | U_PAGE_OFFSET)
            code, qual = fast_check(st, v, first, plast, k)
        outcome[r] = out
        exits[r] = nexits
        exit_reason[r] = reason_last
        count_access(counters, k, out, nexits)
    return STATUS_DONE, n, 0
