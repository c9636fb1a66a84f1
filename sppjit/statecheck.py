"""Checks of a VM state that did not come from this process (a saved state): every index the
kernels follow without a bounds check is verified here, with vectorised numpy, before any
kernel sees the arrays.

The kernels trust: the pool counters (tables, map nodes, map blocks in use), the EPT root and
the SPPT roots, the kind and level of each table, the tables that non-leaf entries point at,
the access-map directory, the region caches, the vCPU count, and EPT_POINTER (the region
caches rely on it being KVM's root). Entry values themselves are the hardware's business (a
misconfigured or odd entry is a legal state the model handles), so only what leads to an
index is checked. ``check_state`` returns the first problem found as one line, or "".
"""

from __future__ import annotations

import numpy as np

from . import bits as B
from .kernels import layout as L

_ADDR = np.uint64(B.PT64_BASE_ADDR_MASK)
_POOL = np.uint64(B.TABLE_POOL_HPA)
_SHIFT = np.uint64(B.PAGE_SHIFT)
_CHUNK = 4096  # tables per vectorised step: 16 MiB of entries at a time


def _table_ok(st, index: int, kind: int, level: int) -> bool:
    n = int(st.scal[L.SC_NTABLES])
    return (0 <= index < n and int(st.table_kind[index]) == kind
            and int(st.table_level[index]) == level)


def _scalars(st, config) -> str:
    sc = st.scal
    n = int(sc[L.SC_NTABLES])
    if int(sc[L.SC_NVCPUS]) != config.vcpus:
        return f"scal says {int(sc[L.SC_NVCPUS])} vCPUs, the config {config.vcpus}"
    if int(sc[L.SC_SPP_ACTIVE]) not in (0, 1):
        return f"spp_active is {int(sc[L.SC_SPP_ACTIVE])} (0 or 1)"
    for name, i in (("mmio_pages", L.SC_MMIO_PAGES), ("tlb_flushes", L.SC_TLB_FLUSHES)):
        if sc[i] < 0:
            return f"the counter {name} is negative ({int(sc[i])})"
    remap_limit = ((1 << B.MAXPHYADDR) - B.REMAP_HPA) >> B.PAGE_SHIFT
    if not 0 <= int(sc[L.SC_REMAP_NEXT]) <= remap_limit:
        return f"the next remap page {int(sc[L.SC_REMAP_NEXT])} is outside 0..{remap_limit}"
    kinds, levels = st.table_kind[:n], st.table_level[:n]
    bad = np.flatnonzero(((kinds != L.TABLE_EPT) & (kinds != L.TABLE_SPPT)) | (levels < 1) | (levels > 4))
    if bad.size:
        i = int(bad[0])
        return f"table {i} has kind {int(kinds[i])} and level {int(levels[i])} (EPT/SPPT, 1..4)"
    root = int(sc[L.SC_EPT_ROOT])
    if not _table_ok(st, root, L.TABLE_EPT, 4):
        return f"the EPT root {root} is not a level-4 EPT table of the {n} in use"
    shared = int(sc[L.SC_SHARED_SPPT_ROOT])
    if shared != -1 and not _table_ok(st, shared, L.TABLE_SPPT, 4):
        return f"the shared SPPT root {shared} is neither -1 nor a level-4 SPPT table"
    for v, r in enumerate(st.sppt_root.tolist()):
        if r != -1 and not _table_ok(st, r, L.TABLE_SPPT, 4):
            return f"vCPU {v}'s SPPT root {r} is neither -1 nor a level-4 SPPT table"
    if config.profile == "v12" and not (st.sppt_root == shared).all():
        return "v12: every vCPU's SPPT root must be the shared root"
    return ""


def _vcpus(st) -> str:
    eptp = B.construct_eptp(B.TABLE_POOL_HPA + int(st.scal[L.SC_EPT_ROOT]) * B.PAGE_SIZE)
    bad = np.flatnonzero(st.vmcs[:, B.VMCS_COL_EPTP] != np.uint64(eptp))
    if bad.size:
        return f"vCPU {int(bad[0])}'s EPT_POINTER is not KVM's root ({eptp:#x})"
    known = L.REQ_LOAD_CR3 | L.REQ_ENTRY_CHECK
    bad = np.flatnonzero(st.requests & np.uint8(~known & 0xFF))
    if bad.size:
        return f"vCPU {int(bad[0])} has unknown pending requests {int(st.requests[bad[0]]):#x}"
    return ""


def _memslots(st, config) -> str:
    bases = np.array([b for b, _ in config.memslots], dtype=np.uint64)
    npages = np.array([n for _, n in config.memslots], dtype=np.uint64)
    if not np.array_equal(st.slot_base, bases):
        return "the memslot bases do not match the config"
    if not ((st.slot_npages == npages) | (st.slot_npages == 0)).all():
        return "a memslot's size is neither the config's nor 0 (deleted)"
    return ""


def _pointers(st) -> str:
    """Every present non-leaf entry that points into the pool points at a table of its own kind,
    one level down. Entries pointing outside the pool read as zeros to the hardware and stop
    KVM's walks (kernels.mmu.hpa_table): legal."""
    n = int(st.scal[L.SC_NTABLES])
    kinds, levels = st.table_kind[:n], st.table_level[:n]
    rwx = np.uint64(B.VMX_EPT_RWX_MASK)
    ps = np.uint64(B.PT_PAGE_SIZE_MASK)
    present = np.uint64(B.SPPT_PRESENT_MASK)
    for kind, name in ((L.TABLE_EPT, "EPT"), (L.TABLE_SPPT, "SPPT")):
        for level in (4, 3, 2):
            rows = np.flatnonzero((kinds == kind) & (levels == level))
            for c in range(0, rows.size, _CHUNK):
                idx = rows[c:c + _CHUNK]
                e = st.tables[idx]
                if kind == L.TABLE_EPT:
                    followed = (e & rwx) != 0
                    if level < 4:
                        followed &= (e & ps) == 0
                else:
                    followed = (e & present) != 0
                a = e & _ADDR
                target = ((a - _POOL) >> _SHIFT).astype(np.int64)
                inside = followed & (a >= _POOL) & (target >= 0) & (target < n)
                t = np.where(inside, target, 0)
                wrong = inside & ((kinds[t] != kind) | (levels[t] != level - 1))
                if wrong.any():
                    r, i = (int(x[0]) for x in np.nonzero(wrong))
                    return (f"entry {i} of level-{level} {name} table {int(idx[r])} points at table "
                            f"{int(t[r, i])}, not a level-{level - 1} {name} table")
    return ""


def _maps(st, config) -> str:
    nodes, blocks = int(st.scal[L.SC_MAP_NODES]), int(st.scal[L.SC_MAP_BLOCKS])
    d = st.map_dir
    bad = np.flatnonzero((d < -1) | (d >= nodes))
    if bad.size:
        return f"map directory entry {int(bad[0])} is {int(d[bad[0]])} (-1 or a node 0..{nodes - 1})"
    used = d[d >= 0]
    if np.unique(used).size != used.size:
        return "two map directory entries share a node"
    nd = st.map_nodes[:nodes]
    bad = np.argwhere((nd < -1) | (nd >= blocks))
    if bad.size:
        r, i = (int(x) for x in bad[0])
        return f"map node {r} entry {i} is {int(nd[r, i])} (-1 or a block 0..{blocks - 1})"
    referenced = nd[used]
    referenced = referenced[referenced >= 0]
    if np.unique(referenced).size != referenced.size:
        return "two regions share a map block"
    # Maps are keyed by gfn: a gfn in no (live) memslot keeps FULL (set needs a memslot, and
    # deleting one resets its gfns), so that a later memslot lookup cannot disagree with them.
    gfns, _ = L.stored_maps(st)
    if gfns.size:
        live = np.zeros(gfns.size, dtype=bool)
        for base, npages in zip(st.slot_base.tolist(), st.slot_npages.tolist()):
            live |= (gfns >= np.uint64(base)) & (gfns < np.uint64(base + npages))
        if not live.all():
            return f"gfn {int(gfns[~live][0]):#x} has a stored map but no memslot"
    return ""


_OLD_CACHE_INVALID = -1


def _caches(st) -> str:
    """Region caches: CACHE_INVALID, or tagged with a region that lives in that entry and pointing at a
    table of the right kind and level (EPT: level 1, or level 2 for a huge leaf; SPPT: level 1).
    They are dropped after loading anyway; a bad one means a damaged file."""
    n = int(st.scal[L.SC_NTABLES])
    kinds, levels = st.table_kind[:n], st.table_level[:n]
    for name, cache, kind in (("ept_cache", st.ept_cache[None, :], L.TABLE_EPT),
                              ("sppt_cache", st.sppt_cache, L.TABLE_SPPT)):
        entries = cache.shape[1]
        if entries & (entries - 1) or entries != st.ept_cache.shape[0]:
            return f"{name} has {entries} entries (a power of two, as ept_cache)"
        c = cache
        # (-1 is how releases before the zeroed caches saved an empty entry: their files load)
        valid = (c != L.CACHE_INVALID) & (c != _OLD_CACHE_INVALID)
        region = (c >> L.CACHE_TAG_SHIFT) - 1  # the tag is the region + 1 (kernels.mmu.cache_tag)
        payload = c & L.CACHE_PAYLOAD_MASK
        table = payload >> 4 if kind == L.TABLE_EPT else payload
        slot = np.arange(entries, dtype=np.int64)[None, :]
        ok = (region >= 0) & (region < L.CACHE_REGION_LIMIT) & ((region & (entries - 1)) == slot)
        ok &= (table >= 0) & (table < n)
        t = np.where(ok, table, 0)
        want = 1 if kind == L.TABLE_SPPT else np.where((payload & 8) != 0, 2, 1)
        ok &= (kinds[t] == kind) & (levels[t] == want)
        bad = np.argwhere(valid & ~ok)
        if bad.size:
            v, i = (int(x) for x in bad[0])
            return f"{name} entry {i}{f' of vCPU {v}' if kind == L.TABLE_SPPT else ''} is {int(c[v, i]):#x}"
    return ""


def _view_shape(st) -> str:
    view = st.write_view
    entries = st.ept_cache.shape[0]
    if view.dtype != np.uint64 or view.shape not in ((st.vmcs.shape[0], entries, 512), (st.vmcs.shape[0], 0, 512)):
        return f"write_view has shape {view.shape} (vCPUs, {entries} or 0, 512)"
    return ""


def write_rights(st, vcpu: int, gfn: int) -> int:
    """The sub-pages of ``gfn`` a write by ``vcpu`` is allowed to, from the real tables (the
    reference engine's hardware check of a one-byte write to each): the write view's low
    half (kernels.layout), 0 when none is allowed."""
    return _write_answers(st, vcpu, gfn)[0]


def _write_answers(st, vcpu: int, gfn: int) -> tuple[int, set]:
    """(write_rights, the set of (reason, qualification) of the refused sub-pages' exits)."""
    from .reference import hardware_check

    gpa = gfn << B.PAGE_SHIFT
    rights, refused = 0, set()
    for j in range(B.SUBPAGES_PER_PAGE):
        first = gpa + (j << B.SUBPAGE_SHIFT)
        exit_ = hardware_check(st, vcpu, first, first, B.ACCESS_WRITE)
        if exit_ is None:
            rights |= 1 << j
        else:
            refused.add((exit_.reason, exit_.qualification))
    return rights, refused


def _leaf_4k(st, vcpu: int, gfn: int) -> int:
    """gfn's 4 KiB EPT leaf as vCPU ``vcpu``'s walk reaches it, or 0 (none, or a larger page)."""
    from .reference import _read

    gpa = gfn << B.PAGE_SHIFT
    table = int(st.vmcs[vcpu, B.VMCS_COL_EPTP]) & B.PT64_BASE_ADDR_MASK
    for level in (4, 3, 2):
        entry = _read(st, table, B.level_index(gpa, level))
        if not entry & B.VMX_EPT_RWX_MASK or entry & B.PT_PAGE_SIZE_MASK:
            return 0
        table = entry & B.PT64_BASE_ADDR_MASK
    return _read(st, table, B.level_index(gpa, 1))


def _refusal_problem(st, vcpu: int, gfn: int, refusal: int, refused: set) -> str:
    """Why a view word's refusal (its high half) is not what the tables say, or "": every
    refused sub-page must exit with that qualification, as the sub-page violation KVM's handler
    sees in it (a 4 KiB leaf with the SPP bit set and W clear), in SPP granularity."""
    if int(st.cfg[L.CF_GRANULARITY]) == L.GRAN_PAGE:
        return "records a refusal in page granularity"
    if refused and refused != {(B.EXIT_REASON_EPT_VIOLATION, refusal)}:
        return f"records refusals {refusal:#x}, where the refused sub-pages exit with {sorted(refused)}"
    leaf = _leaf_4k(st, vcpu, gfn)
    if not leaf & B.PT64_SPP_MASK or leaf & B.VMX_EPT_WRITABLE_MASK:
        return f"records refusals {refusal:#x}, where the leaf {leaf:#x} makes no sub-page violation"
    return ""


def check_write_view(st) -> str:
    """The write view held against the tables: the first entry that is not what they say, as
    one line, or "". Every non-zero entry (vCPU v, cache entry i, gfn index g) must sit under
    an ept_cache entry in use (whose region it describes: kernels.mmu, rule 1), hold in its
    low half write_rights of that vCPU and gfn, in its high half nothing or the qualification
    of the sub-page violation every other write exits with, and, unless it is the whole page
    and nothing else, sit under an sppt_cache entry of that region too (rule 2). Costs a
    hardware check per sub-page of each entry: for tests and inspection, not for loading (a
    loaded view is empty)."""
    problem = _view_shape(st)
    if problem or st.write_view.shape[1] == 0:
        return problem
    vs, slots, idx = np.nonzero(st.write_view)
    for v, slot, i in zip(vs.tolist(), slots.tolist(), idx.tolist()):
        entry = int(st.write_view[v, slot, i])
        c = int(st.ept_cache[slot])
        where = f"write_view[{v}, {slot}, {i}] = {entry:#018x}"
        if c in (L.CACHE_INVALID, _OLD_CACHE_INVALID):
            return f"{where} under an empty ept_cache entry"
        region = (c >> L.CACHE_TAG_SHIFT) - 1
        gfn = (region << 9) | i
        if entry != B.FULL_SPP_ACCESS and (int(st.sppt_cache[v, slot]) >> L.CACHE_TAG_SHIFT) - 1 != region:
            return f"{where} (gfn {gfn:#x}) decided by an SPP vector, under no sppt_cache entry of its region"
        want, refused = _write_answers(st, v, gfn)
        if entry & 0xFFFFFFFF != want:
            return f"{where}: gfn {gfn:#x} allows vCPU {v} to write sub-pages {want:#010x}"
        refusal = entry >> L.WRITE_VIEW_REFUSAL_SHIFT
        if refusal:
            problem = _refusal_problem(st, v, gfn, refusal, refused)
            if problem:
                return f"{where} (gfn {gfn:#x}) {problem}"
    return ""


def check_state(st: L.State, config) -> str:
    """The first thing in ``st`` that the kernels could not trust, as one line; "" if none.

    ``st`` has the dtypes and shapes of a fresh VM of ``config`` (savestate._restore) and its
    pools hold at least the entries their counters say."""
    for check in (lambda: _scalars(st, config), lambda: _vcpus(st), lambda: _memslots(st, config),
                  lambda: _pointers(st), lambda: _maps(st, config), lambda: _caches(st),
                  lambda: check_write_view(st)):
        problem = check()
        if problem:
            return problem
    return ""
