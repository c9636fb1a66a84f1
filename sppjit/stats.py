"""Page statistics of a VM's state, computed from the tables themselves (numpy, vectorised)."""

from __future__ import annotations

import numpy as np

from . import bits as B
from .kernels import layout as L

_ADDR = np.uint64(B.PT64_BASE_ADDR_MASK)


def _table_index(entries: np.ndarray) -> np.ndarray:
    return ((entries & _ADDR) - np.uint64(B.TABLE_POOL_HPA)) >> np.uint64(B.PAGE_SHIFT)


def _shadow_present(e: np.ndarray) -> np.ndarray:
    """Some of R/W/X set and not an MMIO entry (W without R), as kernels.mmu.is_shadow_present."""
    rwx = e & np.uint64(B.VMX_EPT_RWX_MASK)
    mmio = ((rwx & np.uint64(B.VMX_EPT_READABLE_MASK)) == 0) & ((rwx & np.uint64(B.VMX_EPT_WRITABLE_MASK)) != 0)
    return (rwx != 0) & ~mmio


def ept_leaves(st, gfns: np.ndarray):
    """KVM's view of the EPT for many gfns at once: (leaf entry, level, cumulative RWX).

    Level 0 means no present RAM leaf (not mapped, or an MMIO entry).
    """
    gfns = np.asarray(gfns, dtype=np.uint64)
    n = gfns.shape[0]
    gpa = gfns << np.uint64(B.PAGE_SHIFT)
    used = int(st.scal[L.SC_NTABLES])
    table = np.full(n, st.scal[L.SC_EPT_ROOT], dtype=np.int64)
    alive = np.ones(n, dtype=bool)
    cum = np.full(n, B.VMX_EPT_RWX_MASK, dtype=np.uint64)
    leaf = np.zeros(n, dtype=np.uint64)
    level = np.zeros(n, dtype=np.int64)
    for lvl in (4, 3, 2, 1):
        idx = (gpa >> np.uint64(B.PAGE_SHIFT + 9 * (lvl - 1))) & np.uint64(511)
        e = np.zeros(n, dtype=np.uint64)
        e[alive] = st.tables[table[alive], idx[alive]]
        present = alive & _shadow_present(e)
        cum = np.where(present, cum & e & np.uint64(7), cum)
        is_leaf = present & ((lvl == 1) | ((lvl <= 3) & ((e & np.uint64(B.PT_PAGE_SIZE_MASK)) != 0)))
        leaf = np.where(is_leaf, e, leaf)
        level = np.where(is_leaf, lvl, level)
        alive = present & ~is_leaf
        nxt = _table_index(e).astype(np.int64)
        alive &= (nxt >= 0) & (nxt < used)
        table = np.where(alive, nxt, 0)
    return leaf, level, cum


def protected_gfns(st) -> np.ndarray:
    """The gfns whose stored map is not FULL_SPP_ACCESS (none while SPP is inactive)."""
    if not st.scal[L.SC_SPP_ACTIVE]:
        return np.zeros(0, dtype=np.uint64)
    return L.stored_maps(st)[0]


def page_counts(st) -> dict[str, int]:
    """The ``pages`` block of the summary, except ``touched`` (a property of the replay)."""
    used = int(st.scal[L.SC_NTABLES])
    kinds = st.table_kind[:used]
    levels = st.table_level[:used]
    tables = st.tables[:used]
    l1 = tables[(kinds == L.TABLE_EPT) & (levels == 1)]
    l2 = tables[(kinds == L.TABLE_EPT) & (levels == 2)]
    mapped_4k = int(np.count_nonzero(_shadow_present(l1)))
    mapped_2m = int(np.count_nonzero(_shadow_present(l2) & (l2 & np.uint64(B.PT_PAGE_SIZE_MASK) != 0)))
    prot = protected_gfns(st)
    _, level, cum = ept_leaves(st, prot)
    writable = (level > 0) & ((cum & np.uint64(B.VMX_EPT_WRITABLE_MASK)) != 0)
    return {
        "mapped_4k": mapped_4k,
        "mapped_2m": mapped_2m,
        "protected": int(prot.shape[0]),
        "protected_left_writable": int(np.count_nonzero(writable)),
        "ept_tables": int(np.count_nonzero(kinds == L.TABLE_EPT)),
        "sppt_tables": int(np.count_nonzero(kinds == L.TABLE_SPPT)),
        "mmio_pages": int(st.scal[L.SC_MMIO_PAGES]),
    }
