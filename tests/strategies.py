"""Hypothesis strategies for sppjit's exactness tests: VMs, protections, raw pokes and traces.

A drawn ``Scenario`` is plain data (tuples of ints and strings), so hypothesis prints and
shrinks it well; ``Runner`` applies it to a VM through the public API only, and turns every
operation into the literal call it makes, which ``reproducer`` assembles into a stand-alone
Python snippet.

What is generated, and why:

- VMs (``vm_specs``): 1..3 memslots (at most 8192 pages in all) with gaps (sometimes none)
  between them, bases 512-aligned (so huge pages fit) or not, 1..8 vCPUs, huge pages on/off,
  subpage_check all/first, granularity spp/page, profile v4 (2/3) or v12 (1/3); sometimes a
  tiny initial table pool, so that the pool grows inside set_subpages calls and replays.
- An address space (``spaces``): a few *hot* RAM gfns (memslot edges, 2 MiB-region edges,
  pairs of neighbours) that the protections and most accesses aim at, so that pages repeat and
  protected pages are hit; MMIO gfns in the gaps, just above the last memslot, and far away
  (below 2**48 bytes, beyond the region caches); and a palette of access maps whose
  permission edges (offsets where writable and protected sub-pages meet) the accesses aim at.
- Operations between replays (``ops``): ``init`` (init_spp), ``set`` (set_subpages of 1..64
  pages inside one memslot, mostly covering a hot gfn: zero maps, FULL maps, random maps,
  palette maps, a few sub-pages cleared, runs of sub-pages cleared), host operations (zap,
  remap, delete_memslot), and raw pokes: clear a level-4/3/2 SPPT entry (SPPT miss), set an
  odd bit of a leaf vector or a reserved bit of a non-leaf entry (SPPT misconfiguration),
  write a raw even-bit vector, and rewrite an EPT leaf (``EPT_LEAF_POKES``). A poke goes to
  the first of its candidate hot gfns whose SPPT path / EPT leaf exists (found by walking the
  tables the way poke_sppt does, from the vCPU's SPPT root); with none, it is skipped on both
  VMs alike.
- Traces (``traces``): 1..300 reads, writes and fetches of 1..4096 bytes (crossing sub-pages
  and pages; often ending at or just past a permission edge), mostly at hot gfns, some
  anywhere in a memslot, some MMIO; vCPU 0 more often than the others.
- Timelines (``timelines``): 0..3 set_subpages / zap / remap / delete_memslot operations
  applied in the middle of a replay (replay(ops=...)), at rows 0..len(trace).
- A scenario (``scenarios``) is a VM plus 1..3 phases; each phase applies its operations,
  then replays its trace (with its timeline) on the state the previous phase left.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from sppjit import bits as B
from sppjit.errors import InputError, SppError, VmEntryError
from sppjit.kernels import layout as L

# How the property tests run (tests/test_equivalence.py, tests/test_fast_check.py):
# SPPJIT_HYPOTHESIS_EXAMPLES examples per test (default 60), on a fixed example sequence
# unless SPPJIT_HYPOTHESIS_RANDOM=1 asks for new examples.
EXAMPLES = int(os.environ.get("SPPJIT_HYPOTHESIS_EXAMPLES", "60"))
BIG_EXAMPLES = max(3, EXAMPLES // 10)  # big_scenarios: thousands of pages set, thousands of rows
DERANDOMIZE = os.environ.get("SPPJIT_HYPOTHESIS_RANDOM", "0") in ("0", "", "no", "false")
SETTINGS = dict(
    deadline=None,
    derandomize=DERANDOMIZE,
    database=None if DERANDOMIZE else settings.default.database,
    report_multiple_bugs=False,  # shrink one failure (scenarios are big: shrinking is slow)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

FULL = B.FULL_SPP_ACCESS
PAGES_PER_2M = 512
MAX_TOTAL_PAGES = 8192
GFN_TOP = (1 << B.GPA_BITS) >> B.PAGE_SHIFT  # first gfn beyond the 48-bit space
MAX_TRACE = 300


# ------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class VmSpec:
    memslots: tuple[tuple[int, int], ...]
    vcpus: int = 1
    hugepages: bool = False
    subpage_check: str = "all"
    granularity: str = "spp"
    table_capacity: int | None = None  # None: sppjit.vm.initial_table_capacity
    profile: str = "v4"

    def kwargs(self) -> dict:
        return dict(
            memslots=[tuple(s) for s in self.memslots],
            vcpus=self.vcpus,
            profile=self.profile,
            hugepages=self.hugepages,
            subpage_check=self.subpage_check,
            granularity=self.granularity,
        )

    def build(self):
        import sppjit.vm as vm_module

        return vm_module.VM(**self.kwargs(), table_capacity=self.table_capacity)

    def slot_of(self, gfn: int) -> int:
        for i, (base, n) in enumerate(self.memslots):
            if base <= gfn < base + n:
                return i
        return -1


@dataclass(frozen=True)
class Space:
    """Where a scenario's accesses and protections go."""

    memslots: tuple[tuple[int, int], ...]
    hot: tuple[int, ...]  # RAM gfns (inside memslots)
    mmio: tuple[int, ...]  # gfns in no memslot
    palette: tuple[int, ...] = (0,)  # access maps the protections mostly use
    edges: tuple[int, ...] = (0, 4096)  # in-page offsets where the palette's write permission changes


def map_edges(maps) -> tuple[int, ...]:
    """Byte offsets 128*i (1..31) where sub-page i-1 and i of some map differ, plus 0 and 4096."""
    edges = {0, B.PAGE_SIZE}
    for m in maps:
        edges |= {i * B.SUBPAGE_SIZE for i in range(1, B.SUBPAGES_PER_PAGE) if (m >> i & 1) != (m >> (i - 1) & 1)}
    return tuple(sorted(edges))


# Operations are tuples, first item the name:
#   ("init",)
#   ("set", base_gfn, maps)                        maps: tuple of u32
#   ("sppt_clear", gfns, vcpu, level)              level 4..2: SPPT miss on the next write
#   ("sppt_leaf_odd", gfns, vcpu, bit)             odd bit 1..63 of the leaf: misconfiguration
#   ("sppt_nonleaf_rsvd", gfns, vcpu, level, bit)  reserved bit of a level 4..2 entry
#   ("sppt_leaf", gfns, vcpu, access_map)          raw leaf = the vector of an access map
#   ("ept_leaf", gfns, how)                        how: a key of EPT_LEAF_POKES
#   ("zap", gfn, npages), ("remap", gfn, npages), ("delete_memslot", gfn)
# A poke's gfns are candidates: it goes to the first whose SPPT path / EPT leaf exists.
# A trace is a tuple of (gpa, size, vcpu, kind) rows.


@dataclass(frozen=True)
class Phase:
    ops: tuple = ()
    trace: tuple = ()
    batch_size: int = 1 << 20  # used by the batching test for one of the two runs
    timeline: tuple = ()  # (at, op, gfn, npages, access): replay(ops=...) in the middle of the trace

    def timeline_ops(self) -> list[dict]:
        out = []
        for at, op, gfn, npages, access in self.timeline:
            d = {"at": at, "op": op, "gfn": gfn, "npages": npages}
            if op == "set_subpages":
                d["access"] = access
            out.append(d)
        return out


@dataclass(frozen=True)
class Scenario:
    vm: VmSpec
    phases: tuple[Phase, ...] = field(default_factory=tuple)


def trace_arrays(rows) -> dict[str, np.ndarray]:
    """A trace as the dict of numpy columns sppjit reads."""
    rows = list(rows)
    return {
        "gpa": np.array([r[0] for r in rows], dtype=np.uint64),
        "size": np.array([r[1] for r in rows], dtype=np.uint16),
        "vcpu": np.array([r[2] for r in rows], dtype=np.uint16),
        "kind": np.array([r[3] for r in rows], dtype=np.uint8),
        # 0..15, derived from the access so shrinking stays as it was: both engines must
        # carry it into VM_EXIT_INSTRUCTION_LEN and the exit log alike.
        "insn_len": np.array([(r[0] ^ r[1]) % 16 for r in rows], dtype=np.uint8),
    }


# ------------------------------------------------------------------------------------ VMs
@st.composite
def memslot_layouts(draw) -> tuple[tuple[int, int], ...]:
    nslots = draw(st.integers(1, 3))
    cursor = draw(st.one_of(st.just(0), st.integers(0, 4096), st.integers(0, 1 << 18)))
    budget = MAX_TOTAL_PAGES
    slots = []
    for i in range(nslots):
        if draw(st.booleans()):
            cursor = -(-cursor // PAGES_PER_2M) * PAGES_PER_2M  # 2 MiB-aligned base
        left = budget - (nslots - i - 1)
        npages = draw(
            st.one_of(
                st.sampled_from([n for n in (1, 2, 511, 512, 513, 1024, 1536, 2048) if n <= left]),
                st.integers(1, left),
            )
        )
        slots.append((cursor, npages))
        budget -= npages
        gap = draw(st.one_of(st.just(0), st.integers(1, 16), st.integers(1, 4096)))
        cursor += npages + gap
    return tuple(slots)


@st.composite
def vm_specs(draw, max_vcpus: int = 8, profiles=("v4", "v4", "v12")) -> VmSpec:
    return VmSpec(
        memslots=draw(memslot_layouts()),
        vcpus=draw(st.integers(1, max_vcpus)),
        hugepages=draw(st.sampled_from([False, False, True])),
        subpage_check=draw(st.sampled_from(["all", "first"])),
        granularity=draw(st.sampled_from(["spp", "spp", "page"])),
        table_capacity=draw(st.one_of(st.none(), st.integers(1, 24))),
        profile=draw(st.sampled_from(profiles)),
    )


# ------------------------------------------------------------------------------------ space
@st.composite
def ram_gfns(draw, memslots) -> int:
    """A gfn inside a memslot, often at an edge (slot, 2 MiB region)."""
    base, n = draw(st.sampled_from(memslots))
    candidates = [base, base + n - 1, base + n // 2]
    for edge in range(-(-base // PAGES_PER_2M) * PAGES_PER_2M, base + n, PAGES_PER_2M):
        candidates += [edge - 1, edge]
        if len(candidates) > 12:
            break
    candidates = sorted({g for g in candidates if base <= g < base + n})
    return draw(st.one_of(st.sampled_from(candidates), st.integers(base, base + n - 1)))


@st.composite
def mmio_gfns(draw, memslots) -> int:
    """A gfn in no memslot: a gap, just above the top, or far away (beyond the caches)."""
    ordered = sorted(memslots)
    choices = []
    for (b0, n0), (b1, _) in zip(ordered, ordered[1:]):
        if b0 + n0 < b1:
            choices.append(st.integers(b0 + n0, b1 - 1))
    if ordered[0][0] > 0:
        choices.append(st.integers(0, ordered[0][0] - 1))
    top = ordered[-1][0] + ordered[-1][1]
    choices.append(st.integers(top, top + 1024))
    choices.append(st.integers(top, GFN_TOP - 2))
    return draw(st.one_of(*choices))


@st.composite
def spaces(draw, memslots) -> Space:
    hot = draw(st.lists(ram_gfns(memslots), min_size=1, max_size=4))
    if draw(st.booleans()):  # a pair of neighbours, so page-crossing accesses go protected->protected
        g = hot[0]
        nb = g + 1 if any(b <= g + 1 < b + n for b, n in memslots) else g - 1
        if any(b <= nb < b + n for b, n in memslots):
            hot.append(nb)
    mmio = draw(st.lists(mmio_gfns(memslots), min_size=0, max_size=3))
    palette = tuple(draw(st.lists(access_maps(), min_size=1, max_size=3)))
    return Space(memslots=memslots, hot=tuple(dict.fromkeys(hot)), mmio=tuple(dict.fromkeys(mmio)),
                 palette=palette, edges=map_edges(palette))


# ------------------------------------------------------------------------------------ protections
_W, _R, _X = B.VMX_EPT_WRITABLE_MASK, B.VMX_EPT_READABLE_MASK, B.VMX_EPT_EXECUTABLE_MASK
_MT = B.VMX_EPT_MT_MASK
# Raw rewrites of a present EPT leaf (hvmi-style pokes; each is one KVM or hardware corner).
EPT_LEAF_POKES = {
    "clear_w": lambda e: e & ~_W,  # a write takes wp_fault (FULL map) or a sub-page check
    "spp_clear_w": lambda e: (e & ~_W) | B.PT64_SPP_MASK,  # bit 61 with no SPPT leaf built
    "set_w": lambda e: e | _W,  # EPT allows the write: bit 61 is ignored
    "x_only": lambda e: (e & ~(_R | _W)) | _X,  # present, but reads and writes fault
    "not_present": lambda e: e & ~(_R | _W | _X),  # re-faulted by the next access
    "uc": lambda e: e & ~_MT,  # memory type UC: valid, but off the cached fast path
    "w_without_r": lambda e: (e & ~_R) | _W,  # an EPT misconfiguration
}


def access_maps() -> st.SearchStrategy[int]:
    return st.one_of(
        st.just(0),
        st.just(FULL),
        st.integers(0, FULL),
        # a hook on a few fields: FULL with some sub-pages write-protected
        st.sets(st.integers(0, 31), min_size=1, max_size=4).map(lambda s: FULL & ~sum(1 << i for i in s)),
        # a run of protected sub-pages
        st.tuples(st.integers(0, 31), st.integers(1, 32)).map(lambda t: FULL & ~(((1 << t[1]) - 1) << t[0]) & FULL),
    )


@st.composite
def set_ops(draw, space: Space) -> tuple:
    if draw(st.integers(0, 3)) < 3:  # clustered: a run that covers a hot gfn
        g = draw(st.sampled_from(space.hot))
        base_slot, n_slot = next((b, n) for b, n in space.memslots if b <= g < b + n)
        delta = draw(st.integers(0, min(3, g - base_slot)))
        base = g - delta
        limit = min(B.SUBPAGE_MAX_BITMAP, base_slot + n_slot - base)
        npages = draw(st.one_of(st.integers(delta + 1, min(delta + 4, limit)), st.integers(delta + 1, limit)))
    else:  # anywhere in a slot
        base_slot, n_slot = draw(st.sampled_from(space.memslots))
        base = draw(st.integers(base_slot, base_slot + n_slot - 1))
        limit = min(B.SUBPAGE_MAX_BITMAP, base_slot + n_slot - base)
        npages = draw(st.one_of(st.integers(1, min(4, limit)), st.integers(1, limit)))
    one_map = st.one_of(st.sampled_from(space.palette), access_maps())
    if draw(st.booleans()):
        maps = (draw(one_map),) * npages  # one map for the whole run
    else:
        maps = tuple(draw(st.lists(one_map, min_size=npages, max_size=npages)))
    return ("set", base, maps)


def vcpu_ids(vcpus: int) -> st.SearchStrategy[int]:
    """vCPU indices, vCPU 0 more often (so pokes and accesses meet on one vCPU's SPPT)."""
    if vcpus == 1:
        return st.just(0)
    return st.one_of(st.just(0), st.integers(0, vcpus - 1))


@st.composite
def poke_ops(draw, space: Space, vcpus: int) -> tuple:
    k = draw(st.integers(0, len(space.hot) - 1))
    g = space.hot[k:] + space.hot[:k]  # candidates: the first with a path is poked
    v = draw(vcpu_ids(vcpus))
    what = draw(st.sampled_from(["sppt_clear", "sppt_clear", "sppt_leaf_odd", "sppt_nonleaf_rsvd",
                                 "sppt_leaf", "ept_leaf"]))
    if what == "sppt_clear":
        return (what, g, v, draw(st.sampled_from([2, 2, 3, 4])))
    if what == "sppt_leaf_odd":
        return (what, g, v, 2 * draw(st.integers(0, 31)) + 1)
    if what == "sppt_nonleaf_rsvd":
        bit = draw(st.one_of(st.integers(1, 11), st.integers(B.MAXPHYADDR, 51), st.integers(52, 63)))
        return (what, g, v, draw(st.sampled_from([2, 3, 4])), bit)
    if what == "sppt_leaf":
        return (what, g, v, draw(access_maps()))
    return (what, g, draw(st.sampled_from(sorted(EPT_LEAF_POKES))))


@st.composite
def host_ops(draw, space: Space) -> tuple:
    """MMU-notifier and memslot operations (zap, remap, delete_memslot) around hot gfns."""
    name = draw(st.sampled_from(["zap", "remap", "zap", "remap", "delete_memslot"]))
    gfn = draw(st.one_of(st.sampled_from(space.hot), ram_gfns(space.memslots)))
    if name == "delete_memslot":
        return (name, gfn)
    gfn = max(0, gfn - draw(st.integers(0, 2)))
    return (name, gfn, draw(st.one_of(st.integers(1, 4), st.integers(1, 1024))))


def ops(space: Space, vcpus: int, pokes: bool = True, host: bool = True) -> st.SearchStrategy[tuple]:
    choices = [st.just(("init",)), set_ops(space), set_ops(space)]
    if pokes:
        choices += [poke_ops(space, vcpus)] * 3
    if host:
        choices.append(host_ops(space))
    return st.one_of(*choices)


@st.composite
def timelines(draw, space: Space, nrows: int) -> tuple:
    """0..3 timeline operations (replay(ops=...)) at rows 0..nrows (nrows: never reached)."""
    out = []
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, nrows))
        op = draw(st.sampled_from(["set_subpages", "set_subpages", "zap", "remap", "delete_memslot"]))
        gfn = draw(st.one_of(st.sampled_from(space.hot), ram_gfns(space.memslots)))
        npages = draw(st.one_of(st.integers(1, 4), st.integers(1, 600)))
        if op == "set_subpages":  # stay inside the slot (EFAULT would abort the replay)
            base, n = next((b, n) for b, n in space.memslots if b <= gfn < b + n)
            npages = min(npages, base + n - gfn)
        access = draw(st.one_of(st.sampled_from(space.palette), access_maps())) if op == "set_subpages" else 0
        out.append((at, op, gfn, npages, access))
    return tuple(sorted(out, key=lambda t: t[0]))


# ------------------------------------------------------------------------------------ traces
OFFSETS = st.one_of(
    st.sampled_from([0, 1, 127, 128, 255, 2048, 4000, 4088, 4095]),
    st.integers(0, 31).map(lambda i: i * B.SUBPAGE_SIZE),
    st.integers(0, B.PAGE_SIZE - 1),
)
SIZES = st.one_of(
    st.sampled_from([1, 2, 4, 8, 16, 64, 128, 129, 256, 4096]),
    st.integers(1, 16),
    st.integers(1, 4096),
)
KINDS = st.sampled_from([B.ACCESS_READ, B.ACCESS_WRITE, B.ACCESS_WRITE, B.ACCESS_WRITE, B.ACCESS_FETCH])


BACK = st.one_of(st.sampled_from([0, 1, 8, 127, 128, 129, 256]), st.integers(0, 4096))
FORWARD = st.sampled_from([0, 1, 2, 8, 127, 128, 129])


@st.composite
def edge_ranges(draw, edges) -> tuple[int, int]:
    """(offset, size) of an access that ends at, or just past, an edge of the write permission."""
    e = draw(st.sampled_from(edges))
    back = min(draw(BACK), e)
    size = max(1, min(back + draw(FORWARD), B.PAGE_SIZE))
    return e - back if back else e, size


@st.composite
def accesses(draw, space: Space, vcpus: int) -> tuple[int, int, int, int]:
    # Mostly hot pages; "ram" = anywhere in a memslot; MMIO gfns when the space has some.
    pool = list(space.hot) * 4 + ["ram"] + list(space.mmio)
    gfn = draw(st.sampled_from(pool))
    if gfn == "ram":
        gfn = draw(ram_gfns(space.memslots))
    offset, size = draw(st.one_of(st.tuples(OFFSETS, SIZES), edge_ranges(space.edges)))
    gpa = gfn * B.PAGE_SIZE + offset
    size = min(size, (1 << B.GPA_BITS) - gpa)
    return (gpa, size, draw(vcpu_ids(vcpus)), draw(KINDS))


@st.composite
def traces(draw, space: Space, vcpus: int, max_size: int = MAX_TRACE) -> tuple:
    """1..max_size accesses; the length is drawn first, so long traces are common (a plain
    st.lists averages a handful of elements) and shrinking shortens them."""
    n = draw(st.one_of(st.integers(1, min(20, max_size)), st.integers(1, max_size)))
    return tuple(draw(st.lists(accesses(space, vcpus), min_size=n, max_size=n)))


# ------------------------------------------------------------------------------------ scenarios
@st.composite
def scenarios(draw, max_phases: int = 3, pokes: bool = True, max_trace: int = MAX_TRACE,
              batch_sizes: bool = False, max_total: int = 2 * MAX_TRACE, host: bool = True,
              timeline: bool = True, profiles=("v4", "v4", "v12")) -> Scenario:
    """A VM and 1..max_phases phases of operations and traces (at most max_total accesses in
    all: hypothesis bounds the data one example may draw)."""
    spec = draw(vm_specs(profiles=profiles))
    space = draw(spaces(spec.memslots))
    nphases = draw(st.integers(1, max_phases))
    phases = []
    budget = max_total
    for p in range(nphases):
        op_list = []
        if p == 0 and draw(st.integers(0, 7)) < 7:  # shrinks towards "SPP on before the trace"
            op_list.append(("init",))
            op_list += draw(st.lists(set_ops(space), min_size=1, max_size=3))
        # No pokes before the first trace: nothing is mapped yet, so no path to poke exists.
        op_list += draw(st.lists(ops(space, spec.vcpus, pokes and p > 0, host and p > 0), max_size=4))
        if pokes and p > 0:
            op_list += draw(st.lists(poke_ops(space, spec.vcpus), max_size=2))
        batch = draw(st.integers(1, 50)) if batch_sizes else 1 << 20
        trace = draw(traces(space, spec.vcpus, max(1, min(max_trace, budget - (nphases - p - 1)))))
        budget -= len(trace)
        tl = draw(timelines(space, len(trace))) if timeline and draw(st.integers(0, 2)) == 2 else ()
        phases.append(Phase(ops=tuple(op_list), trace=trace, batch_size=batch, timeline=tl))
    return Scenario(vm=spec, phases=tuple(phases))


# ------------------------------------------------------------------------------------ big VMs
GIB_PAGES = 1 << 18
BIG_PALETTE = (0, 0xFFFF0000, 0x0000FFFF, 0x0F0F0F0F, 0xFFFFFFFE, 0x7FFFFFFF, FULL)


@st.composite
def big_scenarios(draw, profile: str = "v4") -> Scenario:
    """A VM of several GiB (one memslot of 1..4 GiB, maybe a second after a gap of MMIO) with
    thousands of protected pages in runs all over it, then two replays: a warm-up touching a few
    hundred 2 MiB regions (RAM and the gap: the table pool grows past the replay kernel's
    prefetching threshold, 256 tables, without huge pages), and a trace of a few thousand rows
    aimed at the protected pages, their neighbours, anywhere and the gap, with a timeline.
    Rows come from a drawn seed (numpy): hypothesis shrinks the VM, the profile and the seed."""
    slot0 = draw(st.integers(1, 4)) * GIB_PAGES + draw(st.sampled_from([0, 0, 1, 300]))
    gap = draw(st.sampled_from([0, 16, GIB_PAGES // 2, GIB_PAGES + 7]))
    slot1 = draw(st.sampled_from([0, 0, 513, GIB_PAGES]))
    memslots = ((0, slot0),) + (((slot0 + gap, slot1),) if slot1 else ())
    spec = VmSpec(
        memslots=memslots,
        vcpus=draw(st.integers(1, 3)),
        hugepages=draw(st.booleans()),
        subpage_check=draw(st.sampled_from(["all", "first"])),
        granularity=draw(st.sampled_from(["spp", "spp", "page"])),
        table_capacity=draw(st.sampled_from([None, 64])),
        profile=profile,
    )
    return big_scenario(spec, draw(st.integers(0, 2**32 - 1)))


def big_scenario(spec: VmSpec, seed: int) -> Scenario:
    """big_scenarios' phases for a VM whose first memslot starts at gfn 0, from ``seed``."""
    memslots = spec.memslots
    slot0 = memslots[0][1]
    gap = memslots[1][0] - slot0 if len(memslots) > 1 else 0
    rng = np.random.default_rng(seed)
    limit = 512 if spec.profile == "v12" else 64
    ops: list = [("init",)]
    protected: list[int] = []
    for _ in range(int(rng.integers(40, 80))):
        base, n = memslots[int(rng.integers(0, len(memslots)))]
        run = int(rng.integers(1, limit + 1))
        g = base + int(rng.integers(0, max(1, n - run)))
        run = min(run, base + n - g)
        maps = tuple(int(m) for m in rng.choice(BIG_PALETTE, run))
        ops.append(("set", g, maps))
        protected.extend(range(g, g + run))
    prot = np.array(protected, dtype=np.int64)
    top = max(b + n for b, n in memslots)
    gap_gfns = np.arange(slot0, slot0 + gap, dtype=np.int64) if gap else np.array([top + 5], dtype=np.int64)

    def rows(gfns, n):
        kind = rng.choice(np.array([0, 1, 1, 1, 2]), n)
        size = rng.choice(np.array([1, 8, 8, 64, 200, 4096]), n)
        off = rng.choice(np.array([0, 0x80, 0x7F8, 0xF80, 0xFF8, 0xFFF]), n) + rng.integers(0, 8, n)
        vcpu = rng.integers(0, spec.vcpus, n)
        return tuple((int(g) << 12 | int(o), int(s), int(v), int(k))
                     for g, o, s, v, k in zip(gfns, off, size, vcpu, kind))

    regions = rng.choice(max(1, top // 512), min(400, max(1, top // 512)), replace=False) * 512
    warm = np.concatenate([regions + rng.integers(0, 512, regions.size), rng.choice(gap_gfns, 40)])
    n = int(rng.integers(1500, 3000))
    aimed = np.concatenate([
        rng.choice(prot, n // 2), rng.choice(prot, n // 8) + rng.choice(np.array([-1, 1]), n // 8),
        rng.integers(0, top, n // 4), rng.choice(gap_gfns, n // 16)])
    aimed = np.clip(aimed, 0, (1 << 36) - 2)
    rng.shuffle(aimed)
    trace = rows(aimed, aimed.size)
    timeline = []
    for _ in range(int(rng.integers(0, 4))):
        at = int(rng.integers(0, len(trace)))
        g = int(rng.choice(prot))
        op = str(rng.choice(["set_subpages", "zap", "remap", "set_subpages", "delete_memslot"],
                            p=[0.3, 0.3, 0.2, 0.15, 0.05]))
        timeline.append((at, op, g, int(rng.integers(1, 65)), int(rng.choice(BIG_PALETTE))))
    timeline.sort()
    return Scenario(vm=spec, phases=(Phase(ops=tuple(ops), trace=rows(warm, warm.size)),
                                     Phase(trace=trace, timeline=tuple(timeline))))


# ------------------------------------------------------------------------------------ running
def _sppt_path(vm, gpa: int, vcpu: int) -> dict[int, int]:
    """{level: entry} of the SPPT path of ``gpa`` in ``vcpu``'s tree (mmu->sppt_root), as far
    as it exists; level 1 (the leaf vector) only when levels 4..2 are all present."""
    st_ = vm.state
    root = int(st_.sppt_root[vcpu])
    out: dict[int, int] = {}
    if root < 0:
        return out
    t = root
    ntables = int(st_.scal[0])
    for level in (4, 3, 2):
        e = int(st_.tables[t, B.level_index(gpa, level)])
        out[level] = e
        if not e & B.SPPT_PRESENT_MASK:
            return out
        t = ((e & B.PT64_BASE_ADDR_MASK & ~B.EPT_ADDR_RESERVED_MASK) - B.TABLE_POOL_HPA) >> B.PAGE_SHIFT
        if not 0 <= t < ntables:
            return out
    out[1] = int(st_.tables[t, B.level_index(gpa, 1)])
    return out


def _shadow_present(e: int) -> bool:
    """Some of R/W/X set, and not KVM's MMIO pattern (W without R)."""
    rwx = e & B.VMX_EPT_RWX_MASK
    return rwx != 0 and not (rwx & B.VMX_EPT_WRITABLE_MASK and not rwx & B.VMX_EPT_READABLE_MASK)


def _ept_leaf(vm, gpa: int) -> int | None:
    """The present RAM leaf (4 KiB or huge) mapping ``gpa`` (what vm.poke_ept_leaf rewrites),
    None if there is none."""
    st_ = vm.state
    t = int(st_.scal[1])  # SC_EPT_ROOT
    ntables = int(st_.scal[0])
    for level in (4, 3, 2, 1):
        e = int(st_.tables[t, B.level_index(gpa, level)])
        if not _shadow_present(e):
            return None
        if level == 1 or e & B.PT_PAGE_SIZE_MASK:
            return e
        t = ((e & B.PT64_BASE_ADDR_MASK) - B.TABLE_POOL_HPA) >> B.PAGE_SHIFT
        if not 0 <= t < ntables:
            return None
    return None


def _poke_one(vm, op, gfn: int) -> str | None:
    """The literal poke call of ``op`` aimed at ``gfn`` on this VM's state (None: no path)."""
    name = op[0]
    gpa = gfn << B.PAGE_SHIFT
    if name == "ept_leaf":
        how = op[2]
        e = _ept_leaf(vm, gpa)
        if e is None:
            return None
        value = EPT_LEAF_POKES[how](e)
        return f"vm.poke_ept_leaf({gpa:#x}, {value:#x})"
    vcpu = op[2]
    path = _sppt_path(vm, gpa, vcpu)
    if name == "sppt_clear":
        level = op[3]
        if not path.get(level, 0) & B.SPPT_PRESENT_MASK:
            return None
        return f"vm.poke_sppt({gpa:#x}, {level}, 0, vcpu={vcpu})"
    if name == "sppt_nonleaf_rsvd":
        level, bit = op[3], op[4]
        if not path.get(level, 0) & B.SPPT_PRESENT_MASK:
            return None
        return f"vm.poke_sppt({gpa:#x}, {level}, {path[level] | (1 << bit):#x}, vcpu={vcpu})"
    if 1 not in path:
        return None
    if name == "sppt_leaf_odd":
        return f"vm.poke_sppt({gpa:#x}, 1, {path[1] | (1 << op[3]):#x}, vcpu={vcpu})"
    if name == "sppt_leaf":
        return f"vm.poke_sppt({gpa:#x}, 1, {B.access_map_to_vector(op[3]):#x}, vcpu={vcpu})"
    raise ValueError(f"unknown operation {op!r}")


def _poke_call(vm, op) -> str | None:
    """A poke goes to the first of its candidate gfns (op[1]) whose path exists on this VM's
    current state; None when none has one (the poke is skipped, on both VMs alike)."""
    for gfn in op[1]:
        call = _poke_one(vm, op, gfn)
        if call is not None:
            return call
    return None


def op_call(vm, op) -> str | None:
    """The literal API call of an operation on ``vm`` now (None: a poke with no path)."""
    if op[0] == "init":
        return "vm.init_spp()"
    if op[0] == "set":
        maps = op[2]
        if len(set(maps)) == 1:
            return f"vm.set_subpages({op[1]:#x}, [{maps[0]:#x}] * {len(maps)})"
        return f"vm.set_subpages({op[1]:#x}, [{', '.join(f'{m:#x}' for m in maps)}])"
    if op[0] in ("zap", "remap"):
        return f"vm.{op[0]}({op[1]:#x}, {op[2]})"
    if op[0] == "delete_memslot":
        return f"vm.delete_memslot({op[1]:#x})"
    return _poke_call(vm, op)


def run_call(vm, call: str):
    """Run one literal call on ``vm``: ("ok", value, warnings) or ("raised", type, errno, message)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = eval(call, {"__builtins__": {}}, {"vm": vm})  # our own literal calls only
        except (SppError, InputError, VmEntryError) as exc:
            return ("raised", type(exc).__name__, getattr(exc, "errno", None), str(exc))
    return ("ok", value, tuple(type(w.message).__name__ for w in caught))


@dataclass
class PhaseResult:
    warnings: tuple = ()  # categories of the warnings the replay raised (SppQuirkWarning)
    result: object = None  # ReplayResult
    error: tuple | None = None  # (type name, message) when the replay raised


class Runner:
    """One VM driven through a scenario's phases with one engine and batch size."""

    def __init__(self, spec: VmSpec, engine: str, batch_size: int | None = None):
        self.vm = spec.build()
        self.engine = engine
        self.batch_size = batch_size  # None: each phase's own batch_size

    def apply_ops(self, phase: Phase) -> list:
        """Apply the phase's operations: [(literal call, run_call result)], skipped pokes left out."""
        out = []
        for op in phase.ops:
            call = op_call(self.vm, op)
            if call is not None:
                out.append((call, run_call(self.vm, call)))
        return out

    def replay(self, phase: Phase) -> PhaseResult:
        from sppjit.reference import ModelLivelock
        from sppjit.replay import replay

        res = PhaseResult()
        batch = phase.batch_size if self.batch_size is None else self.batch_size
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                res.result = replay(self.vm, trace_arrays(phase.trace), engine=self.engine, batch_size=batch,
                                    ops=phase.timeline_ops())
            except (ModelLivelock, VmEntryError, InputError, SppError) as exc:
                res.error = (type(exc).__name__, str(exc))
        res.warnings = tuple(type(w.message).__name__ for w in caught)
        return res


def state_arrays(vm) -> dict[str, np.ndarray]:
    """Everything the two engines must leave identical in a VM's state."""
    st_ = vm.state
    n = int(st_.scal[0])  # SC_NTABLES
    return {
        "tables": st_.tables[:n],
        "table_kind": st_.table_kind[:n],
        "table_level": st_.table_level[:n],
        "vmcs": st_.vmcs,
        "requests": st_.requests,
        "map_dir": st_.map_dir,
        "map_nodes": st_.map_nodes[: int(st_.scal[L.SC_MAP_NODES])],
        "map_blocks": st_.map_blocks[: int(st_.scal[L.SC_MAP_BLOCKS])],
        "sppt_root": st_.sppt_root,
        "scal": st_.scal,
    }


def reproducer(scn: Scenario, calls_per_phase: list[list[str]], runs=(("reference", 1 << 20), ("jit", 1 << 20)),
               log_capacity: int | None = None) -> str:
    """A stand-alone snippet that replays ``scn`` on two VMs (``runs``: engine and batch size of
    each, None for the phase's own batch size) and prints whether they agree."""
    spec = scn.vm
    lines = ["import numpy as np", "import sppjit", "import sppjit.vm, sppjit.replay",
             "from sppjit.replay import replay", ""]
    if log_capacity is not None:
        lines.append(f"sppjit.replay.EXIT_LOG_CAPACITY = {log_capacity}")
    kw = ", ".join(f"{k}={v!r}" for k, v in dict(spec.kwargs(), table_capacity=spec.table_capacity).items())
    lines.append(f"vms = [sppjit.VM({kw}) for _ in range(2)]")
    lines.append("def T(rows):")
    lines.append("    g, s, v, k = zip(*rows)")
    lines.append("    return dict(gpa=np.array(g, np.uint64), size=np.array(s, np.uint16), "
                 "vcpu=np.array(v, np.uint16), kind=np.array(k, np.uint8))")
    for p, (phase, calls) in enumerate(zip(scn.phases, calls_per_phase)):
        rows = ", ".join(f"({g:#x}, {s}, {v}, {k})" for g, s, v, k in phase.trace)
        lines.append(f"# phase {p}")
        lines.append(f"trace = T([{rows}])")
        lines.append("res = []")
        concrete = [(e, phase.batch_size if b is None else b) for e, b in runs]
        lines.append(f"for vm, (engine, batch) in zip(vms, {concrete!r}):")
        for c in calls:
            lines.append(f"    {c}")
        tl = f", ops={phase.timeline_ops()!r}" if phase.timeline else ""
        lines.append(f"    res.append(replay(vm, trace, engine=engine, batch_size=batch{tl}))")
        lines.append("a, b = res")
        lines.append("print(a.table.equals(b.table), a.exits.equals(b.exits))")
        lines.append("print(a.exits.to_pylist()); print(b.exits.to_pylist())")
    return "\n".join(lines) + "\n"
