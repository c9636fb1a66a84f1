"""KVM's MMU rules for SPP, compiled: the single source of truth for how KVM changes the tables.

The control plane (sppjit.vm) calls these for ioctls; the replay kernels call them for the exits
KVM resolves in the kernel (EPT fault-in, SPPT miss, MMIO, write-protect faults). The reference
engine calls them too: what it checks independently is the hardware (sppjit.reference).

Names follow the KVM series: kvm_mmu_set_subpages, the lazy path of tdp_page_fault,
kvm_mmu_setup_spp_structure, handle_spp. Every function takes the State namedtuple of
kernels.layout and works on its arrays in place.
"""

import numpy as np

from sppjit import bits as B

from ._jit import (
    FULL_ACCESS_U32,
    U0,
    U1,
    U_ADDR,
    U_EPT_LEAF,
    U_EPT_NONLEAF,
    U_GUEST_RAM_HPA,
    U_MMIO_SPTE,
    U_PAGE_SHIFT,
    U_PROC_ACTIVATE_SECONDARY,
    U_PS,
    U_PT_INDEX_MASK,
    U_PHYS_LIMIT,
    U_R,
    U_RWX,
    U_SEC_EPT,
    U_SEC_SPP,
    U_SPP,
    U_SPPT_PRESENT,
    U_TABLE_POOL_HPA,
    U_W,
    U_X,
    inline,
    kernel,
)
from .layout import (
    CACHE_INVALID,
    CF_GRANULARITY,
    CF_HUGEPAGES,
    GRAN_PAGE,
    REQ_LOAD_CR3,
    SC_EPT_ROOT,
    SC_MMIO_PAGES,
    SC_NTABLES,
    SC_NVCPUS,
    SC_SPP_ACTIVE,
    SC_TLB_FLUSHES,
    TABLE_EPT,
    TABLE_SPPT,
)

# Results of kvm_handle_exit: how the replay goes on.
RESUME = -1  # KVM resolved the exit; the guest retries the same piece

# VM-entry check results (serve_requests); 0 = entry succeeds.
ENTRY_OK = 0
ENTRY_SPP_WITHOUT_EPT = 1
ENTRY_SPPTP_UNALIGNED = 2
ENTRY_SPPTP_TOO_WIDE = 3
ENTRY_FAILURE_MESSAGES = (
    "",
    "SPP is enabled without EPT (secondary control bit 23 set, bit 1 clear)",
    "SPPT_POINTER is not 4 KiB-aligned",
    "SPPT_POINTER exceeds the physical-address width",
)

_I_PROC = B.VMCS_COL_PROC
_I_SEC = B.VMCS_COL_SECONDARY
_I_SPPTP = B.VMCS_COL_SPPTP
_EXIT_KIND_EPT_FAULT = B.EXIT_KIND_EPT_FAULT
_SHIFT_L = (np.uint64(12), np.uint64(21), np.uint64(30), np.uint64(39))


# ------------------------------------------------------------------ addresses and the pool
@inline
def level_index(gpa, level):
    """Index of a uint64 gpa in a table of ``level`` (4..1)."""
    return (gpa >> np.uint64(3 + 9 * level)) & U_PT_INDEX_MASK


@inline
def table_hpa(idx):
    return U_TABLE_POOL_HPA + (np.uint64(idx) << U_PAGE_SHIFT)


@inline
def hpa_table(st, hpa):
    """Pool index of the table at ``hpa`` (address bits of an entry), -1 outside the pool."""
    a = hpa & U_ADDR
    if a < U_TABLE_POOL_HPA:
        return -1
    idx = np.int64((a - U_TABLE_POOL_HPA) >> U_PAGE_SHIFT)
    if idx >= st.scal[SC_NTABLES]:
        return -1
    return idx


@inline
def alloc_table(st, kind, level):
    """A zeroed table from the pool; the caller made sure the pool has room."""
    idx = st.scal[SC_NTABLES]
    st.scal[SC_NTABLES] = idx + 1
    st.tables[idx, :] = U0
    st.table_kind[idx] = kind
    st.table_level[idx] = level
    return idx


@inline
def is_shadow_present(e):
    """KVM's is_shadow_present_pte for EPT: some of R/W/X set, and not an MMIO entry (whose
    W-without-R pattern is a misconfiguration by design)."""
    rwx = e & U_RWX
    return rwx != U0 and not ((rwx & U_R) == U0 and (rwx & U_W) != U0)


@inline
def invalidate_region(st, gfn):
    r = np.int64(gfn >> np.uint64(9))
    if r < st.ept_cache.shape[0]:
        st.ept_cache[r] = CACHE_INVALID


# ------------------------------------------------------------------ memslots and access maps
@inline
def memslot_of(st, gfn):
    """The memslot holding ``gfn``, -1 for none (MMIO)."""
    for s in range(st.slot_base.shape[0]):
        base = st.slot_base[s]
        if gfn >= base and gfn - base < st.slot_npages[s]:
            return s
    return -1


@inline
def map_slot(st, slot, gfn):
    """Index of gfn's access map (gfn_to_subpage_wp_info)."""
    return st.slot_map_off[slot] + np.int64(gfn - st.slot_base[slot])


@inline
def access_map_of(st, gfn):
    """The stored u32 map of ``gfn``; FULL when SPP is off or the gfn has no memslot."""
    if st.scal[SC_SPP_ACTIVE] == 0:
        return FULL_ACCESS_U32
    s = memslot_of(st, gfn)
    if s < 0:
        return FULL_ACCESS_U32
    return st.maps[map_slot(st, s, gfn)]


@inline
def map_to_vector(m):
    """format_spp_spte: u32 map bit i -> SPP vector bit 2i."""
    x = np.uint64(m) & np.uint64(0xFFFFFFFF)
    x = (x | (x << np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    x = (x | (x << np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    x = (x | (x << np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    x = (x | (x << np.uint64(2))) & np.uint64(0x3333333333333333)
    x = (x | (x << np.uint64(1))) & np.uint64(0x5555555555555555)
    return x


@inline
def region_fits_memslot(st, slot, gfn):
    """Whether the whole 2 MiB-aligned region of ``gfn`` lies in ``slot``."""
    first = gfn & ~np.uint64(511)
    base = st.slot_base[slot]
    return first >= base and first + np.uint64(512) - base <= st.slot_npages[slot]


@inline
def region_has_protected_gfn(st, slot, gfn):
    """Whether any gfn of the 2 MiB region of ``gfn`` (inside ``slot``) has map != FULL."""
    if st.scal[SC_SPP_ACTIVE] == 0:
        return False
    first = gfn & ~np.uint64(511)
    i0 = map_slot(st, slot, first)
    for k in range(512):
        if st.maps[i0 + k] != FULL_ACCESS_U32:
            return True
    return False


# ------------------------------------------------------------------ EPT (KVM's view, from its root)
@inline
def ept_table_for(st, gfn, level, create):
    """Pool index of the EPT table holding ``gfn``'s entry at ``level``.

    Missing intermediate tables are linked as ``table_hpa | RWX`` when ``create``; returns -1
    when a table is missing (and not created) or a huge leaf sits above ``level``.
    """
    gpa = gfn << U_PAGE_SHIFT
    t = st.scal[SC_EPT_ROOT]
    for lvl in range(4, level, -1):
        i = level_index(gpa, lvl)
        e = st.tables[t, i]
        if (e & U_RWX) == U0:  # not present
            if not create:
                return -1
            n = alloc_table(st, TABLE_EPT, lvl - 1)
            st.tables[t, i] = table_hpa(n) | U_EPT_NONLEAF
            invalidate_region(st, gfn)
            t = n
        elif lvl <= 3 and (e & U_PS) != U0:
            return -1
        else:
            t = hpa_table(st, e)
            if t < 0:
                return -1
    return t


@inline
def ept_leaf(st, gfn):
    """(table, index, level) of the present RAM leaf mapping ``gfn``; level 0 if none.

    MMIO entries (W|X without R) do not count as RAM leaves.
    """
    gpa = gfn << U_PAGE_SHIFT
    t = st.scal[SC_EPT_ROOT]
    for lvl in range(4, 0, -1):
        i = level_index(gpa, lvl)
        e = st.tables[t, i]
        if not is_shadow_present(e):
            return t, np.int64(i), 0
        if lvl == 1 or (lvl <= 3 and (e & U_PS) != U0):
            return t, np.int64(i), lvl
        t = hpa_table(st, e)
        if t < 0:
            return t, np.int64(0), 0
    return -1, np.int64(0), 0


@inline
def zap_leaf(st, t, i, gfn):
    """Remove one EPT leaf (KVM drop_spte); the region's cache entry is stale afterwards."""
    st.tables[t, i] = U0
    invalidate_region(st, gfn)


# ------------------------------------------------------------------ SPPT
@inline
def sppt_setup_structure(st, root, gfn, vector):
    """kvm_mmu_setup_spp_structure: build the path of ``gfn`` under ``root`` and write its leaf."""
    gpa = gfn << U_PAGE_SHIFT
    t = root
    for lvl in range(4, 1, -1):
        i = level_index(gpa, lvl)
        e = st.tables[t, i]
        if (e & U_SPPT_PRESENT) == U0:
            n = alloc_table(st, TABLE_SPPT, lvl - 1)
            st.tables[t, i] = table_hpa(n) | U_SPPT_PRESENT
            t = n
        else:
            t = hpa_table(st, e)
            if t < 0:
                return
    st.tables[t, level_index(gpa, 1)] = vector


@inline
def sppt_setup_all_vcpus(st, gfn, vector):
    """v4: every vCPU has its own SPPT; set_subpages and the fault path build them all."""
    for v in range(st.scal[SC_NVCPUS]):
        root = st.sppt_root[v]
        if root >= 0:
            sppt_setup_structure(st, root, gfn, vector)


# ------------------------------------------------------------------ protection of one leaf
@inline
def protect_leaf(st, e, m):
    """The 4 KiB leaf ``e`` after applying map ``m`` (v4 set / lazy path; page mode)."""
    if st.cfg[CF_GRANULARITY] == GRAN_PAGE:
        if m != FULL_ACCESS_U32:
            return e & ~U_W
        return e | U_W
    if m != FULL_ACCESS_U32:
        return (e & ~U_W) | U_SPP
    return (e & ~U_SPP) | U_W


@inline
def kvm_map_gfn(st, gfn, slot):
    """The EPT fault path (tdp_page_fault + v4 8/9 lazy SPP): map a RAM gfn, protect it."""
    huge = st.cfg[CF_HUGEPAGES] != 0 and region_fits_memslot(st, slot, gfn)
    if huge and st.cfg[CF_GRANULARITY] == GRAN_PAGE:
        # Page tracking never maps a tracked gfn with a huge leaf (KVM's page_track check).
        huge = not region_has_protected_gfn(st, slot, gfn)
    if huge:
        t = ept_table_for(st, gfn, 2, True)
        i = level_index(gfn << U_PAGE_SHIFT, 2)
        if t >= 0 and (st.tables[t, i] & (U_R | U_W | U_X)) == U0:
            base = gfn & ~np.uint64(511)
            st.tables[t, i] = (U_GUEST_RAM_HPA + (base << U_PAGE_SHIFT)) | U_EPT_LEAF | U_PS
            invalidate_region(st, gfn)
            return
        # A level-1 table already exists for the region (4 KiB mappings or MMIO entries in
        # it): KVM maps at the level the existing tables allow.
    t = ept_table_for(st, gfn, 1, True)
    i = level_index(gfn << U_PAGE_SHIFT, 1)
    e = (U_GUEST_RAM_HPA + (gfn << U_PAGE_SHIFT)) | U_EPT_LEAF
    if st.scal[SC_SPP_ACTIVE] != 0:
        m = st.maps[map_slot(st, slot, gfn)]
        if m != FULL_ACCESS_U32:
            e = protect_leaf(st, e, m)
            if st.cfg[CF_GRANULARITY] != GRAN_PAGE:
                sppt_setup_all_vcpus(st, gfn, map_to_vector(m))
    st.tables[t, i] = e


@inline
def kvm_install_mmio(st, gfn):
    """No memslot: KVM caches the gfn as MMIO with a misconfigured (W|X, no R) entry."""
    t = ept_table_for(st, gfn, 1, True)
    if t < 0:
        return
    st.tables[t, level_index(gfn << U_PAGE_SHIFT, 1)] = (gfn << U_PAGE_SHIFT) | U_MMIO_SPTE
    st.scal[SC_MMIO_PAGES] += 1


@inline
def kvm_set_subpages(st, base_gfn, access_maps, npages):
    """kvm_mmu_set_subpages (v4) for ``npages`` gfns from ``base_gfn``.

    Returns the number of gfns applied: npages on success, k < npages when gfn base+k has no
    memslot (-EFAULT; the k earlier gfns stay applied: no rollback).
    """
    page_mode = st.cfg[CF_GRANULARITY] == GRAN_PAGE
    for k in range(npages):
        gfn = base_gfn + np.uint64(k)
        s = memslot_of(st, gfn)
        if s < 0:
            return k
        m = np.uint32(access_maps[k])
        t, i, level = ept_leaf(st, gfn)
        if level == 1:
            st.tables[t, i] = protect_leaf(st, st.tables[t, i], m)
            if m != FULL_ACCESS_U32 and not page_mode:
                sppt_setup_all_vcpus(st, gfn, map_to_vector(m))
        elif level == 2 and page_mode and m != FULL_ACCESS_U32:
            # The baseline re-faults the region at 4 KiB so the page can be write-protected.
            zap_leaf(st, t, i, gfn)
        st.maps[map_slot(st, s, gfn)] = m
    return npages


@inline
def kvm_get_subpages(st, base_gfn, out, npages):
    """kvm_mmu_get_subpages: copy the maps; returns k < npages at the first gfn with no memslot."""
    for k in range(npages):
        gfn = base_gfn + np.uint64(k)
        s = memslot_of(st, gfn)
        if s < 0:
            return k
        out[k] = st.maps[map_slot(st, s, gfn)]
    return npages


# ------------------------------------------------------------------ vCPU requests, VM entry
@inline
def serve_requests(st, v):
    """Serve vCPU ``v``'s pending requests before it enters the guest; run the entry checks.

    KVM_REQ_LOAD_CR3 (v4 vmx_set_cr3): SPPTP = the vCPU's SPPT root, SPP control on, TLB
    flushed. Returns ENTRY_OK or the failed VM-entry check (Bochs vmx.cc).
    """
    req = st.requests[v]
    st.requests[v] = 0
    if (req & REQ_LOAD_CR3) != 0 and st.sppt_root[v] >= 0:
        st.vmcs[v, _I_SPPTP] = table_hpa(st.sppt_root[v])
        st.vmcs[v, _I_SEC] |= U_SEC_SPP
        st.scal[SC_TLB_FLUSHES] += 1
        for r in range(st.sppt_cache.shape[1]):
            st.sppt_cache[v, r] = CACHE_INVALID
    sec = st.vmcs[v, _I_SEC]
    if (st.vmcs[v, _I_PROC] & U_PROC_ACTIVATE_SECONDARY) == U0:
        sec = U0
    if (sec & U_SEC_SPP) != U0:
        if (sec & U_SEC_EPT) == U0:
            return ENTRY_SPP_WITHOUT_EPT
        spptp = st.vmcs[v, _I_SPPTP]
        if (spptp & np.uint64(0xFFF)) != U0:
            return ENTRY_SPPTP_UNALIGNED
        if spptp >= U_PHYS_LIMIT:
            return ENTRY_SPPTP_TOO_WIDE
    return ENTRY_OK
