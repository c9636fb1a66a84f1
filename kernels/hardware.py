"""The processor's side, compiled: the EPT walk, the SPP eligibility test and the SPPT walk.

``hardware_check`` is the complete check of one page piece, the compiled twin of
sppjit.reference.hardware_check (which is the oracle). As a side effect it fills the region
caches that ``fast_check`` uses; those caches hold only table indices reached by a complete,
valid walk, and every state change that could make one stale resets it (kernels.mmu,
sppjit.vm), so results never depend on them.
"""

import numpy as np

from sppjit import bits as B

from ._jit import (
    FULL_ACCESS_U32,
    U0,
    U1,
    U_ADDR_RSVD,
    U_MT_SHIFT,
    U_NONLEAF_RSVD,
    U_NONLEAF_RSVD_L4,
    U_PAGE_SHIFT,
    U_PROC_ACTIVATE_SECONDARY,
    U_PS,
    U_QUAL_GLA,
    U_QUAL_RWX_SHIFT,
    U_QUAL_SPP_MISS,
    U_R,
    U_RWX,
    U_SEC_SPP,
    U_SPP,
    U_SPPT_LEAF_RSVD,
    U_SPPT_NONLEAF_RSVD,
    U_SPPT_PRESENT,
    U_SUBPAGE_INDEX_MASK,
    U_SUBPAGE_SHIFT,
    U_W,
    inline,
)
from .layout import (
    CACHE_PAYLOAD_MASK,
    CACHE_REGION_LIMIT,
    CACHE_TAG_SHIFT,
    CF_SUBPAGE_CHECK,
    CHECK_FIRST,
    WRITE_VIEW_REFUSAL_SHIFT,
)
from .mmu import (
    cache_slot,
    cache_tag,
    hpa_table,
    level_index,
    set_ept_cache,
    set_sppt_cache,
    vector_to_map,
)

_I_PROC = B.VMCS_COL_PROC
_I_SEC = B.VMCS_COL_SECONDARY
_I_EPTP = B.VMCS_COL_EPTP
_I_SPPTP = B.VMCS_COL_SPPTP
_U_WB = np.uint64(B.MEMTYPE_WB)
_U_MT_MASK = np.uint64(7)
_U_511 = np.uint64(511)
_TAG_SHIFT = np.int64(CACHE_TAG_SHIFT)
_U_TABLE_INDEX = np.uint64(CACHE_PAYLOAD_MASK >> 4)  # a pool index in a payload, above its 4 flag bits
_U_PAYLOAD = np.uint64(CACHE_PAYLOAD_MASK)
_U_EVEN = np.uint64(0x5555555555555555)
_U_REFUSAL_SHIFT = np.uint64(WRITE_VIEW_REFUSAL_SHIFT)
_U_FAST_MASK = np.uint64(B.VMX_EPT_READABLE_MASK | B.VMX_EPT_MT_MASK | B.EPT_ADDR_RESERVED_MASK)
_U_FAST_WANT = np.uint64(B.VMX_EPT_READABLE_MASK | (B.MEMTYPE_WB << B.VMX_EPT_MT_EPTE_SHIFT))


@inline
def access_allowed(cum, kind):
    """Whether cumulative R/W/X permits an access of ``kind`` (0 read, 1 write, 2 fetch)."""
    return ((cum >> np.uint64(kind)) & U1) != U0


@inline
def ept_misconfigured(e, level, is_leaf):
    """EPT misconfiguration of a present entry (SDM 28.2.3.1, the cases KVM can produce)."""
    rwx = e & U_RWX
    if (rwx & U_R) == U0 and (rwx & U_W) != U0:
        return True  # write without read
    if (e & U_ADDR_RSVD) != U0:
        return True
    if is_leaf:
        mt = (e >> U_MT_SHIFT) & _U_MT_MASK
        return mt == np.uint64(2) or mt == np.uint64(3) or mt == np.uint64(7)
    if level == 4:
        return (e & U_NONLEAF_RSVD_L4) != U0
    return (e & U_NONLEAF_RSVD) != U0


@inline
def subpage_mask(first, last, check):
    """SPP-vector bits that must be 1 for a write to bytes first..last of one page."""
    lo = (first >> U_SUBPAGE_SHIFT) & U_SUBPAGE_INDEX_MASK
    hi = lo if check == CHECK_FIRST else (last >> U_SUBPAGE_SHIFT) & U_SUBPAGE_INDEX_MASK
    # bits 2lo .. 2hi (inclusive) of the even positions
    span = np.uint64(2) * (hi - lo) + U1
    ones = (U1 << span) - U1 if span < np.uint64(64) else ~U0
    return (ones << (np.uint64(2) * lo)) & _U_EVEN


@inline
def spp_enabled(st, v):
    if (st.vmcs[v, _I_PROC] & U_PROC_ACTIVATE_SECONDARY) == U0:
        return False
    return (st.vmcs[v, _I_SEC] & U_SEC_SPP) != U0


@inline
def ept_violation_qual(kind, cum):
    return (U1 << np.uint64(kind)) | (cum << U_QUAL_RWX_SHIFT) | U_QUAL_GLA


@inline
def hardware_check(st, v, first, last, kind):
    """Check bytes first..last (one page) for vCPU ``v``: (0, 0) if allowed, else (reason, qual)."""
    gfn = first >> U_PAGE_SHIFT
    region = np.int64(gfn >> np.uint64(9))
    cacheable = region < CACHE_REGION_LIMIT
    tag = cache_tag(region) << _TAG_SHIFT
    slot = cache_slot(st.ept_cache.shape[0], np.uint64(region))
    t = hpa_table(st, st.vmcs[v, _I_EPTP])
    cum = U_RWX
    leaf = U0
    level = 0
    for lvl in range(4, 0, -1):
        if t < 0:  # a pointer outside the table pool reads as zeros: not present
            return B.EXIT_REASON_EPT_VIOLATION, ept_violation_qual(kind, U0)
        e = st.tables[t, level_index(first, lvl)]
        if (e & U_RWX) == U0:
            return B.EXIT_REASON_EPT_VIOLATION, ept_violation_qual(kind, U0)
        is_leaf = lvl == 1 or (lvl <= 3 and (e & U_PS) != U0)
        if ept_misconfigured(e, lvl, is_leaf):
            return B.EXIT_REASON_EPT_MISCONFIG, U0
        if is_leaf:
            if cacheable and lvl == 2:
                set_ept_cache(st, slot, tag | (t << 4) | 8 | np.int64(cum))
            leaf = e
            level = lvl
            cum &= e & U_RWX
            break
        cum &= e & U_RWX
        t = hpa_table(st, e)
        if lvl == 2 and cacheable and t >= 0:
            set_ept_cache(st, slot, tag | (t << 4) | np.int64(cum))
    if access_allowed(cum, kind):
        return 0, U0
    if (
        kind == B.ACCESS_WRITE
        and level == 1
        and (leaf & U_SPP) != U0
        and (cum & U_R) != U0
        and spp_enabled(st, v)
    ):
        s = hpa_table(st, st.vmcs[v, _I_SPPTP])
        for lvl in range(4, 1, -1):
            e = U0 if s < 0 else st.tables[s, level_index(first, lvl)]
            if (e & U_SPPT_PRESENT) == U0:
                return B.EXIT_REASON_SPP, U_QUAL_SPP_MISS
            if (e & U_SPPT_NONLEAF_RSVD) != U0:
                return B.EXIT_REASON_SPP, U0
            s = hpa_table(st, e)
        if cacheable and s >= 0:
            set_sppt_cache(st, v, slot, tag | s)
        vec = U0 if s < 0 else st.tables[s, level_index(first, 1)]
        if (vec & U_SPPT_LEAF_RSVD) != U0:
            return B.EXIT_REASON_SPP, U0
        need = subpage_mask(first, last, st.cfg[CF_SUBPAGE_CHECK])
        if (vec & need) == need:
            return 0, U0
    return B.EXIT_REASON_EPT_VIOLATION, ept_violation_qual(kind, cum)


@inline
def view_need(first, last, check):
    """The write-view bits (sub-pages, kernels.layout) a write to bytes first..last of one page
    needs: subpage_mask's rule, in the u32 encoding."""
    lo = (first >> U_SUBPAGE_SHIFT) & U_SUBPAGE_INDEX_MASK
    hi = lo if check == CHECK_FIRST else (last >> U_SUBPAGE_SHIFT) & U_SUBPAGE_INDEX_MASK
    return (U1 << (hi + U1)) - (U1 << lo)  # bits lo..hi; hi + 1 <= 32, so no 64-bit shift


@inline
def view_fill(st, v, slot, gfn, allowed, refusal):
    """Record that vCPU v may write the sub-pages ``allowed`` of ``gfn`` and, with ``refusal``
    non-zero, that a write to any other sub-page is a sub-page violation of that qualification
    (fast_check has just established both from the caches, the live leaf and the live vector).
    The caller knows the view is not empty."""
    st.write_view[np.uint64(v), slot, gfn & _U_511] = np.uint64(allowed) | (refusal << _U_REFUSAL_SHIFT)


@inline
def view_word(st, v, first, cache_mask):
    """vCPU v's write-view word (kernels.layout) for the page of ``first``, or 0 (unknown) when
    the region's cache entry is not this region's (the view's rows belong to the entry's
    region, kernels.mmu rule 1). A word is only filled from fast_check's answer and forgotten
    with anything it was derived from, so what it says is fast_check's answer. The caller
    knows the view is not empty."""
    gfn = first >> U_PAGE_SHIFT
    region = gfn >> np.uint64(9)
    slot = region & cache_mask
    if (st.ept_cache[slot] >> _TAG_SHIFT) != cache_tag(region):
        return U0
    return st.write_view[np.uint64(v), slot, gfn & _U_511]


@inline
def view_refusal(word):
    """The qualification of the sub-page violation a view word records for the writes it does
    not allow, or 0 (unknown: fast_check decides)."""
    return word >> _U_REFUSAL_SHIFT


FAST_UNKNOWN = 0  # the caches cannot tell: do the full hardware_check
FAST_ALLOWED = 1
# From here on, EPT violations (48) whose qualification the cached walk gives. The last two
# are told apart because the replay takes them without leaving its fast loop:
FAST_VIOLATION = 2
# what KVM's fast_page_fault turns into a sub-page write violation: a write the SPP vector
# refuses, on a 4 KiB leaf with the SPP bit set and W clear (its handler changes no table);
FAST_SPP_VIOLATION = 3
# a 4 KiB leaf not present: a page not faulted in yet (KVM's fault-in maps it).
FAST_NOT_PRESENT = 4


@inline
def fast_check(st, v, first, last, kind):
    """fast_check_fill, filling no write view."""
    return fast_check_fill(st, v, first, last, kind, False)


@inline
def fast_check_fill(st, v, first, last, kind, fill):
    """What hardware_check would answer for bytes first..last of one page, read from the
    region caches: (FAST_ALLOWED, cumulative R/W/X of the walk, or 0 when the SPP vector
    allowed the write), (FAST_VIOLATION or above, qualification) or (FAST_UNKNOWN, 0).

    The caches hold only complete, valid walks (hardware_check fills them after checking every
    entry above the leaf), and the leaf and the SPP vector are read live, so an answer given
    here is exactly hardware_check's. Anything that could be a fault-in, a misconfiguration or
    an SPPT miss is FAST_UNKNOWN.

    With ``fill`` (the replay's fast loop, where it uses the view: the view is not empty), a
    write it allows on a 4 KiB leaf is recorded in the write view. A parameter, not a test of
    the state here: a constant False drops the code from the other callers, and the fast
    loop decides it once.
    """
    # Unsigned indices throughout: numba then emits no negative-index wraparound code.
    gfn = first >> U_PAGE_SHIFT
    region = gfn >> np.uint64(9)
    slot = region & np.uint64(st.ept_cache.shape[0] - 1)
    c = st.ept_cache[slot]
    if (c >> _TAG_SHIFT) != cache_tag(region):  # another region's walk, or none (0)
        return FAST_UNKNOWN, U0
    t = (np.uint64(c) >> np.uint64(4)) & _U_TABLE_INDEX
    huge = (c & 8) != 0
    if huge:
        e = st.tables[t, region & _U_511]
        if (e & U_PS) == U0:
            return FAST_UNKNOWN, U0
    else:
        e = st.tables[t, gfn & _U_511]
    # Only well-formed RAM leaves (readable, WB, no reserved address bits: no
    # misconfiguration possible) are decided here: one mask and one compare.
    if (e & _U_FAST_MASK) != _U_FAST_WANT:
        if not huge and (e & U_RWX) == U0:
            # Not present (a page not faulted in yet): the walk ends here, before any
            # misconfiguration check, exactly as in hardware_check.
            return FAST_NOT_PRESENT, ept_violation_qual(kind, U0)
        return FAST_UNKNOWN, U0
    cum = np.uint64(c & 7) & e
    if access_allowed(cum, kind):
        if fill and kind == B.ACCESS_WRITE and not huge:
            view_fill(st, v, slot, gfn, FULL_ACCESS_U32, U0)
        return FAST_ALLOWED, cum
    if kind == B.ACCESS_WRITE and not huge and (e & U_SPP) != U0 and (cum & U_R) != U0 and spp_enabled(st, v):
        # SPP-eligible: the vector decides (a missing path or odd bits: the full check).
        s = st.sppt_cache[v, slot]
        if (s >> _TAG_SHIFT) != cache_tag(region):
            return FAST_UNKNOWN, U0
        vec = st.tables[np.uint64(s) & _U_PAYLOAD, gfn & _U_511]
        if (vec & U_SPPT_LEAF_RSVD) != U0:
            return FAST_UNKNOWN, U0
        need = subpage_mask(first, last, st.cfg[CF_SUBPAGE_CHECK])
        # With W clear in the leaf, every write the vector refuses is a sub-page violation of
        # one qualification: the view records it beside the allowed sub-pages.
        refusal = ept_violation_qual(kind, cum) if (e & U_W) == U0 else U0
        if fill:
            view_fill(st, v, slot, gfn, vector_to_map(vec), refusal)
        if (vec & need) == need:
            return FAST_ALLOWED, U0
        if refusal != U0:
            return FAST_SPP_VIOLATION, refusal
    return FAST_VIOLATION, ept_violation_qual(kind, cum)
