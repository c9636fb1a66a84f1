"""KVM's MMU rules for SPP, compiled: the single source of truth for how KVM changes the tables.

The control plane (sppjit.vm) calls these for ioctls; the replay kernels call them for the exits
KVM resolves in the kernel (EPT fault-in, SPPT miss, MMIO, write-protect faults). The reference
engine calls them too: what it checks independently is the hardware (sppjit.reference).

Names follow the KVM series: kvm_mmu_set_subpages, the lazy path of tdp_page_fault,
kvm_mmu_setup_spp_structure, handle_spp. Every function takes the State namedtuple of
kernels.layout and works on its arrays in place.

Both profiles run through the same functions; every rule in which v4 and v12 differ is one of
the small functions of the section "the v4 / v12 seam" (check_spp_protection,
kvm_spp_mark_protection, spp_zap_huge_on_set, spp_flush_sppt, handle_spp_miss,
kvm_spp_free_memslot, kvm_exit_spp_code, and sppt_relink inside sppt_setup_structure), each
branching on cfg[CF_PROFILE]. The host-side timeline operations (MMU-notifier zap and
change_pte, memslot deletion) are kvm_zap_range, kvm_remap_range and kvm_delete_memslot.
"""

import numpy as np

from sppjit import bits as B

from ._jit import (
    FULL_ACCESS_U32,
    U0,
    U_ADDR,
    U_EPT_LEAF,
    U_EPT_NONLEAF,
    U_FULL_VECTOR,
    U_GUEST_RAM_HPA,
    U_GUEST_RAM_OFFSET,
    U_MMIO_SPTE,
    U_PAGE_SHIFT,
    U_PHYS_LIMIT,
    U_PROC_ACTIVATE_SECONDARY,
    U_PS,
    U_PT_INDEX_MASK,
    U_R,
    U_REMAP_HPA,
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
    CACHE_PAYLOAD_MASK,
    CACHE_TAG_SHIFT,
    CF_GRANULARITY,
    CF_HUGEPAGES,
    CF_PROFILE,
    GRAN_PAGE,
    MAP_DIR_SHIFT,
    MAP_NONE,
    PROFILE_V12,
    REQ_LOAD_CR3,
    SC_EPT_ROOT,
    SC_MAP_BLOCKS,
    SC_MAP_NODES,
    SC_MMIO_PAGES,
    SC_NTABLES,
    SC_NVCPUS,
    SC_REMAP_NEXT,
    SC_SHARED_SPPT_ROOT,
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
_U_MAP_DIR_SHIFT = np.uint64(MAP_DIR_SHIFT)
_U_511 = np.uint64(511)
_TAG_SHIFT = np.int64(CACHE_TAG_SHIFT)
_PAYLOAD = np.int64(CACHE_PAYLOAD_MASK)


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
def cache_slot(cache_len, region):
    """The entry of a region cache (kernels.layout: direct-mapped, a power-of-two length)."""
    return np.int64(region & np.uint64(cache_len - 1))


@inline
def cache_tag(region):
    """The tag of ``region``'s cache entries (kernels.layout): the region + 1, so that 0 is
    an empty entry."""
    return np.int64(region) + np.int64(1)


@inline
def cache_lookup(c, region):
    """The payload of cache entry ``c`` if it is tagged with ``region``, else -1."""
    if (c >> _TAG_SHIFT) != cache_tag(region):
        return -1
    return c & _PAYLOAD


# The write view (kernels.layout) caches what the walk, the leaf and the SPP vector answer for
# a write, which the region caches do not (they hold table indices; the leaf and the vector
# are read live). Its rows obey two rules that make every invalidation below local:
# 1. view[:, slot] is non-zero only while ept_cache[slot] holds the value it held when the
#    row was filled (so a cache entry that changes, or goes, takes its rows with it: set_ept_cache);
# 2. an entry the SPP vector decided exists only while sppt_cache[v, slot] holds the value it
#    held then (set_sppt_cache), so entries the walk's W decided survive an SPPT reset.
# Any other change of a leaf or a vector is KVM's exit handling, confined to the faulting gfn
# (view_forget_gfn) or, for an SPPT miss, its 2 MiB region (view_forget_region; see
# kernels.replay.slow_piece), or the control plane, which resets every cache
# (sppjit.vm.VM.invalidate_caches). The one change of an entry that keeps its rows is a
# sharded segment's compaction (sppjit.shards._relocate): it moves tables whole, so an entry
# rewritten to a table's new index still names the same leaves and vectors.
@inline
def view_forget_slot(st, slot):
    """Every vCPU's write view of region-cache entry ``slot`` (kernels.layout: none in a VM
    whose view is empty)."""
    if st.write_view.shape[1] != 0:
        st.write_view[:, slot, :] = 0


@inline
def set_ept_cache(st, slot, value):
    """ept_cache[slot] = value, forgetting the view rows filled under the old value (rule 1);
    writing the value it holds keeps them (a walk that refills its own entry), and an empty
    entry has none (so a VM's first walk of a region touches no page of the view)."""
    old = st.ept_cache[slot]
    if old != value:
        st.ept_cache[slot] = value
        if old != CACHE_INVALID:
            view_forget_slot(st, slot)


@inline
def set_sppt_cache(st, v, slot, value):
    """sppt_cache[v, slot] = value, forgetting vCPU v's view rows of the slot filled under the
    old value (rule 2; an empty entry has none)."""
    old = st.sppt_cache[v, slot]
    if old != value:
        st.sppt_cache[v, slot] = value
        if old != CACHE_INVALID and st.write_view.shape[1] != 0:
            st.write_view[v, slot, :] = 0


@inline
def view_forget_region(st, gfn):
    """Forget every vCPU's view of gfn's 2 MiB region, after KVM's handler changed a leaf or a
    vector in it (the caches of the walk above stay valid). Rows of another region sharing
    the entry are that region's, and stay."""
    region = gfn >> np.uint64(9)
    slot = cache_slot(st.ept_cache.shape[0], region)
    if (st.ept_cache[slot] >> _TAG_SHIFT) == cache_tag(region):
        view_forget_slot(st, slot)


@inline
def view_forget_gfn(st, gfn):
    """Forget every vCPU's view of one gfn, after KVM's handler changed its leaf or its
    vectors and nothing else (kernels.replay.slow_piece)."""
    region = gfn >> np.uint64(9)
    slot = cache_slot(st.ept_cache.shape[0], region)
    if st.write_view.shape[1] != 0 and (st.ept_cache[slot] >> _TAG_SHIFT) == cache_tag(region):
        for v in range(st.write_view.shape[0]):
            st.write_view[v, slot, gfn & _U_511] = 0


@inline
def invalidate_region(st, gfn):
    """Forget the cached walk of gfn's region (whatever region the entry holds now: harmless)."""
    set_ept_cache(st, cache_slot(st.ept_cache.shape[0], gfn >> np.uint64(9)), CACHE_INVALID)


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
def map_block_of(st, gfn):
    """The row of map_blocks holding gfn's map (gfn_to_subpage_wp_info), -1 when the region has
    none: every map there is FULL (kernels.layout, "Access maps")."""
    d = gfn >> _U_MAP_DIR_SHIFT
    if d >= np.uint64(st.map_dir.shape[0]):
        return -1
    node = st.map_dir[d]
    if node < 0:
        return -1
    return st.map_nodes[node, (gfn >> np.uint64(9)) & _U_511]


@inline
def stored_map(st, gfn):
    """The stored u32 map of ``gfn``, FULL where none is stored."""
    b = map_block_of(st, gfn)
    if b < 0:
        return FULL_ACCESS_U32
    return st.map_blocks[b, gfn & _U_511]


@inline
def store_map(st, gfn, m):
    """Store gfn's map, allocating its region's node and block unless ``m`` is FULL (which
    needs none). The caller made room for one node and one block (sppjit.vm.ensure_maps)."""
    d = np.int64(gfn >> _U_MAP_DIR_SHIFT)
    node = st.map_dir[d]
    if node < 0:
        if m == FULL_ACCESS_U32:
            return
        node = st.scal[SC_MAP_NODES]
        st.scal[SC_MAP_NODES] = node + 1
        st.map_nodes[node, :] = MAP_NONE
        st.map_dir[d] = node
    r = (gfn >> np.uint64(9)) & _U_511
    b = st.map_nodes[node, r]
    if b < 0:
        if m == FULL_ACCESS_U32:
            return
        b = st.scal[SC_MAP_BLOCKS]
        st.scal[SC_MAP_BLOCKS] = b + 1
        st.map_blocks[b, :] = FULL_ACCESS_U32
        st.map_nodes[node, r] = b
    st.map_blocks[b, gfn & _U_511] = m


@inline
def access_map_of(st, gfn):
    """The stored u32 map of ``gfn``; FULL when SPP is off or the gfn has no memslot."""
    if st.scal[SC_SPP_ACTIVE] == 0:
        return FULL_ACCESS_U32
    if memslot_of(st, gfn) < 0:
        return FULL_ACCESS_U32
    return stored_map(st, gfn)


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
def vector_to_map(vec):
    """The inverse of map_to_vector: SPP vector bit 2i -> u32 bit i (the odd bits dropped)."""
    x = vec & np.uint64(0x5555555555555555)
    x = (x | (x >> np.uint64(1))) & np.uint64(0x3333333333333333)
    x = (x | (x >> np.uint64(2))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    x = (x | (x >> np.uint64(4))) & np.uint64(0x00FF00FF00FF00FF)
    x = (x | (x >> np.uint64(8))) & np.uint64(0x0000FFFF0000FFFF)
    x = (x | (x >> np.uint64(16))) & np.uint64(0x00000000FFFFFFFF)
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
    b = map_block_of(st, gfn)  # the region lies in ``slot`` (region_fits_memslot)
    if b < 0:
        return False
    for k in range(512):
        if st.map_blocks[b, k] != FULL_ACCESS_U32:
            return True
    return False


# ------------------------------------------------------------------ EPT (KVM's view, from its root)
@inline
def cached_leaf_table(st, gfn):
    """The level-1 EPT table of ``gfn``'s 2 MiB region as the region cache holds it, -1 if none.

    The cache holds only tables reached by a complete, valid hardware walk from the EPTP, and
    the EPTP is always KVM's root (sppjit.vm refuses writes to EPT_POINTER): so this is the
    table KVM's own walk below would reach, without the three upper levels. Huge regions are
    not answered here (their leaf sits one level up).
    """
    region = gfn >> np.uint64(9)
    c = cache_lookup(st.ept_cache[cache_slot(st.ept_cache.shape[0], region)], region)
    if c < 0 or (c & 8) != 0:
        return -1
    return c >> 4


@inline
def ept_table_for(st, gfn, level, create):
    """Pool index of the EPT table holding ``gfn``'s entry at ``level``.

    Missing intermediate tables are linked as ``table_hpa | RWX`` when ``create``; returns -1
    when a table is missing (and not created) or a huge leaf sits above ``level``.
    """
    if level == 1:
        t = cached_leaf_table(st, gfn)
        if t >= 0:
            return t
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
    t = cached_leaf_table(st, gfn)
    if t >= 0:
        i = np.int64(gfn & U_PT_INDEX_MASK)
        return t, i, 1 if is_shadow_present(st.tables[t, i]) else 0
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
def sppt_relink(st, e, lvl):
    """v12: an SPPT entry of ``lvl`` whose present bit spp_flush_sppt cleared still holds the
    address of its level-1 table; kvm_spp_setup_structure re-sets bit 0 instead of allocating.

    Returns the pool index of that table, -1 when ``e`` is not such an entry (v4 never re-uses:
    its non-present entries are zeros, or hand-poked values that must not be trusted).
    """
    if st.cfg[CF_PROFILE] != PROFILE_V12 or lvl != 2:
        return -1
    n = hpa_table(st, e)
    if n < 0 or st.table_kind[n] != TABLE_SPPT or st.table_level[n] != 1:
        return -1
    return n


@inline
def sppt_setup_structure(st, root, gfn, vector):
    """kvm_mmu_setup_spp_structure: build the path of ``gfn`` under ``root`` and write its leaf."""
    gpa = gfn << U_PAGE_SHIFT
    t = root
    for lvl in range(4, 1, -1):
        i = level_index(gpa, lvl)
        e = st.tables[t, i]
        if (e & U_SPPT_PRESENT) == U0:
            n = sppt_relink(st, e, lvl)
            if n < 0:
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


# ------------------------------------------------------------------ the v4 / v12 seam
# Every rule in which profile v4 (the seed, RESEND v4 Aug 2019) and profile v12 (May 2020)
# differ is one of the functions below, named after the v12 function that changed it
# (docs/semantics.md §4, §8.1). The page-granular baseline (§5) is the same
# in both profiles: it is a monitor's page tracking, not the SPP series. The control-plane
# half of the seam (KVM_INIT_SPP vs KVM_ENABLE_CAP, the uAPI struct, the page limit) is in
# sppjit.vm (_kvm_init_spp / _spp_init) and sppjit.abi.
@inline
def is_v12(st):
    return st.cfg[CF_PROFILE] == PROFILE_V12


@inline
def spp_granular(st):
    """SPP at 128-byte granularity (not the page-granular baseline)."""
    return st.cfg[CF_GRANULARITY] != GRAN_PAGE


@inline
def kvm_exit_spp_code(st):
    """The KVM_EXIT_* of a sub-page write violation: KVM_EXIT_SPP is 28 in v4, 29 in v12."""
    return B.KVM_EXIT_SPP_V12 if st.cfg[CF_PROFILE] == PROFILE_V12 else B.KVM_EXIT_SPP_V4


@inline
def check_spp_protection(st, slot, gfn):
    """Whether the EPT fault path may map ``gfn`` with a 2 MiB leaf (the region fits its slot).

    v4: always (huge pages silently leave protected gfns writable, v4 8/9). v12
    check_spp_protection, and the page baseline (KVM's page_track check): not when any gfn of
    the 2 MiB region is protected.
    """
    if is_v12(st) or not spp_granular(st):
        return not region_has_protected_gfn(st, slot, gfn)
    return True


@inline
def kvm_spp_mark_protection(st, gfn, e, m):
    """The 4 KiB leaf ``e`` of ``gfn`` after KVM applies map ``m`` (set path, and the fault path
    for m != FULL).

    Page baseline: W off for a protected page, W on for FULL.
    v4 (kvm_mmu_set_subpages / the lazy path): m != FULL -> W off, bit 61 on, and the SPPT leaf
    built at once in every vCPU's tree; FULL -> bit 61 off and W on.
    v12 kvm_spp_mark_protection: m != FULL -> W off, bit 61 on; FULL -> bit 61 off and W off
    too: v12 write-protects the SPTE (spte_write_protect) and leaves it so, the next write
    takes one wp_fault exit that sets W (docs/semantics.md §4.3, §7.7). v12 never builds
    SPPT entries here: the next eligible write misses and handle_spp fills the block.
    """
    if not spp_granular(st):
        if m != FULL_ACCESS_U32:
            return e & ~U_W
        return e | U_W
    if is_v12(st):
        if m != FULL_ACCESS_U32:
            return (e & ~U_W) | U_SPP
        return e & ~(U_W | U_SPP)
    if m != FULL_ACCESS_U32:
        sppt_setup_all_vcpus(st, gfn, map_to_vector(m))
        return (e & ~U_W) | U_SPP
    return (e & ~U_SPP) | U_W


@inline
def spp_zap_huge_on_set(st, m):
    """Whether set zaps a 2 MiB leaf over a gfn getting map ``m`` (so it re-faults at 4 KiB):
    v12 and the page baseline for m != FULL; v4 never (it logs "No EPT entry" only)."""
    if m == FULL_ACCESS_U32:
        return False
    return is_v12(st) or not spp_granular(st)


@inline
def spp_flush_sppt(st, gfn):
    """v12 spp_flush_sppt: clear bit 0 of the level-2 SPPT entry covering ``gfn`` in the shared
    tree (its address bits stay), so the next eligible write there takes an SPPT miss.

    v4 builds SPPT leaves eagerly instead: nothing to flush. Clearing a present non-leaf entry
    makes every vCPU's cached level-1 table of the region stale: their cache rows are reset.
    """
    if not is_v12(st) or not spp_granular(st):
        return
    root = st.scal[SC_SHARED_SPPT_ROOT]
    if root < 0:
        return
    gpa = gfn << U_PAGE_SHIFT
    t = root
    for lvl in range(4, 2, -1):
        e = st.tables[t, level_index(gpa, lvl)]
        if (e & U_SPPT_PRESENT) == U0:
            return
        t = hpa_table(st, e)
        if t < 0:
            return
    i = level_index(gpa, 2)
    e = st.tables[t, i]
    if (e & U_SPPT_PRESENT) != U0:
        st.tables[t, i] = e & ~U_SPPT_PRESENT
        r = cache_slot(st.sppt_cache.shape[1], gfn >> np.uint64(9))
        for v in range(st.sppt_cache.shape[0]):
            set_sppt_cache(st, v, r, CACHE_INVALID)


@inline
def handle_spp_miss(st, v, gfn):
    """handle_spp for an SPPT miss of vCPU ``v`` on ``gfn``.

    v4: build the path of this gfn in this vCPU's tree only, leaf = the stored map's vector.
    v12: under mmu_lock, fill the leaves of every gfn of the 2 MiB block whose map != FULL, in
    the shared tree (an invalidated level-2 entry is re-linked to its table). Leaves of FULL
    gfns are left as they are: v12 sets up only != FULL gfns, and a FULL gfn never has bit 61
    (v12 set and the fault path clear it), so the hardware never reads those leaves. One
    guard where v12 is silent: if the faulting gfn itself reads FULL (bit 61 set by hand, or
    the memslot-free quirk cleared spp_active), its own leaf is set to FULL_SPP_VECTOR too, so
    the guest's retry completes instead of missing forever.
    """
    if not is_v12(st):
        m = access_map_of(st, gfn)
        root = st.sppt_root[v]
        if root >= 0:
            sppt_setup_structure(st, root, gfn, map_to_vector(m))
        return
    root = st.scal[SC_SHARED_SPPT_ROOT]
    if root < 0:
        return
    first = gfn & ~np.uint64(511)
    for k in range(512):
        g = first + np.uint64(k)
        m = access_map_of(st, g)
        if m != FULL_ACCESS_U32:
            sppt_setup_structure(st, root, g, map_to_vector(m))
    if access_map_of(st, gfn) == FULL_ACCESS_U32:
        sppt_setup_structure(st, root, gfn, U_FULL_VECTOR)


@inline
def kvm_spp_free_memslot(st):
    """v12 kvm_spp_free_memslot frees the slot's maps and clears spp_active for the whole VM
    (a quirk of the posting). Returns 1 when that switched SPP off. v4 only frees the maps.
    The page baseline is not the SPP series: no quirk there either."""
    if is_v12(st) and spp_granular(st) and st.scal[SC_SPP_ACTIVE] != 0:
        st.scal[SC_SPP_ACTIVE] = 0
        return 1
    return 0


# ------------------------------------------------------------------ EPT fault, MMIO, set/get
@inline
def ram_hpa(gfn):
    """The host page backing a RAM gfn (sppjit.bits: GUEST_RAM_HPA + gpa mod GUEST_RAM_SIZE)."""
    return U_GUEST_RAM_HPA + ((gfn << U_PAGE_SHIFT) & U_GUEST_RAM_OFFSET)


@inline
def ram_leaf(gfn):
    """The 4 KiB EPT leaf KVM installs for a RAM gfn, before any protection."""
    return ram_hpa(gfn) | U_EPT_LEAF


@inline
def kvm_map_gfn_common(st, gfn, slot):
    """kvm_map_gfn's first step, the case that covers nearly every fault-in, without walks:
    when the region cache holds gfn's level-1 table (so no table is created, and no 2 MiB leaf
    is possible: a table already sits at level 2) and gfn's map is FULL or SPP is off (nothing
    to protect), the mapping is ram_leaf(gfn) there. Returns False, having done nothing, when
    that case does not hold. Small enough to inline where kvm_map_gfn is not."""
    t = cached_leaf_table(st, gfn)
    if t < 0:
        return False
    if st.scal[SC_SPP_ACTIVE] != 0 and stored_map(st, gfn) != FULL_ACCESS_U32:
        return False
    st.tables[t, level_index(gfn << U_PAGE_SHIFT, 1)] = ram_leaf(gfn)
    return True


@inline
def kvm_map_gfn(st, gfn, slot):
    """The EPT fault path (tdp_page_fault + lazy SPP): map a RAM gfn, protect it."""
    if kvm_map_gfn_common(st, gfn, slot):
        return
    huge = st.cfg[CF_HUGEPAGES] != 0 and region_fits_memslot(st, slot, gfn)
    if huge:
        huge = check_spp_protection(st, slot, gfn)
    if huge:
        t = ept_table_for(st, gfn, 2, True)
        i = level_index(gfn << U_PAGE_SHIFT, 2)
        if t >= 0 and (st.tables[t, i] & (U_R | U_W | U_X)) == U0:
            base = gfn & ~np.uint64(511)
            st.tables[t, i] = ram_hpa(base) | U_EPT_LEAF | U_PS
            invalidate_region(st, gfn)
            return
        # A level-1 table already exists for the region (4 KiB mappings or MMIO entries in
        # it): KVM maps at the level the existing tables allow.
    t = ept_table_for(st, gfn, 1, True)
    if t < 0:
        return  # an entry above that is neither a table nor a huge leaf (a hand-poked state)
    i = level_index(gfn << U_PAGE_SHIFT, 1)
    e = ram_leaf(gfn)
    if st.scal[SC_SPP_ACTIVE] != 0:
        m = stored_map(st, gfn)
        if m != FULL_ACCESS_U32:
            e = kvm_spp_mark_protection(st, gfn, e, m)
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
def set_subpages_pages(st, base_gfn, access_maps, offset, npages):
    """kvm_mmu_set_subpages (v4) / kvm_spp_set_permission (v12) for ``npages`` gfns from
    ``base_gfn``, their maps at access_maps[offset:offset + npages].

    Returns the number of gfns applied: npages on success, k < npages when gfn base+k has no
    memslot (-EFAULT; the k earlier gfns stay applied: no rollback, in both profiles).
    v12's order: (1) spp_flush_sppt over the gfns, (2) store the maps, (3) mark the EPT
    leaves; marking a gfn reads only its own map, so storing each map right after marking
    it (v4's order) gives the same state. v4: spp_flush_sppt does nothing.
    """
    done = npages
    for k in range(npages):
        if memslot_of(st, base_gfn + np.uint64(k)) < 0:
            done = k
            break
    for k in range(done):
        spp_flush_sppt(st, base_gfn + np.uint64(k))
    for k in range(done):
        gfn = base_gfn + np.uint64(k)
        m = np.uint32(access_maps[offset + k])
        t, i, level = ept_leaf(st, gfn)
        if level == 1:
            st.tables[t, i] = kvm_spp_mark_protection(st, gfn, st.tables[t, i], m)
        elif level == 2 and spp_zap_huge_on_set(st, m):
            zap_leaf(st, t, i, gfn)
        store_map(st, gfn, m)
    return done


@kernel
def kvm_set_subpages(st, base_gfn, access_maps, npages):
    """One KVM_SUBPAGES_SET_ACCESS call (set_subpages_pages). Returns the gfns applied."""
    return set_subpages_pages(st, base_gfn, access_maps, 0, npages)


# Results of kvm_set_subpages_runs.
RUNS_DONE = 0
RUNS_NEED_ROOM = 1  # run ``j`` needs the pools grown first (sppjit.vm grows them, calls again)
RUNS_EFAULT = 2  # run ``j`` stopped at its gfn ``done`` (no memslot); the earlier ones stay


@kernel
def kvm_set_subpages_runs(st, run_gfn, run_offset, run_len, access_maps, need_tables, need_maps, first):
    """Runs first.. of a protection as the set_subpages calls sppjit.vm would make for them, one
    after the other, in one kernel call: run j is a call for run_len[j] gfns from run_gfn[j],
    maps at access_maps[run_offset[j]:], counting one TLB flush when it applied any page
    (kvm_flush_remote_tlbs after the update), exactly as VM._kvm_set_subpages does per call.

    Before each run it checks the room the per-call path makes for it (``need_tables[j]``
    free tables, ``need_maps[j]`` free map nodes and blocks) and stops, with RUNS_NEED_ROOM,
    where there is not: the caller grows the pools as that call would have, and calls again
    from run j, so the pools grow at the same points. Returns (status, run, pages applied in
    it): (RUNS_DONE, runs, 0), (RUNS_NEED_ROOM, j, 0) or (RUNS_EFAULT, j, done).
    """
    for j in range(first, run_gfn.shape[0]):
        if (st.tables.shape[0] - st.scal[SC_NTABLES] < need_tables[j]
                or st.map_nodes.shape[0] - st.scal[SC_MAP_NODES] < need_maps[j]
                or st.map_blocks.shape[0] - st.scal[SC_MAP_BLOCKS] < need_maps[j]):
            return RUNS_NEED_ROOM, j, 0
        n = run_len[j]
        done = set_subpages_pages(st, run_gfn[j], access_maps, run_offset[j], n)
        if done > 0:
            st.scal[SC_TLB_FLUSHES] += 1
        if done < n:
            return RUNS_EFAULT, j, done
    return RUNS_DONE, run_gfn.shape[0], 0


@kernel
def kvm_get_subpages(st, base_gfn, out, npages):
    """kvm_mmu_get_subpages: copy the maps; returns k < npages at the first gfn with no memslot."""
    for k in range(npages):
        gfn = base_gfn + np.uint64(k)
        if memslot_of(st, gfn) < 0:
            return k
        out[k] = stored_map(st, gfn)
    return npages


# ------------------------------------------------------------------ host side: MMU notifiers, memslots
@inline
def invalidate_span(st, gfn, lvl):
    """Reset the EPT region cache of every 2 MiB region under one entry of ``lvl`` at ``gfn``."""
    if lvl <= 2:
        invalidate_region(st, gfn)
        return
    span = np.int64(1 << (9 * (lvl - 2)))
    if span >= st.ept_cache.shape[0]:
        for r in range(st.ept_cache.shape[0]):
            set_ept_cache(st, r, CACHE_INVALID)  # the view rows of the entries in use only
        return
    r0 = np.int64(gfn >> np.uint64(9)) & ~(span - 1)
    for r in range(r0, r0 + span):
        set_ept_cache(st, cache_slot(st.ept_cache.shape[0], np.uint64(r)), CACHE_INVALID)


@inline
def zap_range(st, gfn0, npages, remap):
    """Walk the EPT leaves over gfns gfn0 .. gfn0+npages-1 (skipping absent subtrees).

    ``remap`` False: the MMU-notifier invalidate (kvm_unmap_hva_range): every present leaf goes,
    a huge leaf covering any of the range whole, MMIO entries too. ``remap`` True: change_pte
    (kvm_set_pte_rmapp): each 4 KiB RAM leaf gets the next host page (REMAP_HPA + 4096 k),
    loses W, and gets bit 61 back when SPP (granularity spp) is active and its map != FULL;
    a huge leaf touched is zapped; MMIO entries are left alone. Returns the entries changed.
    """
    changed = 0
    gfn = gfn0
    end = gfn0 + np.uint64(npages)
    while gfn < end:
        t = st.scal[SC_EPT_ROOT]
        gpa = gfn << U_PAGE_SHIFT
        span = np.uint64(1)
        for lvl in range(4, 0, -1):
            span = np.uint64(1) << np.uint64(9 * (lvl - 1))
            i = level_index(gpa, lvl)
            e = st.tables[t, i]
            if (e & U_RWX) == U0:
                break
            if lvl == 1 or (lvl <= 3 and (e & U_PS) != U0):
                if not remap:
                    st.tables[t, i] = U0
                    invalidate_span(st, gfn, lvl)
                    changed += 1
                elif is_shadow_present(e):
                    if lvl > 1:
                        st.tables[t, i] = U0
                        invalidate_span(st, gfn, lvl)
                    else:
                        k = np.uint64(st.scal[SC_REMAP_NEXT])
                        st.scal[SC_REMAP_NEXT] += 1
                        n = ((e & ~U_ADDR) | (U_REMAP_HPA + (k << U_PAGE_SHIFT))) & ~U_W
                        if spp_granular(st) and access_map_of(st, gfn) != FULL_ACCESS_U32:
                            n |= U_SPP
                        st.tables[t, i] = n
                    changed += 1
                break
            t = hpa_table(st, e)
            if t < 0:
                break
        gfn = (gfn | (span - np.uint64(1))) + np.uint64(1)
    return changed


@kernel
def kvm_zap_range(st, gfn0, npages):
    """MMU-notifier invalidate of ``npages`` gfns from ``gfn0``; the SPPT is untouched (level-1
    SPPT pages have no rmaps). The next access faults and the lazy path re-applies protection
    from the stored maps. Returns the EPT entries removed."""
    return zap_range(st, gfn0, npages, False)


@kernel
def kvm_remap_range(st, gfn0, npages):
    """MMU-notifier change_pte over ``npages`` gfns from ``gfn0`` (v4 9/9, v12 08/11: the same
    in both profiles). A later write to an unprotected remapped page takes one wp_fault exit
    that sets W again. Returns the EPT entries changed."""
    return zap_range(st, gfn0, npages, True)


@inline
def free_maps(st, g0, g1):
    """Every stored map of gfns g0..g1-1 back to FULL (kvm_spp_free_memslot frees the slot's
    maps), visiting only the GiBs and regions that hold blocks."""
    g = g0
    while g < g1:
        d = g >> _U_MAP_DIR_SHIFT
        gib_end = min(g1, (d + np.uint64(1)) << _U_MAP_DIR_SHIFT)
        node = st.map_dir[d] if d < np.uint64(st.map_dir.shape[0]) else MAP_NONE
        while node >= 0 and g < gib_end:
            region_end = min(gib_end, (g | _U_511) + np.uint64(1))
            b = st.map_nodes[node, (g >> np.uint64(9)) & _U_511]
            if b >= 0:
                for x in range(np.int64(g & _U_511), np.int64((region_end - np.uint64(1)) & _U_511) + 1):
                    st.map_blocks[b, x] = FULL_ACCESS_U32
            g = region_end
        g = gib_end


@kernel
def kvm_delete_memslot(st, slot):
    """Delete memslot ``slot``: zap its EPT leaves, free its maps (slot_npages = 0 marks the slot
    deleted; its gfns are MMIO from now on), and kvm_spp_free_memslot (v12: spp_active = 0).

    Returns (EPT entries removed, 1 if SPP was switched off by the v12 quirk else 0).
    """
    base = st.slot_base[slot]
    n = st.slot_npages[slot]
    changed = zap_range(st, base, n, False)
    free_maps(st, base, base + n)
    st.slot_npages[slot] = U0
    return changed, kvm_spp_free_memslot(st)


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
            set_sppt_cache(st, v, r, CACHE_INVALID)  # and the view rows the old SPPT decided
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
