"""The layout of a VM's state: plain numpy arrays, bundled in one namedtuple for the kernels.

Everything a VM is lives in these arrays (no Python objects, no globals), so a state can be
saved with numpy, shipped to a worker, and handed to any kernel. Sizes that grow (the table
pool) are replaced by the control plane between kernel calls; kernels never reallocate.
"""

import mmap
from collections import namedtuple

import numpy as np

from sppjit.bits import FULL_SPP_ACCESS

# Arrays of at least this many bytes that must start zero, and may be mostly never touched (the
# table pool, the region caches, the write view), come from lazy_zeros.
LAZY_ZEROS_MIN_BYTES = 1 << 20
_HUGE_PAGE_MIN_BYTES = 4 << 20  # numpy's own threshold for asking for transparent huge pages


def lazy_zeros(shape, dtype) -> np.ndarray:
    """np.zeros whose pages the system maps on first touch, always.

    np.zeros is lazy only when the allocator takes fresh memory from the system: when it
    recycles memory a Python object freed (a second VM in the same process, a sweep's next
    configuration, a worker's next job), calloc writes zeros over all of it, and each page it
    had handed back faults in again (on the development VM, 10-25 us a page: a 256 MiB pool
    reserved for a large guest would cost a second). A private anonymous mapping is zero and
    unmapped until touched, whatever came before; it is unmapped when the array goes."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < LAZY_ZEROS_MIN_BYTES or not hasattr(mmap, "MAP_PRIVATE"):
        return np.zeros(shape, dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # -1: anonymous; private: a fork copies it
    if nbytes >= _HUGE_PAGE_MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)  # as numpy asks for its own large arrays
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


# Indices into State.scal (int64): the scalar part of the state.
SC_NTABLES = 0  # table-pool entries in use
SC_EPT_ROOT = 1  # pool index of the EPT level-4 table
SC_SPP_ACTIVE = 2  # kvm->arch.spp_active (page mode: write tracking active)
SC_NVCPUS = 3
SC_REMAP_NEXT = 4  # next host page handed out by a remap (hpa REMAP_HPA + 4096 * it)
SC_MMIO_PAGES = 5  # MMIO entries KVM installed (first access to a gfn with no memslot)
SC_TLB_FLUSHES = 6  # served LOAD_CR3 requests + set/zap/remap/delete calls that changed state
SC_SHARED_SPPT_ROOT = 7  # v12: pool index of the shared SPPT root (kvm->arch.sppt_root), -1 before enable
SC_MAP_NODES = 8  # rows of map_nodes in use
SC_MAP_BLOCKS = 9  # rows of map_blocks in use
SC_LEN = 10

# Indices into State.cfg (int64): settings fixed at VM creation. Each value's code is its
# index in sppjit.defaults.PROFILES, GRANULARITIES and SUBPAGE_CHECKS.
CF_PROFILE = 0  # PROFILE_V4 / PROFILE_V12
CF_GRANULARITY = 1  # GRAN_SPP / GRAN_PAGE
CF_SUBPAGE_CHECK = 2  # CHECK_ALL / CHECK_FIRST
CF_HUGEPAGES = 3
CF_SPP_SUPPORTED = 4
CF_NESTED = 5
CF_LEN = 6

PROFILE_V4 = 0
PROFILE_V12 = 1
GRAN_SPP = 0
GRAN_PAGE = 1
CHECK_ALL = 0
CHECK_FIRST = 1

TABLE_FREE = 0
TABLE_EPT = 1
TABLE_SPPT = 2

# Pending vCPU requests (bit mask in State.requests).
REQ_LOAD_CR3 = 1  # v4 KVM_REQ_LOAD_CR3 / v12 KVM_REQ_LOAD_MMU_PGD: load SPPTP and the control
REQ_LOAD_MMU_PGD = REQ_LOAD_CR3  # v12's name for the same request
REQ_ENTRY_CHECK = 2  # the VMCS was written from outside: re-run the VM-entry checks

# Region caches (ept_cache, sppt_cache): direct-mapped over 2 MiB regions, a power-of-two
# number of entries; region r lives in entry r & (entries - 1), tagged with r + 1:
# entry = (r + 1) << CACHE_TAG_SHIFT | payload. 0 (CACHE_INVALID) means "walk the tables", and
# so does a tag that is not the region asked for. Empty is 0 so that a VM's caches come from
# lazy_zeros, whose pages the system maps on first touch: creating a 1 TiB, 8-vCPU VM costs no
# 18 MB fill. See kernels/replay.py.
CACHE_INVALID = 0
CACHE_TAG_SHIFT = 36  # payloads (a pool index << 4 | flags) stay below 2**36
CACHE_PAYLOAD_MASK = (1 << CACHE_TAG_SHIFT) - 1
# Regions below this are cached: their tags (r + 1) fit in 27 bits, so entries stay positive.
# (The last 2 MiB of the 48-bit guest-physical space is walked every time.)
CACHE_REGION_LIMIT = (1 << 27) - 1
MAX_TABLES = 1 << 32  # pool indices fit the caches' payloads
# Entries per cache row: enough for every region the memslots span (no two of them share an
# entry), at most 2**18 (512 GiB of guest memory without aliasing), and the caches of all
# vCPUs together at most 64 MiB. Beyond that regions share entries: a miss walks the tables.
MAX_CACHE_ENTRIES = 1 << 18
CACHE_BUDGET_ENTRIES = 1 << 23

# The write view (State.write_view, kernels.hardware.view_word): per vCPU, per region-cache
# entry, per gfn of the region, one uint64 word, 0 = unknown. Its low half is the u32 set of
# sub-pages a write is allowed to (bit j = sub-page j): KVM's access-map encoding, FULL_SPP_ACCESS
# when the walk's W allows the whole page, the SPP vector's write bits when the vector decides.
# Its high half, when non-zero, is the exit qualification of the sub-page violation any other
# write to the page takes (a 4 KiB leaf with the SPP bit and W clear, whose vector decides).
# So an allowed write and a refused one are each one load, with no branch on whether or how
# the page is protected. It is derived (a cache of the EPT walk, the leaf and the SPP vector),
# so it is never saved; it exists only while vcpus * entries rows of WRITE_VIEW_ROW_BYTES fit
# WRITE_VIEW_BUDGET (else its shape is (vcpus, 0, 512) and the kernels skip it).
WRITE_VIEW_ROW_BYTES = 512 * 8
WRITE_VIEW_BUDGET = 128 << 20
WRITE_VIEW_REFUSAL_SHIFT = 32

# Access maps (KVM's subpage_wp_info) are sparse, allocated when a region is first protected:
# map_dir has one entry per GiB (2**MAP_DIR_SHIFT gfns) below the top of the highest memslot,
# -1 or a row of map_nodes; a map_nodes row has one entry per 2 MiB region of that GiB, -1 or
# a row of map_blocks; a map_blocks row holds the u32 maps of the region's 512 gfns. Where
# there is no row, every map is FULL_SPP_ACCESS. Maps are keyed by gfn (memslots never
# overlap; deleting one resets its gfns to FULL).
MAP_DIR_SHIFT = 18
MAP_NONE = -1

State = namedtuple(
    "State",
    [
        "tables",  # uint64[cap, 512]: EPT and SPPT pages; pool index i is at hpa TABLE_POOL_HPA + 4096 i
        "table_kind",  # uint8[cap]: TABLE_EPT / TABLE_SPPT
        "table_level",  # uint8[cap]: 4..1, the level of the entries the table holds
        "scal",  # int64[SC_LEN]
        "cfg",  # int64[CF_LEN]
        "vmcs",  # uint64[vcpus, VMCS_NFIELDS], columns as bits.VMCS_FIELDS
        "requests",  # uint8[vcpus]
        "sppt_root",  # int64[vcpus]: pool index of each vCPU's SPPT root (mmu->sppt_root), -1 invalid;
        #              v12: every entry is the shared root scal[SC_SHARED_SPPT_ROOT]
        "slot_base",  # uint64[slots]: base gfn
        "slot_npages",  # uint64[slots]: 0 for a deleted slot (vm.delete_memslot)
        "map_dir",  # int64[GiBs below the top memslot]: row of map_nodes, -1 none
        "map_nodes",  # int64[node capacity, 512]: per 2 MiB region, row of map_blocks, -1 none
        "map_blocks",  # uint32[block capacity, 512]: the regions' maps (FULL_SPP_ACCESS = unprotected)
        "ept_cache",  # int64[entries]: tagged; payload the table holding the region's EPT leaves << 4 | flags
        "sppt_cache",  # int64[vcpus, entries]: tagged; payload the vCPU's SPPT level-1 table of the region
        "write_view",  # uint64[vcpus, entries or 0, 512]: sub-pages a write may touch | refusal << 32 (above)
    ],
)


def cache_entries(memslots, vcpus: int = 1) -> int:
    """Entries of a region-cache row for these memslots (a power of two, see MAX_CACHE_ENTRIES)."""
    from sppjit.bits import PAGES_PER_2M

    spanned = sum(-(-(int(b) + int(n)) // PAGES_PER_2M) - int(b) // PAGES_PER_2M for b, n in memslots)
    cap = min(MAX_CACHE_ENTRIES, CACHE_BUDGET_ENTRIES // (1 + int(vcpus)))
    entries = 1
    while entries < spanned and 2 * entries <= cap:
        entries *= 2
    return entries


def write_view_entries(vcpus: int, entries: int) -> int:
    """Rows per vCPU of the write view: every cache entry, or 0 (no view) over the budget."""
    return entries if int(vcpus) * int(entries) * WRITE_VIEW_ROW_BYTES <= WRITE_VIEW_BUDGET else 0


def empty_write_view(vcpus: int, entries: int) -> np.ndarray:
    # Its pages are mapped on first touch (lazy_zeros): a view no write reaches costs nothing.
    return lazy_zeros((int(vcpus), write_view_entries(vcpus, entries), 512), np.uint64)


def map_dir_len(memslots) -> int:
    top = int(max((int(b) + int(n) for b, n in memslots), default=0))
    return -(-top >> MAP_DIR_SHIFT)


def empty_state(vcpus: int, memslots, table_capacity: int, cfg: np.ndarray, map_capacity: int = 4) -> State:
    """A VM with no tables yet: the control plane allocates the EPT root right after."""
    from sppjit.bits import VMCS_NFIELDS

    bases = np.array([b for b, _ in memslots], dtype=np.uint64)
    npages = np.array([n for _, n in memslots], dtype=np.uint64)
    entries = cache_entries(memslots, vcpus)
    scal = np.zeros(SC_LEN, dtype=np.int64)
    scal[SC_NVCPUS] = vcpus
    scal[SC_SHARED_SPPT_ROOT] = -1
    return State(
        tables=lazy_zeros((table_capacity, 512), np.uint64),
        table_kind=lazy_zeros(table_capacity, np.uint8),
        table_level=lazy_zeros(table_capacity, np.uint8),
        scal=scal,
        cfg=cfg,
        vmcs=np.zeros((vcpus, VMCS_NFIELDS), dtype=np.uint64),
        requests=np.zeros(vcpus, dtype=np.uint8),
        sppt_root=np.full(vcpus, -1, dtype=np.int64),
        slot_base=bases,
        slot_npages=npages,
        map_dir=np.full(map_dir_len(memslots), MAP_NONE, dtype=np.int64),
        map_nodes=np.full((map_capacity, 512), MAP_NONE, dtype=np.int64),
        map_blocks=np.full((map_capacity, 512), FULL_SPP_ACCESS, dtype=np.uint32),
        ept_cache=lazy_zeros(entries, np.int64),  # CACHE_INVALID
        sppt_cache=lazy_zeros((vcpus, entries), np.int64),
        write_view=empty_write_view(vcpus, entries),
    )


def stored_maps(st) -> tuple[np.ndarray, np.ndarray]:
    """Every stored map that is not FULL_SPP_ACCESS: (gfns ascending, maps), vectorised over the
    allocated blocks (what a protected region holds, not the guest's size)."""
    dirs = np.flatnonzero(st.map_dir >= 0)
    nodes = st.map_nodes[st.map_dir[dirs]]
    di, ri = np.nonzero(nodes >= 0)
    blocks = st.map_blocks[nodes[di, ri]]
    bi, gi = np.nonzero(blocks != np.uint32(FULL_SPP_ACCESS))
    gfns = ((dirs[di[bi]].astype(np.uint64) << np.uint64(MAP_DIR_SHIFT))
            | (ri[bi].astype(np.uint64) << np.uint64(9)) | gi.astype(np.uint64))
    order = np.argsort(gfns, kind="stable")
    return gfns[order], blocks[bi, gi][order]


def stored_map(st, gfn: int) -> int:
    """The stored map of one gfn (FULL_SPP_ACCESS where no block exists), in Python."""
    d = gfn >> MAP_DIR_SHIFT
    if not 0 <= d < st.map_dir.shape[0] or st.map_dir[d] < 0:
        return FULL_SPP_ACCESS
    b = int(st.map_nodes[st.map_dir[d], (gfn >> 9) & 511])
    return FULL_SPP_ACCESS if b < 0 else int(st.map_blocks[b, gfn & 511])


# Replay counters (int64 array, one per replay; summed over batches).
CT_ACCESSES = 0
CT_KIND = 1  # + access kind: reads, writes, fetches
CT_OUTCOME = 4  # + outcome code (5 outcomes)
CT_EXITS = 9
CT_EXIT_KIND = 10  # + exit kind (7 kinds)
CT_LEN = 17

# The exit log: preallocated columns the kernels append to; ExitLog.n[0] rows are filled.
ExitLog = namedtuple("ExitLog", ["row", "vcpu", "gpa", "reason", "qual", "kind", "user", "insn_len", "n"])


def empty_exit_log(capacity: int) -> ExitLog:
    """An exit log with room for ``capacity`` rows.

    np.empty: only rows below ``n`` are ever read, and np.zeros is not free. Where the
    allocator recycles freed memory, zeroing means writing every page of the log, faulting
    each back in when it had been handed back to the system (on the development VM, a shard's
    32 MiB log took 0.1-0.2 s that way in one run in three). np.empty writes nothing: a log
    costs the rows written into it."""
    return ExitLog(
        row=np.empty(capacity, dtype=np.int64),
        vcpu=np.empty(capacity, dtype=np.uint16),
        gpa=np.empty(capacity, dtype=np.uint64),
        reason=np.empty(capacity, dtype=np.uint16),
        qual=np.empty(capacity, dtype=np.uint64),
        kind=np.empty(capacity, dtype=np.uint8),
        user=np.empty(capacity, dtype=np.uint16),
        insn_len=np.empty(capacity, dtype=np.uint8),
        n=np.zeros(1, dtype=np.int64),
    )
