"""The batch replay kernel: docs/semantics.md §6 over arrays, with a cached fast path.

One call replays rows ``start..n-1`` of a batch and stops early, with a status, when the table
pool or the exit log might not have room for the next access (the control plane grows or
flushes them and calls again from that row), or when a VM entry fails. Every access goes
through ``fast_check`` first; anything it cannot decide from the caches takes the full
``hardware_check`` / ``kvm_handle_exit`` loop, exactly as the reference engine does.

Where the time goes (README, "Performance"): a hot trace is bound by the instructions of the
inner loop, a random one by cache misses (hence the prefetching), an exit-heavy one by KVM's
handler and the exit log. The common exits (a sub-page violation, a page-granular
write-protect exit, a fault-in in kvm_map_gfn_common's case) are taken in the inner loop
itself; the others leave it. numba
passes every array of the state by value (~180 words) to a function that is not inlined, so
nothing on a path taken per exit is out of line.
"""

import numpy as np

from sppjit import bits as B

from ._jit import (
    FULL_ACCESS_U32,
    U0,
    U1,
    U_PAGE_OFFSET,
    U_PAGE_SHIFT,
    U_W,
    inline,
    kernel,
    prefetch,
)
from .exits import kvm_handle_exit
from .hardware import (
    FAST_ALLOWED,
    FAST_NOT_PRESENT,
    FAST_SPP_VIOLATION,
    FAST_UNKNOWN,
    FAST_VIOLATION,
    fast_check,
    fast_check_fill,
    hardware_check,
    view_need,
    view_refusal,
    view_word,
)
from .layout import (
    CACHE_PAYLOAD_MASK,
    CACHE_TAG_SHIFT,
    CF_GRANULARITY,
    CF_SUBPAGE_CHECK,
    CT_ACCESSES,
    CT_EXIT_KIND,
    CT_EXITS,
    CT_KIND,
    CT_OUTCOME,
    GRAN_PAGE,
    SC_NTABLES,
    SC_NVCPUS,
    SC_SPP_ACTIVE,
)
from .mmu import (
    RESUME,
    access_map_of,
    cache_tag,
    ept_leaf,
    kvm_exit_spp_code,
    kvm_map_gfn_common,
    map_block_of,
    memslot_of,
    serve_requests,
    view_forget_gfn,
    view_forget_region,
)

STATUS_DONE = 0
STATUS_NEED_TABLES = 1
STATUS_NEED_LOG = 2
STATUS_ENTRY_FAILED = 3
STATUS_LIVELOCK = 4
STATUS_NEED_TOUCHED = 5

# The touched-page set of a replay (sppjit.replay owns it): sparse, one bitmap block of
# TOUCHED_BLOCK_WORDS uint64 (2**TOUCHED_SHIFT pages: 1 GiB) per GiB the trace touches below the
# top memslot, the blocks one after the other in touched_words. touched_dir[gfn >> TOUCHED_SHIFT]
# is the first word of the GiB's block, or -1; touched_n[0] blocks are in use. The kernel
# allocates blocks (zeroed in advance) and stops with STATUS_NEED_TOUCHED when none is left;
# sppjit.replay grows the pool.
TOUCHED_SHIFT = 18
TOUCHED_BLOCK_WORDS = (1 << TOUCHED_SHIFT) // 64
_U_TOUCHED_SHIFT = np.uint64(TOUCHED_SHIFT)
_U_TOUCHED_WORD_MASK = np.uint64(TOUCHED_BLOCK_WORDS - 1)
_U_TOUCHED_BYTE_MASK = np.uint64(TOUCHED_BLOCK_WORDS * 8 - 1)
_TOUCHED_BLOCK_WORDS = np.int64(TOUCHED_BLOCK_WORDS)
_U_63 = np.uint64(63)
_TAG_SHIFT = np.int64(CACHE_TAG_SHIFT)
_U_TABLE_INDEX = np.uint64(CACHE_PAYLOAD_MASK >> 4)
_U_PAYLOAD = np.uint64(CACHE_PAYLOAD_MASK)

# At most this many exits on one piece before the model calls it a livelock (a model bug or a
# hand-poked state no KVM handler can repair): the worst legitimate case is 4.
MAX_EXITS_PER_PIECE = 8
LOG_MARGIN = 2 * MAX_EXITS_PER_PIECE + 2
_NO_LOG_LIMIT = np.int64(1 << 62)  # a replay keeping counts only: the log is never full

_U_511 = np.uint64(511)
_NO_QUAL = np.uint64(0xFFFFFFFFFFFFFFFF)
_NO_PAGE = np.uint64(0xFFFFFFFFFFFFFFFF)  # no gfn is this large (48-bit guest-physical space)
_I_REASON = B.VMCS_COL_EXIT_REASON
_I_QUAL = B.VMCS_COL_EXIT_QUAL
_I_GPA = B.VMCS_COL_GPA
_I_INSN_LEN = B.VMCS_COL_INSN_LEN


@inline
def table_margin(vcpus):
    """Tables one access may allocate: two pieces, each an EPT path (3) and SPPT paths (3 per
    vCPU, or one 2 MiB block in v12), plus slack. Used by the kernel and by sppjit.replay."""
    return 2 * (3 + 3 * max(vcpus, 1)) + 8


@inline
def write_exit_fields(st, v, reason, qual, gpa, insn):
    """The VMCS exit fields of vCPU ``v``, as the processor writes them on a VM exit."""
    st.vmcs[v, _I_REASON] = np.uint64(reason)
    st.vmcs[v, _I_QUAL] = qual
    st.vmcs[v, _I_GPA] = gpa
    st.vmcs[v, _I_INSN_LEN] = insn


@inline
def log_exit(log, keep_log, v, row, gpa, reason, qual, ek, user, insn):
    """One exit-log entry (the caller counts it); nothing when the replay keeps counts only."""
    if not keep_log:
        return
    j = log.n[0]
    log.row[j] = row
    log.vcpu[j] = v
    log.gpa[j] = gpa
    log.reason[j] = reason
    log.qual[j] = qual
    log.kind[j] = ek
    log.user[j] = user
    log.insn_len[j] = insn
    log.n[0] = j + 1


@inline
def slow_piece(st, v, first, plast, k, row, insn, known_qual, taken, log, keep_log, counters):
    """Bytes first..plast of one page through the full check / exit / retry loop.

    ``known_qual`` is the qualification of the EPT violation fast_check already established
    for the first attempt, or -1 (as uint64: all ones) when the first attempt needs the full
    hardware_check too. ``taken`` is the exits the piece has had already (the inner loop's
    fault-in): they count towards the livelock bound.

    Inlined into replay_batch's outer loop (a call would copy the whole state onto the stack,
    more than half the cost of a fault-in), and kept out of its inner loop, whose registers
    it would take. Returns (exits taken, last exit reason, outcome, ok) with ok False on a
    livelock.
    """
    nexits = 0  # exits taken here; the first attempt is the one before any
    reason_last = 0
    tries = taken  # exits towards the livelock bound
    while True:
        if nexits == 0 and known_qual != _NO_QUAL:
            reason, qual = B.EXIT_REASON_EPT_VIOLATION, known_qual
        else:
            # A retry after KVM's handler: its caches usually answer (the handler changed a
            # leaf, not the walk above it); the full check when they cannot.
            code, qual = FAST_UNKNOWN, U0
            if nexits > 0:
                code, qual = fast_check(st, v, first, plast, k)
            if code == FAST_ALLOWED:
                reason, qual = 0, U0
            elif code >= FAST_VIOLATION:
                reason = B.EXIT_REASON_EPT_VIOLATION
            else:
                reason, qual = hardware_check(st, v, first, plast, k)
        if reason == 0:
            return nexits, reason_last, B.OUTCOME_ALLOWED, True
        write_exit_fields(st, v, reason, qual, first, insn)
        ek, user, res = kvm_handle_exit(st, v, reason, qual, first, k)
        # What the handler changed, forgotten by the write view (kernels.mmu, its rules). An
        # SPPT miss builds vectors: v4 this gfn's, v12 those of its whole 2 MiB block. The
        # other handlers that change a table (a fault-in, a write-protect fault, R/X
        # re-installed, an MMIO entry installed) write this gfn's leaf and, v4, its vectors;
        # a table they create or a 2 MiB leaf they map resets the region's cache entry, and
        # its view with it. Refused writes, MMIO emulation and an SPPT misconfiguration
        # change no table.
        if ek == B.EXIT_KIND_SPP_MISS:
            view_forget_region(st, first >> U_PAGE_SHIFT)
        elif res == RESUME or ek == B.EXIT_KIND_MMIO:
            view_forget_gfn(st, first >> U_PAGE_SHIFT)
        log_exit(log, keep_log, v, row, first, reason, qual, ek, user, insn)
        counters[CT_EXIT_KIND + ek] += 1
        nexits += 1
        reason_last = reason
        if res != RESUME:
            return nexits, reason_last, res, True
        tries += 1
        if tries > MAX_EXITS_PER_PIECE:
            return nexits, reason_last, B.OUTCOME_ALLOWED, False


# Result columns are preset to "allowed, no exit" (all zeros) this many rows ahead, one memset
# each, so the inner loop writes results only for the rows with exits.
PRESET_ROWS = 4096
_U_PRESET_ROWS = np.uint64(PRESET_ROWS)


# Rows ahead whose table entries are prefetched: enough to cover a memory latency with the
# work of the rows in between, few enough that the lines are still cached when used.
PREFETCH_DISTANCE = 12
# Below this many tables in the pool (1 MiB: the walk's lines stay in the core's own caches)
# prefetching cannot win anything and costs the loop a fifth of its instructions.
PREFETCH_MIN_TABLES = 256
_U_PREFETCH_DISTANCE = np.uint64(PREFETCH_DISTANCE)


@inline
def prefetch_leaf(st, tables_base, cache_mask, gfn, v, write, touched_dir, touched_base, maps):
    """Hint the cache about what a later access to page ``gfn`` will read: its byte of the
    touched bitmap and, for a write in a VM with a write view (and no ``maps``), its word of
    the view; otherwise its EPT leaf (found through the region cache) and, for a write, its
    SPP vector (when the region has an SPPT leaf table for that vCPU: only regions with
    protected pages do) and, with ``maps`` (the page baseline, where a refused write is told
    from other exits by it: is_write_protect_exit), its stored access map. Leaves out what the
    caches hold no walk for.

    With the view, only its word: it decides every write to a page written before (allowed
    or refused, kernels.hardware.view_word), and a page's first write, which needs the leaf
    and the vector, is rare on any trace that writes a page more than once. Prefetching the
    leaf and the vector as well cost `guarded` about 10% (three lines a row instead of one,
    and the SPPT cache read that finds the vector), and every write refused 25%.
    """
    if maps and write:
        # map_dir and map_nodes are small (a word per GiB, per 2 MiB region); the map blocks,
        # 2 KiB per protected region, are the read that misses.
        m = map_block_of(st, gfn)
        if m >= 0:
            prefetch(np.uint64(st.map_blocks.ctypes.data)
                     + (np.uint64(m) * np.uint64(512) + (gfn & _U_511)) * np.uint64(4))
    d = gfn >> _U_TOUCHED_SHIFT
    if d < np.uint64(touched_dir.shape[0]):
        w = touched_dir[d]
        if w >= 0:
            prefetch(touched_base + np.uint64(w) * np.uint64(8) + ((gfn >> np.uint64(3)) & _U_TOUCHED_BYTE_MASK))
    region = gfn >> np.uint64(9)
    slot = region & cache_mask
    c = st.ept_cache[slot]
    if (c >> _TAG_SHIFT) != cache_tag(region):
        return
    if write and not maps and st.write_view.shape[1] != 0:
        prefetch(np.uint64(st.write_view.ctypes.data)
                 + ((np.uint64(v) * np.uint64(st.write_view.shape[1]) + slot) * np.uint64(512)
                    + (gfn & _U_511)) * np.uint64(8))
        return
    index = region & _U_511 if (c & 8) != 0 else gfn & _U_511
    t = (np.uint64(c) >> np.uint64(4)) & _U_TABLE_INDEX
    prefetch(tables_base + (t * np.uint64(512) + index) * np.uint64(8))
    if write:
        s = st.sppt_cache[v, slot]
        if (s >> _TAG_SHIFT) == cache_tag(region):
            prefetch(tables_base + ((np.uint64(s) & _U_PAYLOAD) * np.uint64(512) + (gfn & _U_511)) * np.uint64(8))


@inline
def count_access(counters, k, out, nexits):
    counters[CT_ACCESSES] += 1
    counters[CT_KIND + k] += 1
    counters[CT_OUTCOME + out] += 1
    counters[CT_EXITS] += nexits


@kernel
def count_fast_rows(counters, kind, r0, r1):
    """Count rows r0..r1-1 of the fast loop into the counters as allowed rows (the loop's rows
    with exits correct that as they go). Done after the loop in one vectorised pass over
    ``kind`` rather than in it, where the sums would hold registers the loop needs; kinds are
    0..2 (validated at ingestion)."""
    writes = 0
    fetches = 0
    for j in range(r0, r1):
        kj = np.int64(kind[j])
        writes += kj & 1
        fetches += kj >> 1
    rows = np.int64(r1 - r0)
    counters[CT_ACCESSES] += rows
    counters[CT_KIND + B.ACCESS_READ] += rows - writes - fetches
    counters[CT_KIND + B.ACCESS_WRITE] += writes
    counters[CT_KIND + B.ACCESS_FETCH] += fetches
    counters[CT_OUTCOME + B.OUTCOME_ALLOWED] += rows


@inline
def take_refused_write(st, log, keep_log, counters, v, row, gpa, qual, insn, ek, user, out):
    """A write refused by KVM's handler, taken in the fast loop: what slow_piece would leave,
    without running kvm_handle_exit (whose answer is known: a sub-page violation, or a
    page-granular write-protect exit, see is_write_protect_exit), and with the row's counts
    moved from allowed, where count_fast_rows puts the loop's rows. The caller writes the
    row's results."""
    write_exit_fields(st, v, B.EXIT_REASON_EPT_VIOLATION, qual, gpa, insn)
    log_exit(log, keep_log, v, row, gpa, B.EXIT_REASON_EPT_VIOLATION, qual, ek, user, insn)
    counters[CT_EXIT_KIND + ek] += 1
    counters[CT_OUTCOME + B.OUTCOME_ALLOWED] -= 1
    counters[CT_OUTCOME + out] += 1
    counters[CT_EXITS] += 1


@inline
def is_write_protect_exit(st, gfn, k):
    """Whether kvm_handle_exit answers an EPT violation at ``gfn`` with a write-protect exit
    (the page-granular baseline): a write, a present leaf without W, a map != FULL: its own
    test, in its order (kernels.exits). The caller knows the granularity is page."""
    if k != np.uint64(B.ACCESS_WRITE):
        return False
    t, i, level = ept_leaf(st, gfn)
    if level == 0 or (st.tables[t, i] & U_W) != U0:
        return False
    return access_map_of(st, gfn) != FULL_ACCESS_U32


@inline
def take_fault_in(st, log, keep_log, counters, v, row, gfn, gpa, qual, insn):
    """An EPT violation on a not-present 4 KiB leaf taken in the fast loop, when KVM's fault-in
    is kvm_map_gfn_common's case (a RAM gfn whose region has its level-1 table, nothing to
    protect: it writes gfn's leaf and nothing else). Returns False, having done nothing, when
    it is not. The caller runs the guest's retry and counts the row's exits."""
    s = memslot_of(st, gfn)
    if s < 0 or not kvm_map_gfn_common(st, gfn, s):
        return False
    # The exit fields after the map (slow_piece writes them before the handler): the map does
    # not read them, and a fault-in that is not this case must leave nothing behind.
    write_exit_fields(st, v, B.EXIT_REASON_EPT_VIOLATION, qual, gpa, insn)
    log_exit(log, keep_log, v, row, gpa, B.EXIT_REASON_EPT_VIOLATION, qual, B.EXIT_KIND_EPT_FAULT, 0, insn)
    counters[CT_EXIT_KIND + B.EXIT_KIND_EPT_FAULT] += 1
    return True


# Which refused writes the fast loop takes in place (the granularity decides; none in the
# copy of the loop for a VM with SPP off).
EXITS_INLINE_NONE = 0
EXITS_INLINE_SPP = 1  # sub-page violations
EXITS_INLINE_PAGE = 2  # page-granular write-protect exits


@inline
def mark_touched(touched_dir, touched_words, touched_n, gfn):
    """Add ``gfn`` to the touched set (gfns above the top memslot are not counted). Returns
    False, having changed nothing, when gfn's GiB needs a block and the pool has none left."""
    d = gfn >> _U_TOUCHED_SHIFT
    if d >= np.uint64(touched_dir.shape[0]):
        return True
    w = touched_dir[d]
    if w < 0:
        b = touched_n[0]
        w = b * _TOUCHED_BLOCK_WORDS
        if w + _TOUCHED_BLOCK_WORDS > touched_words.shape[0]:
            return False
        touched_n[0] = b + 1
        touched_dir[d] = w
    touched_words[np.uint64(w) + ((gfn >> np.uint64(6)) & _U_TOUCHED_WORD_MASK)] |= U1 << (gfn & _U_63)
    return True


@inline
def fast_rows(st, gpa, size, vcpu, kind, insn_len, row0, outcome, exits, exit_reason, log, counters, touched_dir,
              touched_words, touched_n, ru, end, view_on, memo_gfn, memo_cum, prefetching, pending, spp_active,
              exits_inline, spp_exit_code, log_limit, faults_inline, tables_base, cache_mask, touched_base):
    """replay_batch's inner loop: rows ru..end-1 while the caches decide them. Returns (the
    first row it could not finish, fast_check's code and qualification for it, the exits it
    already took for that row, the memo) or, having run them all, (end, FAST_UNKNOWN, 0, 0,
    the memo).

    A function so that replay_batch can have copies of it: one with the prefetching, the
    request test and the in-place exits switched off by constants, 5-10% faster on hot and
    sequential traces (less code in the loop, better laid out), and one with ``view_on``, the
    write view, constant True (in the others the constant False drops its code). They add
    little compile time (the in-place exits are not duplicated).
    """
    # (keep_log and the row count are not parameters: 31 arguments would make CPython pass
    # them as *args, which numba cannot inline.)
    keep_log = log_limit != _NO_LOG_LIMIT
    nu = np.uint64(gpa.shape[0])
    check = st.cfg[CF_SUBPAGE_CHECK]
    page_ahead_prev = _NO_PAGE
    while ru < end:
        ahead = ru + _U_PREFETCH_DISTANCE
        if prefetching and ahead < nu:
            page_ahead = gpa[ahead] >> U_PAGE_SHIFT
            if page_ahead != page_ahead_prev:  # runs on one page: once
                prefetch_leaf(st, tables_base, cache_mask, page_ahead, np.int64(vcpu[ahead]),
                              spp_active and kind[ahead] == B.ACCESS_WRITE, touched_dir, touched_base,
                              exits_inline == EXITS_INLINE_PAGE)
                page_ahead_prev = page_ahead
        if pending and st.requests[vcpu[ru]] != 0:
            return ru, FAST_UNKNOWN, U0, 0, memo_gfn, memo_cum
        k = np.uint64(kind[ru])
        first = gpa[ru]
        gfn = first >> U_PAGE_SHIFT
        if ((first + np.uint64(size[ru]) - U1) >> U_PAGE_SHIFT) != gfn:
            return ru, FAST_UNKNOWN, U0, 0, memo_gfn, memo_cum  # crosses a page: the slow path splits it
        if not (gfn == memo_gfn and ((memo_cum >> k) & U1) != U0):
            v = np.int64(vcpu[ru])
            last = first + np.uint64(size[ru]) - U1
            refusal = U0
            if view_on and k == np.uint64(B.ACCESS_WRITE):
                word = view_word(st, v, first, cache_mask)
                need = view_need(first, last, check)
                if (word & need) == need:
                    if not mark_touched(touched_dir, touched_words, touched_n, gfn):
                        return ru, FAST_UNKNOWN, U0, 0, memo_gfn, memo_cum  # nothing done yet: see below
                    ru += U1  # allowed (the memo stays: it is still true)
                    continue
                refusal = view_refusal(word)
            if view_on and refusal != U0:
                code, qual = FAST_SPP_VIOLATION, refusal  # what fast_check would answer
            else:
                code, qual = fast_check_fill(st, v, first, last, k, view_on)
            if code != FAST_ALLOWED:
                # The three exits whose handling is known in advance, taken in place (see
                # replay_batch); anything else, and a nearly full log, is the outer loop's.
                if code < FAST_VIOLATION or log.n[0] >= log_limit:
                    return ru, code, qual, 0, memo_gfn, memo_cum
                if code == FAST_VIOLATION and (exits_inline != EXITS_INLINE_PAGE
                                               or not is_write_protect_exit(st, gfn, k)):
                    return ru, code, qual, 0, memo_gfn, memo_cum
                insn = np.uint64(insn_len[ru])
                row = row0 + np.int64(ru)
                # A row taken here marks its page before any effect: a full touched pool
                # stops it untouched (the outer loop asks for room, then replays it).
                if not mark_touched(touched_dir, touched_words, touched_n, gfn):
                    return ru, FAST_UNKNOWN, U0, 0, memo_gfn, memo_cum
                if code == FAST_VIOLATION:  # a write-protect exit (tested above)
                    take_refused_write(st, log, keep_log, counters, v, row, first, qual, insn,
                                       B.EXIT_KIND_WRITE_PROTECT, B.KVM_EXIT_MEMORY_FAULT,
                                       B.OUTCOME_WRITE_PROTECT_VIOLATION)
                    outcome[ru] = B.OUTCOME_WRITE_PROTECT_VIOLATION
                    exits[ru] = 1
                    exit_reason[ru] = B.EXIT_REASON_EPT_VIOLATION
                    ru += U1
                    continue
                if code == FAST_SPP_VIOLATION:
                    if exits_inline != EXITS_INLINE_SPP:
                        return ru, code, qual, 0, memo_gfn, memo_cum
                    take_refused_write(st, log, keep_log, counters, v, row, first, qual, insn,
                                       B.EXIT_KIND_SPP_VIOLATION, spp_exit_code, B.OUTCOME_SPP_VIOLATION)
                    outcome[ru] = B.OUTCOME_SPP_VIOLATION
                    exits[ru] = 1
                    exit_reason[ru] = B.EXIT_REASON_EPT_VIOLATION
                    ru += U1
                    continue
                if code != FAST_NOT_PRESENT or not faults_inline:
                    return ru, code, qual, 0, memo_gfn, memo_cum
                if not take_fault_in(st, log, keep_log, counters, v, row, gfn, first, qual, insn):
                    return ru, code, qual, 0, memo_gfn, memo_cum
                code, qual = fast_check_fill(st, v, first, last, k, view_on)  # the guest's retry
                if code != FAST_ALLOWED:
                    return ru, code, qual, 1, memo_gfn, memo_cum  # the outer loop goes on from the retry
                # The allowed row's tail, written out again: falling through to the one
                # below cost hotset ~10% (the compiler laid the hot path out worse).
                memo_gfn = gfn
                memo_cum = qual
                exits[ru] = 1
                exit_reason[ru] = B.EXIT_REASON_EPT_VIOLATION
                counters[CT_EXITS] += 1
                ru += U1
                continue
            if not mark_touched(touched_dir, touched_words, touched_n, gfn):
                return ru, FAST_UNKNOWN, U0, 0, memo_gfn, memo_cum  # nothing done yet: see above
            memo_gfn = gfn
            memo_cum = qual
        ru += U1  # its results are preset
    return ru, FAST_UNKNOWN, U0, 0, memo_gfn, memo_cum


@kernel
def replay_batch(st, gpa, size, vcpu, kind, insn_len, row0, start, outcome, exits, exit_reason, log, keep_log,
                 counters, touched_dir, touched_words, touched_n):
    """Replay rows start.. of one batch. Returns (status, row to resume from, detail).

    With ``keep_log`` False the replay keeps counts only: no exit is written to ``log`` (and
    it never stops for room there); every counter and result column is as with it.

    Two loops: the inner one runs the rows the caches decide (allowed, one page); the first
    row it cannot decide breaks out to the outer one, which takes that row through the full
    check / exit / retry machinery and resumes the inner loop after it. Keeping the rare,
    large slow path outside the inner loop lets the compiler give the inner loop the
    registers; the inner loop's rows are counted after it (count_fast_rows).

    Row indices must be valid for the arrays and ``vcpu`` below the VM's vCPU count, kinds
    0..2 and sizes 1..4096 (sppjit.io.trace validates them; sppjit.replay checks the vCPUs).
    """
    n = gpa.shape[0]
    margin = table_margin(st.scal[SC_NVCPUS])
    tables_base = np.uint64(st.tables.ctypes.data)  # the pool is never reallocated in here
    touched_base = np.uint64(touched_words.ctypes.data)
    cache_mask = np.uint64(st.ept_cache.shape[0] - 1)
    view_rows = st.write_view.shape[1] != 0  # a VM over the view's budget, or a shard, has none
    # Prefetch hints: SPP vectors only in a VM with SPP active, anything only once the tables
    # outgrow the core's caches. Both are re-read after each slow row, where KVM's rules run.
    spp_active = st.scal[SC_SPP_ACTIVE] != 0
    prefetching = st.scal[SC_NTABLES] >= PREFETCH_MIN_TABLES
    # Two exits are common enough to matter and simple enough to take in the inner loop, with
    # exactly kvm_handle_exit's effect (exit fields, log entry, counters, the row's results):
    # - a sub-page violation: its handler is known without running it (a write fault on a
    #   leaf with the SPP bit and W clear, in SPP granularity) and changes nothing;
    # - in the page baseline, a write-protect exit: the handler's test for it is small (a
    #   write, a present leaf without W, a map != FULL: is_write_protect_exit) and it changes
    #   nothing either;
    # - a fault-in in kvm_map_gfn_common's case: it writes the faulting gfn's leaf, nothing
    #   else, and the guest's retry follows.
    # The rest, and any exit when the log is nearly full, leave for the outer loop.
    exits_inline = EXITS_INLINE_PAGE if st.cfg[CF_GRANULARITY] == GRAN_PAGE else EXITS_INLINE_SPP
    spp_exit_code = kvm_exit_spp_code(st)
    log_limit = log.row.shape[0] - LOG_MARGIN if keep_log else _NO_LOG_LIMIT
    # Requests are only ever cleared in here (serve_requests), never raised: once none is
    # pending, the inner loop need not look at them.
    pending = False
    for q in range(st.requests.shape[0]):
        if st.requests[q] != 0:
            pending = True
    # The last page the fast path allowed and its walk's cumulative R/W/X: an access to the
    # same page that those rights allow needs no lookup at all (runs of accesses to one page
    # are the common case). A present leaf changes only on the slow path, which forgets it
    # (the inner loop's fault-ins write leaves that were not present).
    memo_gfn = _NO_PAGE
    memo_cum = np.uint64(0)
    # Unsigned row indices: numba emits no negative-index wraparound code for them.
    nu = np.uint64(n)
    ru = np.uint64(start)
    preset = ru  # rows ru..preset-1 have their results preset (OUTCOME_ALLOWED is 0)
    while True:
        # ---------------------------------------------------------------- fast rows
        if preset < nu and preset - ru < _U_PRESET_ROWS:
            upto = min(nu, ru + _U_PRESET_ROWS + _U_PRESET_ROWS)
            outcome[np.int64(preset):np.int64(upto)] = 0
            exits[np.int64(preset):np.int64(upto)] = 0
            exit_reason[np.int64(preset):np.int64(upto)] = 0
            preset = upto
        run_start = ru
        # A fault-in taken in place must leave the outer loop room to finish its row without
        # stopping (a stop would replay the row from the start): the pool's room is checked
        # here (the inner loop allocates nothing), the log's at each exit.
        faults_inline = st.tables.shape[0] - st.scal[SC_NTABLES] >= margin
        if spp_active and exits_inline == EXITS_INLINE_SPP and view_rows:
            # The write view (kernels.layout): an allowed write is one load of it, whatever
            # protects its page (fast_check's two paths, leaf W or the SPP vector, are a random
            # branch on a randomly protected guest); it holds only what fast_check allowed, so
            # a hit is its answer. Only where SPP decides writes (SPP active, sub-page
            # granularity): elsewhere fast_check has one path, and the view would add a second
            # random line to a row's reads (uniform: 0.6x). A copy of its own, the view a
            # constant: the copy below without it is as fast as before the view existed.
            ru, code, qual, carried, memo_gfn, memo_cum = fast_rows(
                st, gpa, size, vcpu, kind, insn_len, row0, outcome, exits, exit_reason, log, counters, touched_dir,
                touched_words, touched_n, ru, preset, True, memo_gfn, memo_cum, prefetching, pending, True,
                EXITS_INLINE_SPP, spp_exit_code, log_limit, faults_inline, tables_base, cache_mask, touched_base)
        elif prefetching or pending or spp_active:
            ru, code, qual, carried, memo_gfn, memo_cum = fast_rows(
                st, gpa, size, vcpu, kind, insn_len, row0, outcome, exits, exit_reason, log, counters, touched_dir,
                touched_words, touched_n, ru, preset, False, memo_gfn, memo_cum, prefetching, pending, spp_active,
                exits_inline, spp_exit_code, log_limit, faults_inline, tables_base, cache_mask, touched_base)
        else:
            # A small pool, no request pending, SPP off: the loop with no prefetching, no request
            # test and no exit taken in place (constants here: the compiler drops that code).
            # It sees few exits: fewer fault-ins than a 1 MiB pool has leaves, no sub-page
            # violation.
            ru, code, qual, carried, memo_gfn, memo_cum = fast_rows(
                st, gpa, size, vcpu, kind, insn_len, row0, outcome, exits, exit_reason, log, counters, touched_dir,
                touched_words, touched_n, ru, preset, False, memo_gfn, memo_cum, False, False, False, EXITS_INLINE_NONE,
                spp_exit_code, log_limit, False, tables_base, cache_mask, touched_base)
        if ru > run_start:
            count_fast_rows(counters, kind, np.int64(run_start), np.int64(ru))
        r = np.int64(ru)
        if ru >= nu:
            return STATUS_DONE, n, 0
        if ru == preset:
            continue  # the end of the preset rows, not a slow row
        # ---------------------------------------------------------------- row r, the slow way
        # Room in the table pool and the exit log is needed only here: the fast rows allocate
        # nothing and log nothing.
        if st.tables.shape[0] - st.scal[SC_NTABLES] < margin:
            return STATUS_NEED_TABLES, r, 0
        if keep_log and log.row.shape[0] - log.n[0] < LOG_MARGIN:
            return STATUS_NEED_LOG, r, 0
        if touched_words.shape[0] // _TOUCHED_BLOCK_WORDS - touched_n[0] < 2:  # a row touches two pages at most
            return STATUS_NEED_TOUCHED, r, 0
        v = np.int64(vcpu[r])
        if pending and st.requests[v] != 0:
            rc = serve_requests(st, v)
            if rc != 0:
                return STATUS_ENTRY_FAILED, r, v * 16 + rc
            pending = False
            for q in range(st.requests.shape[0]):
                if st.requests[q] != 0:
                    pending = True
            code = FAST_UNKNOWN
        k = np.int64(kind[r])
        first = gpa[r]
        last = first + np.uint64(size[r]) - U1
        plast = min(last, first | U_PAGE_OFFSET)
        if code == FAST_UNKNOWN or plast != last:
            # The inner loop did not check this piece (a page crossing, a request served) or
            # could not decide it; the caches may still spare slow_piece a full walk.
            code, qual = fast_check(st, v, first, plast, k)
        out = B.OUTCOME_ALLOWED
        nexits = carried
        reason_last = B.EXIT_REASON_EPT_VIOLATION if carried else 0
        while True:
            mark_touched(touched_dir, touched_words, touched_n, first >> U_PAGE_SHIFT)
            if code != FAST_ALLOWED:
                known = qual if code >= FAST_VIOLATION else _NO_QUAL
                ne, rl, out, ok = slow_piece(st, v, first, plast, k, row0 + r, np.uint64(insn_len[r]), known,
                                             carried, log, keep_log, counters)
                memo_gfn = _NO_PAGE
                if not ok:
                    return STATUS_LIVELOCK, r, np.int64(first)
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
        spp_active = st.scal[SC_SPP_ACTIVE] != 0
        prefetching = st.scal[SC_NTABLES] >= PREFETCH_MIN_TABLES
        outcome[r] = out
        exits[r] = nexits
        exit_reason[r] = reason_last
        count_access(counters, k, out, nexits)
        ru += U1
