"""The layout of a VM's state: plain numpy arrays, bundled in one namedtuple for the kernels.

Everything a VM is lives in these arrays (no Python objects, no globals), so a state can be
saved with numpy, shipped to a worker, and handed to any kernel. Sizes that grow (the table
pool) are replaced by the control plane between kernel calls; kernels never reallocate.
"""

from collections import namedtuple

import numpy as np

# Indices into State.scal (int64): the scalar part of the state.
SC_NTABLES = 0  # table-pool entries in use
SC_EPT_ROOT = 1  # pool index of the EPT level-4 table
SC_SPP_ACTIVE = 2  # kvm->arch.spp_active (page mode: write tracking active)
SC_NVCPUS = 3
SC_REMAP_NEXT = 4  # next host page handed out by a remap (hpa REMAP_HPA + 4096 * it)
SC_MMIO_PAGES = 5  # MMIO entries KVM installed (first access to a gfn with no memslot)
SC_TLB_FLUSHES = 6  # served LOAD_CR3 requests + set/zap/remap/delete calls that changed state
SC_SHARED_SPPT_ROOT = 7  # v12: pool index of the shared SPPT root (kvm->arch.sppt_root), -1 before enable
SC_LEN = 8

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

# Region caches: -1 means "walk the tables"; see kernels/replay.py.
CACHE_INVALID = -1

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
        "slot_map_off",  # int64[slots]: offset of the slot's access maps in `maps`
        "maps",  # uint32[sum npages]: KVM's subpage_wp_info, FULL_SPP_ACCESS = unprotected
        "ept_cache",  # int64[regions]: per 2 MiB region, the table holding its EPT leaves
        "sppt_cache",  # int64[vcpus, regions]: per vCPU and region, the SPPT level-1 table
    ],
)


# The region caches cover guest-physical space up to the top memslot, at most 8 TiB (4 Mi
# regions, 32 MiB per cache row); accesses above fall back to full walks.
MAX_CACHE_REGIONS = 1 << 22


def cache_regions(memslots) -> int:
    from sppjit.bits import PAGES_PER_2M

    top = int(max((b + n for b, n in memslots), default=0))
    return min(-(-top // PAGES_PER_2M), MAX_CACHE_REGIONS)


def empty_state(vcpus: int, memslots, table_capacity: int, cfg: np.ndarray) -> State:
    """A VM with no tables yet: the control plane allocates the EPT root right after."""
    from sppjit.bits import VMCS_NFIELDS

    bases = np.array([b for b, _ in memslots], dtype=np.uint64)
    npages = np.array([n for _, n in memslots], dtype=np.uint64)
    offs = np.zeros(len(memslots), dtype=np.int64)
    if len(memslots) > 1:
        offs[1:] = np.cumsum(npages[:-1].astype(np.int64))
    regions = cache_regions(memslots)
    scal = np.zeros(SC_LEN, dtype=np.int64)
    scal[SC_NVCPUS] = vcpus
    scal[SC_SHARED_SPPT_ROOT] = -1
    return State(
        tables=np.zeros((table_capacity, 512), dtype=np.uint64),
        table_kind=np.zeros(table_capacity, dtype=np.uint8),
        table_level=np.zeros(table_capacity, dtype=np.uint8),
        scal=scal,
        cfg=cfg,
        vmcs=np.zeros((vcpus, VMCS_NFIELDS), dtype=np.uint64),
        requests=np.zeros(vcpus, dtype=np.uint8),
        sppt_root=np.full(vcpus, -1, dtype=np.int64),
        slot_base=bases,
        slot_npages=npages,
        slot_map_off=offs,
        maps=np.full(int(npages.sum()), 0xFFFFFFFF, dtype=np.uint32),
        ept_cache=np.full(regions, CACHE_INVALID, dtype=np.int64),
        sppt_cache=np.full((vcpus, regions), CACHE_INVALID, dtype=np.int64),
    )

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
    return ExitLog(
        row=np.zeros(capacity, dtype=np.int64),
        vcpu=np.zeros(capacity, dtype=np.uint16),
        gpa=np.zeros(capacity, dtype=np.uint64),
        reason=np.zeros(capacity, dtype=np.uint16),
        qual=np.zeros(capacity, dtype=np.uint64),
        kind=np.zeros(capacity, dtype=np.uint8),
        user=np.zeros(capacity, dtype=np.uint16),
        insn_len=np.zeros(capacity, dtype=np.uint8),
        n=np.zeros(1, dtype=np.int64),
    )
