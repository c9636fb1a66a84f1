"""The VM and its KVM control plane: init/set/get SPP, the ioctl entry point, vCPUs and VMCS,
and the host-side timeline operations (zap, remap, delete_memslot, apply).

A ``VM`` owns a kernels.layout.State (plain arrays) and serialises every change to it with
KVM's two locks: ``slots_lock`` (a mutex, outside) and ``mmu_lock`` (inside). The rules that
change tables live once, compiled, in kernels.mmu; this module validates, takes the locks,
makes room in the table pool, and turns kernel return values into errno.

Profiles: ``v4`` (the seed series) and ``v12`` (its last posting). The control-plane half of
their differences is here (``init_spp`` -> ``_kvm_init_spp`` for v4's KVM_INIT_SPP or
``_spp_init`` for v12's KVM_ENABLE_CAP(KVM_CAP_X86_SPP), ``page_limit``, the npages rules of
``_check_range``) and in sppjit.abi (the uAPI structs); the MMU half is the "v4 / v12 seam"
section of kernels/mmu.py.
"""

from __future__ import annotations

import operator
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from . import bits as B
from .defaults import (
    DEFAULT_GRANULARITY,
    DEFAULT_MEMORY,
    DEFAULT_PROFILE,
    DEFAULT_SUBPAGE_CHECK,
    DEFAULT_VCPUS,
    GRANULARITIES,
    MAX_VCPUS,
    PROFILES,
    SUBPAGE_CHECKS,
    TIMELINE_OPS,
)
from .errors import InputError, SppError
from .kernels import layout as L
from .kernels import mmu as K

DEFAULT_TABLE_CAPACITY = 1024
# The pool starts with room for the EPT tables that map every memslot at 4 KiB (one level-1
# table per 2 MiB, plus the levels above), so a guest touching all its memory never waits for
# the pool to be copied. L.lazy_zeros only reserves the memory: pages count once a table is used.
MAX_INITIAL_TABLES = 1 << 16  # 256 MiB reserved at most


def initial_table_capacity(memslots) -> int:
    ept = sum(-(-int(n) // B.PAGES_PER_2M) + 2 for _, n in memslots) + 2
    return min(max(DEFAULT_TABLE_CAPACITY, ept + 64), MAX_INITIAL_TABLES)



class SppQuirkWarning(UserWarning):
    """A behaviour of the modelled KVM series that sppjit reproduces although it is a bug of the
    posting (v12: freeing any memslot clears spp_active for the whole VM)."""


def _choice(name: str, value: str, allowed: Sequence[str]) -> int:
    if value not in allowed:
        raise InputError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    return allowed.index(value)


def _parse_memslots(memory, memslots) -> list[tuple[int, int]]:
    from .io.sizes import parse_size

    if memslots is not None:
        slots = [(int(b), int(n)) for b, n in memslots]
    else:
        size = parse_size(memory, name="memory")
        slots = [(0, size // B.PAGE_SIZE)]
    if not slots:
        raise InputError("the VM needs at least one memslot")
    for i, (base, npages) in enumerate(slots):
        if npages <= 0 or base < 0:
            raise InputError(f"memslot {i}: base_gfn must be >= 0 and npages > 0")
        if (base + npages) << B.PAGE_SHIFT > 1 << B.GPA_BITS:
            raise InputError(f"memslot {i} ends beyond the 48-bit guest-physical space")
    ordered = sorted(range(len(slots)), key=lambda i: slots[i][0])
    for a, b in zip(ordered, ordered[1:]):
        if slots[a][0] + slots[a][1] > slots[b][0]:
            raise InputError(f"memslots {a} and {b} overlap")
    return slots


def _integral(value) -> int | None:
    """``value`` as a Python int when it is an integer (or a float with an integral value),
    None when it is not (1.5, nan, "3", None): the kernel's fields are integers."""
    try:
        return operator.index(value)
    except TypeError:
        pass
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


def _u64_field(value, name: str) -> int:
    """A gfn or npages argument of the control plane: an integer a u64 field can carry, else
    EINVAL (an npages that large is refused by the page limit anyway)."""
    v = _integral(value)
    if v is None or not 0 <= v < 1 << 64:
        raise SppError(B.EINVAL, f"{name} must be an integer 0..2**64-1, not {value!r}")
    return v


def _u64_gfns(gfns) -> np.ndarray:
    """gfns as uint64; InputError for anything but a 1-D sequence of integers 0..2**64-1 (a
    gfn of 16.5 is refused, not read as 16)."""
    try:
        arr = np.asarray(gfns)
    except (TypeError, ValueError):
        raise InputError("gfns must be a sequence of integers") from None
    if arr.ndim != 1:
        raise InputError("gfns must be a sequence of integers")
    if arr.dtype.kind not in "iu":
        values = [_integral(g) for g in arr.tolist()]
        if any(v is None or not 0 <= v < 1 << 64 for v in values):
            raise InputError("gfns must be a sequence of integers 0..2**64-1")
        return np.array(values, dtype=np.uint64)
    if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
        raise InputError("gfns must be a sequence of integers 0..2**64-1")
    return arr.astype(np.uint64)


def _u32_maps(maps) -> np.ndarray:
    """Access maps as uint32; InputError for anything that is not a 1-D sequence of u32
    integers (no silent truncation of 1.5, -1 or 2**32)."""
    try:
        arr = np.asarray(maps)
    except (TypeError, ValueError):
        raise InputError("maps must be a sequence of u32 values") from None
    if arr.ndim != 1:
        raise InputError("maps must be a sequence of u32 values")
    if arr.dtype.kind not in "biuf":  # Python ints beyond int64, strings, None, mixtures
        values = [_integral(m) for m in arr.tolist()]
        if any(v is None or not 0 <= v <= 0xFFFFFFFF for v in values):
            raise InputError("maps must be a sequence of u32 integers")
        return np.array(values, dtype=np.uint32)
    if arr.dtype.kind == "f":
        if not (np.isfinite(arr).all() and (np.floor(arr) == arr).all()):
            raise InputError("maps must be a sequence of u32 integers (not fractions)")
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise InputError("maps must be a sequence of u32 values")
    return arr.astype(np.uint32)


def _maps_for_pages(npages):
    """Map nodes and blocks one set call of ``npages`` gfns may allocate: the regions npages
    gfns from any base reach (an int, or an array of them)."""
    return npages // B.PAGES_PER_2M + 2


def _protection_runs(gfns: np.ndarray, maps: np.ndarray, max_pages: int):
    """(gfn, map) pairs as the set_subpages calls VM.protect makes, vectorised: the pairs
    sorted by gfn, and per call its base gfn, its first pair and its page count
    (runs of consecutive gfns, cut every ``max_pages``). The same calls as
    sppjit.io.protect.runs, and the same InputError for a gfn given twice."""
    if gfns.shape != maps.shape:
        raise ValueError("gfns and values must be 1-D arrays of the same length")
    if not gfns.size:
        none = np.zeros(0, np.int64)
        return gfns, maps, gfns, none, none
    if gfns.size > 1 and (gfns[1:] > gfns[:-1]).all():
        order = None  # already ascending (the common case: no sort, no copy)
    else:
        # Distinct gfns have one ascending order: quicksort (4x faster than a stable sort)
        # gives it; a duplicate is reported from the stable order, as io.protect.runs does.
        raw = gfns
        order = np.argsort(raw)
        gfns, maps = raw[order], maps[order]
    steps = gfns[1:] - gfns[:-1]
    if order is not None and (steps == 0).any():
        order = np.argsort(raw, kind="stable")
        gfns = raw[order]
        at = int(np.argmax(gfns[1:] == gfns[:-1]))
        first, second = sorted((int(order[at]), int(order[at + 1])))
        raise InputError(f"protection: gfn {int(gfns[at]):#x} is given twice "
                         f"(rows {first} and {second})")
    # Runs of consecutive gfns: [begin, end) per run; each cut into calls of max_pages.
    begins = np.concatenate(([0], np.flatnonzero(steps != 1) + 1))
    ends = np.append(begins[1:], gfns.size)
    calls = -(-(ends - begins) // max_pages)
    run_offset = np.repeat(begins, calls) + max_pages * (np.arange(int(calls.sum())) - np.repeat(
        np.cumsum(calls) - calls, calls))
    run_len = np.minimum(np.repeat(ends, calls) - run_offset, max_pages)
    run_offset = run_offset.astype(np.int64)
    return gfns, maps, gfns[run_offset], run_offset, run_len.astype(np.int64)


@dataclass(frozen=True)
class VmConfig:
    """Every setting that shapes a VM's behaviour (recorded in each summary)."""

    memslots: tuple[tuple[int, int], ...]
    vcpus: int
    profile: str
    hugepages: bool
    subpage_check: str
    granularity: str
    spp_supported: bool
    nested: bool

    def as_dict(self) -> dict:
        return {
            "memslots": [{"slot": i, "base_gfn": b, "npages": n} for i, (b, n) in enumerate(self.memslots)],
            "memory_bytes": sum(n for _, n in self.memslots) * B.PAGE_SIZE,
            "vcpus": self.vcpus,
            "profile": self.profile,
            "hugepages": self.hugepages,
            "subpage_check": self.subpage_check,
            "granularity": self.granularity,
            "spp_supported": self.spp_supported,
            "nested": self.nested,
        }


class Vmcs:
    """One vCPU's VMCS, read and written by field encoding (bits.VMCS_FIELDS)."""

    def __init__(self, vm: VM, index: int):
        self._vm = vm
        self._index = index

    @staticmethod
    def _column(field: int) -> int:
        try:
            return B.VMCS_FIELDS.index(field)
        except ValueError:
            raise InputError(f"VMCS field {field:#x} is not modelled by sppjit") from None

    def read(self, field: int) -> int:
        if field == B.SPPT_POINTER_HIGH:
            return int(self._vm.state.vmcs[self._index, B.VMCS_COL_SPPTP]) >> 32
        return int(self._vm.state.vmcs[self._index, self._column(field)])

    def write(self, field: int, value: int) -> None:
        """Write a field as a hypervisor would; the next VM entry of this vCPU re-checks it."""
        if field == B.EPT_POINTER:
            raise InputError("EPT_POINTER is managed by KVM's MMU and cannot be written")
        col = self._column(field)
        with self._vm.mmu_lock:
            self._vm.state.vmcs[self._index, col] = np.uint64(value & 0xFFFFFFFFFFFFFFFF)
            self._vm.state.requests[self._index] |= L.REQ_ENTRY_CHECK
            self._vm.invalidate_caches()

    def as_dict(self) -> dict[str, int]:
        return {B.VMCS_FIELD_NAMES[f]: self.read(f) for f in B.VMCS_FIELDS}


class Vcpu:
    def __init__(self, vm: VM, index: int):
        self.index = index
        self.vmcs = Vmcs(vm, index)
        self._vm = vm

    @property
    def requests(self) -> int:
        return int(self._vm.state.requests[self.index])

    @property
    def sppt_root(self) -> int | None:
        """mmu->sppt_root as a host-physical address, None while INVALID_PAGE."""
        idx = int(self._vm.state.sppt_root[self.index])
        return None if idx < 0 else B.TABLE_POOL_HPA + idx * B.PAGE_SIZE


class VM:
    """A simulated KVM guest with EPT and SPP (profile v4 or v12) or the page-granular baseline."""

    def __init__(
        self,
        memory: str | int = DEFAULT_MEMORY,
        vcpus: int = DEFAULT_VCPUS,
        profile: str = DEFAULT_PROFILE,
        hugepages: bool = False,
        subpage_check: str = DEFAULT_SUBPAGE_CHECK,
        granularity: str = DEFAULT_GRANULARITY,
        spp_supported: bool = True,
        nested: bool = False,
        memslots: Iterable[tuple[int, int]] | None = None,
        table_capacity: int | None = None,
    ):
        if not 1 <= int(vcpus) <= MAX_VCPUS:
            raise InputError(f"vcpus must be 1..{MAX_VCPUS}, not {vcpus}")
        cfg = np.zeros(L.CF_LEN, dtype=np.int64)
        cfg[L.CF_PROFILE] = _choice("profile", profile, PROFILES)
        cfg[L.CF_GRANULARITY] = _choice("granularity", granularity, GRANULARITIES)
        cfg[L.CF_SUBPAGE_CHECK] = _choice("subpage_check", subpage_check, SUBPAGE_CHECKS)
        cfg[L.CF_HUGEPAGES] = int(bool(hugepages))
        cfg[L.CF_SPP_SUPPORTED] = int(bool(spp_supported))
        cfg[L.CF_NESTED] = int(bool(nested))
        slots = _parse_memslots(memory, memslots)
        self.config = VmConfig(
            memslots=tuple(slots),
            vcpus=int(vcpus),
            profile=profile,
            hugepages=bool(hugepages),
            subpage_check=subpage_check,
            granularity=granularity,
            spp_supported=bool(spp_supported),
            nested=bool(nested),
        )
        self.slots_lock = threading.Lock()  # kvm->slots_lock (a mutex)
        self.mmu_lock = threading.RLock()  # kvm->mmu_lock
        if table_capacity is None:
            table_capacity = initial_table_capacity(slots)
        elif not 1 <= int(table_capacity) <= MAX_INITIAL_TABLES:
            raise InputError(f"table_capacity must be 1..{MAX_INITIAL_TABLES}, not {table_capacity}")
        self.state = L.empty_state(int(vcpus), slots, int(table_capacity), cfg)
        self._caches_clean = True  # empty_state's caches hold no walk
        self._view_foreign = False
        self._view_used = False  # no replay filled the view since it was last zeroed
        st = self.state
        root = K.alloc_table(st, L.TABLE_EPT, 4)
        st.scal[L.SC_EPT_ROOT] = root
        st.vmcs[:, B.VMCS_COL_PROC] = B.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS
        st.vmcs[:, B.VMCS_COL_SECONDARY] = B.SECONDARY_EXEC_ENABLE_EPT
        st.vmcs[:, B.VMCS_COL_EPTP] = B.construct_eptp(B.TABLE_POOL_HPA + root * B.PAGE_SIZE)
        self._vcpus = [Vcpu(self, i) for i in range(int(vcpus))]

    # ------------------------------------------------------------------ plumbing
    @property
    def state(self) -> L.State:
        return self._state

    @state.setter
    def state(self, value: L.State) -> None:
        # A state from elsewhere (grown pools, a loaded save) may hold cached walks, and a
        # write view that does not keep kernels.mmu's rules.
        self._state = value
        self._caches_clean = False
        self._view_foreign = True

    def caches_in_use(self) -> None:
        """Say that a replay kernel is about to run on this state: it may fill the region
        caches, so the next invalidate_caches must reset them (sppjit.replay calls this)."""
        self._caches_clean = False
        # The replay fills the write view only with SPP active in sub-page granularity
        # (kernels.replay), and only the control plane turns SPP on: otherwise the view stays
        # zero, and forget_write_view need not write it (a sharded segment forgets it first).
        if self.state.scal[L.SC_SPP_ACTIVE] and self.config.granularity == "spp":
            self._view_used = True

    @property
    def vcpus(self) -> int:
        return self.config.vcpus

    def vcpu(self, i: int) -> Vcpu:
        return self._vcpus[i]

    @property
    def spp_active(self) -> bool:
        return bool(self.state.scal[L.SC_SPP_ACTIVE])

    @property
    def is_v12(self) -> bool:
        return self.config.profile == "v12"

    @property
    def page_limit(self) -> int:
        """Pages one set/get call may carry (SUBPAGE_MAX_BITMAP 64 in v4, KVM_SUBPAGE_MAX_PAGES
        512 in v12)."""
        return B.KVM_SUBPAGE_MAX_PAGES if self.is_v12 else B.SUBPAGE_MAX_BITMAP

    def invalidate_caches(self) -> None:
        """Forget every cached walk (after any change made outside the replay kernels).

        Only the replay kernels fill the caches (hardware_check); every other kernel only
        resets entries. So when no replay ran since the last reset, and the state was not
        replaced, there is nothing to forget: a VM with 2**18-entry caches per vCPU would
        otherwise pay milliseconds of memset on every control-plane call."""
        if self._caches_clean:
            return
        self.forget_write_view()
        self.state.ept_cache.fill(L.CACHE_INVALID)
        self.state.sppt_cache.fill(L.CACHE_INVALID)
        self._caches_clean = True

    def forget_write_view(self) -> None:
        """Zero the write view (kernels.layout). Its rows are non-zero only under region-cache
        entries in use (kernels.mmu, rule 1), so only those are written: a VM's first replay
        touches the view's pages it needs, a reset touches no others. A state set from outside
        is zeroed whole, when it is not already (a loaded state's view is a fresh one: reading
        its untouched pages costs no memory, writing them would)."""
        st = self.state
        view = st.write_view
        if view.shape[1] == 0 or not (self._view_used or self._view_foreign):
            return
        self._view_used = False
        if self._view_foreign:
            if view.any():
                view.fill(0)
            self._view_foreign = False
            return
        used = np.flatnonzero(st.ept_cache != L.CACHE_INVALID)
        if used.size:
            view[:, used] = 0

    def ensure_tables(self, extra: int) -> None:
        """Grow the table pool so that ``extra`` more tables fit (indices, hence addresses, stay).

        Takes mmu_lock (re-entrant): a replay thread growing the pool must not copy it while
        another thread's set_subpages is allocating tables in it."""
        with self.mmu_lock:
            st = self.state
            used = int(st.scal[L.SC_NTABLES])
            cap = st.tables.shape[0]
            if cap - used >= extra:
                return
            new_cap = max(2 * cap, used + extra)
            if new_cap > L.MAX_TABLES:
                raise MemoryError(f"the table pool would exceed {L.MAX_TABLES} tables")
            tables = L.lazy_zeros((new_cap, B.PT_ENTRIES), np.uint64)
            tables[:used] = st.tables[:used]
            kind = L.lazy_zeros(new_cap, np.uint8)
            kind[:used] = st.table_kind[:used]
            level = L.lazy_zeros(new_cap, np.uint8)
            level[:used] = st.table_level[:used]
            self._state = st._replace(tables=tables, table_kind=kind, table_level=level)  # same caches

    def ensure_maps(self, extra: int) -> None:
        """Grow the access-map pools so that ``extra`` more nodes and blocks fit (their indices
        stay). Under mmu_lock, as ensure_tables."""
        with self.mmu_lock:
            st = self.state
            grown = {}
            for name, counter, fill in (("map_nodes", L.SC_MAP_NODES, L.MAP_NONE),
                                        ("map_blocks", L.SC_MAP_BLOCKS, B.FULL_SPP_ACCESS)):
                pool = getattr(st, name)
                used = int(st.scal[counter])
                if pool.shape[0] - used >= extra:
                    continue
                bigger = np.full((max(2 * pool.shape[0], used + extra), pool.shape[1]), fill, dtype=pool.dtype)
                bigger[:used] = pool[:used]
                grown[name] = bigger
            if grown:
                self._state = st._replace(**grown)  # same caches

    def _tables_for_pages(self, npages: int) -> int:
        if self.is_v12:
            return 0  # v12 set never builds tables: it flushes, stores, marks and zaps
        return npages * (3 + 3 * self.vcpus) + 8

    def memslot_of(self, gfn: int) -> int:
        return int(K.memslot_of(self.state, np.uint64(gfn)))

    # ------------------------------------------------------------------ SPP control plane
    def _kvm_init_spp(self) -> int:
        """kvm_mmu_init_spp: 0, or -ENODEV without hardware support."""
        if not self.config.spp_supported:
            return -B.ENODEV

        def per_vcpu_roots():  # v4: each vCPU its own SPPT root
            self.ensure_tables(self.vcpus)
            st = self.state
            for v in range(self.vcpus):
                st.sppt_root[v] = K.alloc_table(st, L.TABLE_SPPT, 4)
                st.requests[v] |= L.REQ_LOAD_CR3

        return self._activate_spp(per_vcpu_roots)

    def _activate_spp(self, make_roots) -> int:
        """What both profiles' init does under the locks: 0 if SPP is already active; else
        fresh FULL maps, the profile's SPPT roots (``make_roots``; none in page granularity),
        spp_active set. Returns 0."""
        with self.slots_lock, self.mmu_lock:
            st = self.state
            if st.scal[L.SC_SPP_ACTIVE]:
                return 0
            st.map_dir.fill(L.MAP_NONE)  # every map FULL: no block anywhere
            st.scal[L.SC_MAP_NODES] = 0
            st.scal[L.SC_MAP_BLOCKS] = 0
            if self.config.granularity == "spp":
                make_roots()  # may grow the table pool: self.state is re-read below
            self.state.scal[L.SC_SPP_ACTIVE] = 1
            self.invalidate_caches()
        return 0

    def _spp_init(self) -> int:
        """v12 spp_init (KVM_ENABLE_CAP(KVM_CAP_X86_SPP)): -EPERM when nested virtualisation is
        on, -ENODEV without SPP, 0 if already active; else fresh maps, ONE shared SPPT root that
        every vCPU's mmu->sppt_root points at, and KVM_REQ_LOAD_MMU_PGD on every vCPU (served
        at its next entry exactly as v4's KVM_REQ_LOAD_CR3: SPPTP, the control, a TLB flush).

        Enabling again after the memslot-free quirk switched SPP off allocates a new root (the
        maps start FULL again, so the old tree's vectors would be stale).
        """
        if self.config.nested:
            return -B.EPERM
        if not self.config.spp_supported:
            return -B.ENODEV

        def shared_root():  # v12: one SPPT root for every vCPU
            self.ensure_tables(1)
            st = self.state
            root = K.alloc_table(st, L.TABLE_SPPT, 4)
            st.scal[L.SC_SHARED_SPPT_ROOT] = root
            st.sppt_root[:] = root
            st.requests[:] |= L.REQ_LOAD_MMU_PGD

        return self._activate_spp(shared_root)

    def _kvm_check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: v12 answers KVM_SUBPAGE_MAX_PAGES (512) for KVM_CAP_X86_SPP when
        the CPU model has SPP (0 without it); v4 knows no such capability (0)."""
        if self.is_v12 and cap == B.KVM_CAP_X86_SPP and self.config.spp_supported:
            return B.KVM_SUBPAGE_MAX_PAGES
        return 0

    def _kvm_enable_cap(self, cap: int, flags: int = 0) -> int:
        """KVM_ENABLE_CAP on the VM fd: -EINVAL for flags != 0 or a capability the profile does
        not know (v4 has no KVM_CAP_X86_SPP), else spp_init's result."""
        if flags != 0 or not self.is_v12 or cap != B.KVM_CAP_X86_SPP:
            return -B.EINVAL
        return self._spp_init()

    def init_spp(self) -> int:
        """Switch SPP on the profile's way. Returns 0.

        v4: KVM_INIT_SPP (maps and an SPPT root per vCPU). v12: KVM_ENABLE_CAP(KVM_CAP_X86_SPP)
        (maps and one shared SPPT root). Raises SppError: ENODEV without SPP support, EPERM
        (v12) with nested virtualisation.
        """
        if self.is_v12:
            r = self._kvm_enable_cap(B.KVM_CAP_X86_SPP)
        else:
            r = self._kvm_init_spp()
        if r == -B.EPERM:
            raise SppError(B.EPERM, "enable SPP: refused while nested virtualisation is on (v12)")
        if r < 0:
            raise SppError(-r, "init_spp: the CPU model has no SPP")
        return r

    def _check_range(self, npages: int) -> bool:
        """The npages rules of the profile's ioctl; False for v12's "npages == 0 returns 0"."""
        if not self.spp_active:
            raise SppError(B.ENODEV, "SPP is not initialised (call init_spp first)")
        if self.is_v12:
            if npages > self.page_limit:
                raise SppError(B.EINVAL, f"npages must be 0..{self.page_limit}, not {npages}")
            return npages > 0
        if npages <= 0 or npages > self.page_limit:
            raise SppError(B.EINVAL, f"npages must be 1..{self.page_limit}, not {npages}")
        return True

    def _kvm_set_subpages(self, base_gfn: int, maps: np.ndarray) -> int:
        """The locked set; returns the pages applied (fewer on a gfn with no memslot)."""
        n = len(maps)
        with self.slots_lock, self.mmu_lock:
            self.ensure_tables(self._tables_for_pages(n))
            self.ensure_maps(_maps_for_pages(n))
            done = int(K.kvm_set_subpages(self.state, np.uint64(base_gfn), maps, n))
            if done:
                self.state.scal[L.SC_TLB_FLUSHES] += 1  # kvm_flush_remote_tlbs after the update
            self.invalidate_caches()
        return done

    def set_subpages(self, base_gfn: int, maps: Sequence[int] | np.ndarray) -> int:
        """KVM_SUBPAGES_SET_ACCESS: one u32 map per page from ``base_gfn``. Returns npages.

        Raises SppError: ENODEV before init, EINVAL for too many pages (v4: also for 0; v12
        returns 0 for 0 pages) or a base_gfn that is not an integer of the u64 field, EFAULT at
        the first gfn without a memslot (the pages before it stay applied, in both profiles).
        Maps that are not u32 integers (1.5, -1, 2**32) raise InputError: nothing is truncated.
        """
        arr = _u32_maps(maps)
        if not self._check_range(len(arr)):
            return 0
        gfn = _u64_field(base_gfn, "base_gfn")
        done = self._kvm_set_subpages(gfn, arr)
        if done < len(arr):
            raise SppError(B.EFAULT, f"gfn {gfn + done:#x} is in no memslot")
        return done

    def get_subpages(self, base_gfn: int, npages: int) -> np.ndarray:
        """KVM_SUBPAGES_GET_ACCESS: the stored maps of ``npages`` gfns as a uint32 array.

        Raises SppError: ENODEV before init, EINVAL for an npages out of the profile's range
        (negative, too many, v4: 0) or a base_gfn / npages that is not an integer (1.5: the
        kernel's fields are integers, and a value a C caller would have truncated is refused
        rather than guessed), EFAULT at the first gfn without a memslot."""
        if not self.spp_active:
            raise SppError(B.ENODEV, "SPP is not initialised (call init_spp first)")
        n = _u64_field(npages, "npages")
        gfn = _u64_field(base_gfn, "base_gfn")
        if not self._check_range(n):  # before anything is allocated for the answer
            return np.empty(0, dtype=np.uint32)
        out = np.empty(n, dtype=np.uint32)
        with self.slots_lock, self.mmu_lock:
            done = int(K.kvm_get_subpages(self.state, np.uint64(gfn), out, n))
        if done < n:
            raise SppError(B.EFAULT, f"gfn {gfn + done:#x} is in no memslot")
        return out

    def protect(self, gfns: np.ndarray, maps: np.ndarray) -> int:
        """Apply (gfn, map) pairs as init_spp plus set_subpages calls over runs of consecutive
        gfns of at most the profile's page limit. Returns the number of set calls.

        The calls are made in one kernel call (kernels.mmu.kvm_set_subpages_runs) with exactly
        the per-call effects, in order: each call's pages, its TLB flush, the pools grown
        where that call would grow them; on a gfn with no memslot, EFAULT with the pages
        before it applied. A gfn given twice is an InputError before anything is applied."""
        if not self.spp_active:
            self.init_spp()
        sorted_gfns, sorted_maps, run_gfn, run_offset, run_len = _protection_runs(
            _u64_gfns(gfns), _u32_maps(maps), self.page_limit)
        if not run_len.size:
            return 0
        need_tables = np.asarray(self._tables_for_pages(run_len), dtype=np.int64)
        if need_tables.ndim == 0:
            need_tables = np.full(run_len.size, need_tables, dtype=np.int64)
        need_maps = _maps_for_pages(run_len).astype(np.int64)
        with self.slots_lock, self.mmu_lock:
            j = 0
            try:
                while True:
                    status, j, done = K.kvm_set_subpages_runs(
                        self.state, run_gfn, run_offset, run_len, sorted_maps, need_tables, need_maps, np.int64(j))
                    if status == K.RUNS_NEED_ROOM:
                        self.ensure_tables(int(need_tables[j]))
                        self.ensure_maps(int(need_maps[j]))
                        continue
                    break
            finally:
                self.invalidate_caches()
        if status == K.RUNS_EFAULT:
            raise SppError(B.EFAULT, f"gfn {int(run_gfn[j]) + int(done):#x} is in no memslot")
        return int(run_len.size)

    # ------------------------------------------------------------------ host-side timeline operations
    @staticmethod
    def _range(gfn, npages, op: str) -> tuple[int, int]:
        try:
            g, n = operator.index(gfn), operator.index(npages)
        except TypeError:
            raise InputError(f"{op}: gfn and npages must be integers, not {gfn!r} and {npages!r}") from None
        if g < 0 or n < 1:
            raise InputError(f"{op}: gfn must be >= 0 and npages >= 1 (gfn {g}, npages {n})")
        if (g + n) << B.PAGE_SHIFT > 1 << B.GPA_BITS:
            raise InputError(f"{op}: gfns {g:#x}..{g + n - 1:#x} go beyond the 48-bit guest-physical space")
        return g, n

    def zap(self, gfn: int, npages: int = 1) -> int:
        """MMU-notifier invalidate of ``npages`` gfns from ``gfn``: their EPT leaves go (a huge
        leaf covering any of them whole, MMIO entries too); the SPPT and the stored maps stay.
        The next access faults and the lazy path re-applies protection from the maps.
        Returns the EPT entries removed (a TLB flush is counted when that is not 0)."""
        g, n = self._range(gfn, npages, "zap")
        return self._mmu_notifier(K.kvm_zap_range, g, n)

    def remap(self, gfn: int, npages: int = 1) -> int:
        """MMU-notifier change_pte over ``npages`` gfns from ``gfn``: every mapped 4 KiB gfn gets
        a new host page, write-protected, with bit 61 back when its map != FULL (granularity
        spp, SPP active); a huge leaf touched is zapped; MMIO entries stay. A later write to
        an unprotected remapped page takes one wp_fault exit that sets W again.
        Returns the EPT entries changed (a TLB flush is counted when that is not 0)."""
        g, n = self._range(gfn, npages, "remap")
        return self._mmu_notifier(K.kvm_remap_range, g, n)

    def _mmu_notifier(self, kernel, gfn: int, npages: int) -> int:
        """Run an MMU-notifier kernel over a gfn range under KVM's locks; a TLB flush is
        counted when it changed any entry. Returns the entries changed."""
        with self.slots_lock, self.mmu_lock:
            changed = int(kernel(self.state, np.uint64(gfn), np.int64(npages)))
            if changed:
                self.state.scal[L.SC_TLB_FLUSHES] += 1
            self.invalidate_caches()
        return changed

    def delete_memslot(self, gfn: int) -> int:
        """Delete the memslot holding ``gfn``: its EPT leaves are zapped, its maps freed, and its
        gfns are MMIO from now on. In profile v12 (granularity spp) this also clears
        spp_active for the whole VM, a quirk of the posting that sppjit reproduces and warns
        about (SppQuirkWarning). Returns the deleted slot's index."""
        g, _ = self._range(gfn, 1, "delete_memslot")
        with self.slots_lock, self.mmu_lock:
            slot = int(K.memslot_of(self.state, np.uint64(g)))
            if slot < 0:
                raise InputError(f"delete_memslot: gfn {g:#x} is in no memslot")
            changed, quirk = K.kvm_delete_memslot(self.state, np.int64(slot))
            if changed:
                self.state.scal[L.SC_TLB_FLUSHES] += 1
            self.invalidate_caches()
        if quirk:
            warnings.warn(
                f"profile v12: deleting memslot {slot} cleared spp_active for the whole VM "
                "(kvm_spp_free_memslot); SPP calls now fail with ENODEV until SPP is enabled again",
                SppQuirkWarning,
                stacklevel=2,
            )
        return slot

    def apply(self, op: dict):
        """Apply one timeline operation (docs/contract.md §4): a mapping with ``op`` one of
        set_subpages, zap, remap, delete_memslot; ``gfn``; ``npages`` (default 1; ignored by
        delete_memslot); ``access`` (set_subpages: the u32 map of every page of the range,
        applied in calls of at most page_limit pages). SPP must be on for set_subpages (no
        implicit init: v12's memslot quirk must be able to make it fail with ENODEV).

        Returns what the method returns (set_subpages: the pages applied).
        """
        try:
            name = op["op"]
        except (TypeError, KeyError):
            raise InputError(f"a timeline operation needs an 'op' key, not {op!r}") from None
        if name not in TIMELINE_OPS:
            raise InputError(f"unknown timeline operation {name!r} (one of {', '.join(TIMELINE_OPS)})")
        if "gfn" not in op:
            raise InputError(f"{name}: the operation needs a 'gfn'")
        gfn = op["gfn"]
        if name == "delete_memslot":
            return self.delete_memslot(gfn)
        g, n = self._range(gfn, op.get("npages", 1), name)
        if name == "zap":
            return self.zap(g, n)
        if name == "remap":
            return self.remap(g, n)
        access = op.get("access")
        try:
            access = operator.index(access)
        except TypeError:
            raise InputError(f"set_subpages: 'access' must be a u32 integer, not {access!r}") from None
        if not 0 <= access <= 0xFFFFFFFF:
            raise InputError(f"set_subpages: 'access' must be a u32, not {access:#x}")
        done = 0
        limit = self.page_limit
        for start in range(0, n, limit):
            count = min(limit, n - start)
            done += self.set_subpages(g + start, np.full(count, access, dtype=np.uint32))
        return done

    # ------------------------------------------------------------------ raw access (tests, hvmi)
    def poke_sppt(self, gpa: int, level: int, value: int, vcpu: int = 0) -> None:
        """Write one raw SPPT entry of ``vcpu``'s tree on ``gpa``'s path (the path must exist).

        hvmi's IntSetSPPPageProtection writes raw leaves this way; with reserved bits it is how
        misconfigurations are made. A non-leaf value must keep pointing at a table.
        """
        with self.mmu_lock:
            st = self.state
            t = int(st.sppt_root[vcpu])
            if t < 0:
                raise InputError("SPP is not initialised")
            for lvl in range(4, level, -1):
                e = int(st.tables[t, B.level_index(gpa, lvl)])
                if not e & B.SPPT_PRESENT_MASK:
                    raise InputError(f"no SPPT level-{lvl - 1} table on the path of {gpa:#x}")
                t = (e & B.PT64_BASE_ADDR_MASK & ~B.EPT_ADDR_RESERVED_MASK) - B.TABLE_POOL_HPA >> B.PAGE_SHIFT
            if level > 1 and value & B.SPPT_PRESENT_MASK:
                target = (value & B.PT64_BASE_ADDR_MASK & ~B.EPT_ADDR_RESERVED_MASK) - B.TABLE_POOL_HPA >> B.PAGE_SHIFT
                if not 0 <= target < st.scal[L.SC_NTABLES] or st.table_kind[target] != L.TABLE_SPPT:
                    raise InputError("a present non-leaf SPPT entry must point at an SPPT table")
            st.tables[t, B.level_index(gpa, level)] = np.uint64(value)
            self.invalidate_caches()

    def poke_ept_leaf(self, gpa: int, value: int) -> None:
        """Overwrite the present EPT leaf that maps ``gpa`` (tests: W=1 with bit 61 and the like)."""
        with self.mmu_lock:
            t, i, level = K.ept_leaf(self.state, np.uint64(gpa >> B.PAGE_SHIFT))
            if level == 0:
                raise InputError(f"{gpa:#x} is not mapped by a present EPT leaf")
            self.state.tables[t, i] = np.uint64(value)
            self.invalidate_caches()

    # ------------------------------------------------------------------ ioctl ABI
    def ioctl(self, request: int, arg=None) -> int:
        """The VM-fd ioctls of the series, kernel style: a count or 0 on success, -errno else."""
        from .abi import vm_ioctl

        return vm_ioctl(self, request, arg)

    # ------------------------------------------------------------------ replay and inspection
    def __repr__(self) -> str:
        """What the VM is and holds: its settings, its memory, SPP on or off, pages protected."""
        from .io.sizes import format_size

        c = self.config
        slots = len(c.memslots)
        memory = format_size(sum(n for _, n in c.memslots) * B.PAGE_SIZE)
        extras = [name for name, on in (("hugepages", c.hugepages), ("nested", c.nested),
                                        ("no SPP support", not c.spp_supported)) if on]
        with self.mmu_lock:
            protected = int(L.stored_maps(self.state)[0].shape[0]) if self.spp_active else None
        if protected is not None:
            spp = f"SPP active, {protected:,} page{'s' if protected != 1 else ''} protected"
        else:
            spp = "SPP off"
        return (f"<VM profile {c.profile}, granularity {c.granularity}, subpage_check "
                f"{c.subpage_check}, {memory} in {slots} memslot{'s' if slots != 1 else ''}, "
                f"{c.vcpus} vCPU{'s' if c.vcpus != 1 else ''}"
                + "".join(f", {e}" for e in extras) + f"; {spp}>")

    def replay(self, trace, engine: str = "jit", **kwargs):
        """Replay a trace on this VM's state; returns a sppjit.replay.ReplayResult."""
        from .replay import replay

        return replay(self, trace, engine=engine, **kwargs)

    def replay_batches(self, source, engine: str = "jit", **kwargs):
        """Replay a trace batch by batch (bounded memory): a sppjit.replay.ReplayStream of the
        result batches, with ``.exits`` and, once exhausted, ``.summary``. ``source`` is any
        trace open_trace reads (a path, a pyarrow Table, ParquetFile, Dataset or
        RecordBatchReader, a polars DataFrame, an iterable of record batches); a bad one
        fails here, not at the first batch."""
        from .replay import replay_batches

        return replay_batches(self, source, engine=engine, **kwargs)

    def walk(self, gpa: int, vcpu: int = 0) -> dict:
        """The EPT and SPPT entries on ``gpa``'s path as the hardware walks them, decoded."""
        from .walk import walk

        return walk(self, gpa, vcpu)
