"""The conformance table: hand-derived cases of docs/semantics.md, run on both engines.

Every expected value below was worked out by hand from docs/semantics.md (and
docs/contract.md for names and codes), never copied from a run. The derivations are in the comments;
the numbers are written out literally on purpose, so that a wrong constant in sppjit.bits is
caught here as well (tests/test_bits.py checks the names against the same numbers).

A case is a VM (keyword arguments of sppjit.VM) and a list of steps, applied in order:

- ``Init()``: ``vm.init_spp()``.
- ``SetMaps(gfn, maps)``: ``vm.set_subpages(gfn, maps)``.
- ``PokeEptFlags(gpa, flags)``: rewrite the present EPT leaf of ``gpa`` as its current address
  | ``flags`` (``vm.poke_ept_leaf``).
- ``PokeSppt(gpa, level, value, vcpu)``: ``vm.poke_sppt``.
- ``OrSppt(gpa, level, bits, vcpu)``: OR ``bits`` into the SPPT entry of ``level`` (its
  address kept), read with ``vm.walk`` (the vCPU must have entered).
- ``VmcsWrite(vcpu, field, value)``: ``vm.vcpu(vcpu).vmcs.write``.
- ``Access(...)``: one access with its expected exits (in order) and outcome. Consecutive
  accesses form one trace, replayed with one ``vm.replay`` call.

An expected exit is ``X(reason, qualification, kind, userspace_exit, gpa)``; ``gpa`` is the
start of the page piece that faulted (None: the access's own gpa, i.e. its first piece).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

# ------------------------------------------------- numbers of the model (docs/semantics.md)
READ, WRITE, FETCH = 0, 1, 2  # docs/contract.md §1: trace column `kind`
ALLOWED, SPP_VIOLATION, WRITE_PROTECT_VIOLATION, MMIO, SPP_MISCONFIG = 0, 1, 2, 3, 4

EPT_VIOLATION = 48
EPT_MISCONFIG = 49
SPP_EVENT = 66

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_MMIO = 6
KVM_EXIT_SPP = 28  # v4
KVM_EXIT_MEMORY_FAULT = 39  # the page-granular baseline's write-protect exit (architecture)

FULL = 0xFFFFFFFF
BIT61 = 1 << 61

# EPT-violation qualification (docs/semantics.md §2.6): access bit (read 1, write 2, fetch 4)
# | cumulative RWX of the walk << 3 (0 when not present) | bit 7 (0x80) | bit 8 (0x100).
Q_READ_NOT_PRESENT = 0x001 | 0x000 | 0x180  # 0x181
Q_WRITE_NOT_PRESENT = 0x002 | 0x000 | 0x180  # 0x182
Q_FETCH_NOT_PRESENT = 0x004 | 0x000 | 0x180  # 0x184
# A write on a present 4 KiB leaf with R=1 W=0 X=1 under RWX non-leaves: cum = 0b101.
Q_WRITE_RX = 0x002 | (0b101 << 3) | 0x180  # 0x1AA
# A write on an execute-only leaf (R=0 W=0 X=1): cum = 0b100.
Q_WRITE_X = 0x002 | (0b100 << 3) | 0x180  # 0x1A2
Q_SPPT_MISS = 1 << 11  # 0x800
Q_SPPT_MISCONFIG = 0

assert (Q_READ_NOT_PRESENT, Q_WRITE_NOT_PRESENT, Q_FETCH_NOT_PRESENT) == (0x181, 0x182, 0x184)
assert (Q_WRITE_RX, Q_WRITE_X) == (0x1AA, 0x1A2)


class X(NamedTuple):
    reason: int
    qualification: int
    kind: str
    userspace_exit: int
    gpa: int | None = None

    def at(self, gpa: int) -> X:
        return self._replace(gpa=gpa)


# KVM resolves these and the guest retries (userspace_exit 0).
FAULT_R = X(EPT_VIOLATION, Q_READ_NOT_PRESENT, "ept_fault", 0)
FAULT_W = X(EPT_VIOLATION, Q_WRITE_NOT_PRESENT, "ept_fault", 0)
FAULT_F = X(EPT_VIOLATION, Q_FETCH_NOT_PRESENT, "ept_fault", 0)
SPP_MISS = X(SPP_EVENT, Q_SPPT_MISS, "spp_miss", 0)
# Terminal exits.
SPP_VIOL = X(EPT_VIOLATION, Q_WRITE_RX, "spp_violation", KVM_EXIT_SPP)
SPP_MISCONF = X(SPP_EVENT, Q_SPPT_MISCONFIG, "spp_misconfig", KVM_EXIT_UNKNOWN)
MMIO_FIRST_R = X(EPT_VIOLATION, Q_READ_NOT_PRESENT, "mmio", KVM_EXIT_MMIO)
MMIO_FIRST_W = X(EPT_VIOLATION, Q_WRITE_NOT_PRESENT, "mmio", KVM_EXIT_MMIO)
MMIO_LATER = X(EPT_MISCONFIG, 0, "mmio", KVM_EXIT_MMIO)
WRITE_PROT = X(EPT_VIOLATION, Q_WRITE_RX, "write_protect", KVM_EXIT_MEMORY_FAULT)


# ------------------------------------------------------------------ steps
@dataclass(frozen=True)
class Init:
    pass


@dataclass(frozen=True)
class SetMaps:
    gfn: int
    maps: tuple


@dataclass(frozen=True)
class PokeEptFlags:
    gpa: int
    flags: int


@dataclass(frozen=True)
class PokeSppt:
    gpa: int
    level: int
    value: int
    vcpu: int = 0


@dataclass(frozen=True)
class OrSppt:
    gpa: int
    level: int
    bits: int
    vcpu: int = 0


@dataclass(frozen=True)
class VmcsWrite:
    vcpu: int
    field: int
    value: int


@dataclass(frozen=True)
class Access:
    gpa: int
    size: int = 8
    vcpu: int = 0
    kind: int = WRITE
    exits: tuple = ()
    outcome: int = ALLOWED


def W(gpa, size=8, vcpu=0, exits=(), outcome=ALLOWED):
    return Access(gpa, size, vcpu, WRITE, tuple(exits), outcome)


def R(gpa, size=8, vcpu=0, exits=(), outcome=ALLOWED):
    return Access(gpa, size, vcpu, READ, tuple(exits), outcome)


def F(gpa, size=8, vcpu=0, exits=(), outcome=ALLOWED):
    return Access(gpa, size, vcpu, FETCH, tuple(exits), outcome)


@dataclass(frozen=True)
class Case:
    id: str
    doc: str
    vm: dict
    steps: tuple
    # Checked on the summary of the last replay: {"pages.protected_left_writable": 2, ...}.
    summary: dict = field(default_factory=dict)


def sub(gfn: int, i: int) -> int:
    """gpa of the first byte of sub-page ``i`` of ``gfn``."""
    return (gfn << 12) + 128 * i


G = 0x1234  # a gfn inside the default 4 GiB memslot (gfn 0..0xFFFFF)
GPA = G << 12  # 0x1234000
NEXT = (G + 1) << 12  # 0x1235000
MMIO_GPA = 0x1_0000_0000  # gfn 0x100000: just above the default 4 GiB memslot
RX_LEAF_FLAGS = 0x1 | 0x4 | (6 << 3) | 0x40  # R | X | WB | ignore-PAT = 0x75
RWX_LEAF_FLAGS = 0x7 | (6 << 3) | 0x40  # 0x77
X_LEAF_FLAGS = 0x4 | (6 << 3) | 0x40  # execute-only: 0x74

CASES: list[Case] = []


def case(id, doc, steps, vm=None, summary=None):
    CASES.append(Case(id, doc, dict(vm or {}), tuple(steps), dict(summary or {})))


# =================================================================== 4 KiB leaves
case(
    "4k_unprotected_write_without_spp",
    "SPP never initialised: the first write faults the page in (0x182), later writes pass.",
    [W(GPA, exits=[FAULT_W]), W(GPA + 8), R(GPA + 0x800), F(GPA + 0xFF8)],
    summary={"pages.protected": 0, "pages.protected_left_writable": 0, "pages.mapped_4k": 1},
)
case(
    "4k_unprotected_write_spp_active",
    "Init and a protected neighbour do not affect an unprotected page.",
    [Init(), SetMaps(G + 1, (0,)), W(GPA, exits=[FAULT_W]), W(GPA + 0xFF8)],
)
case(
    "4k_lazy_protect_zero_map",
    "Map 0 on an unmapped gfn: lazy. First write: EPT fault (0x182), KVM maps W=0 + bit 61 and "
    "builds the SPPT, retry -> sub-page 2 not writable -> EPT violation 0x1AA -> KVM_EXIT_SPP. "
    "A zero SPP vector is 'nothing writable', never a miss. Second write: only the violation.",
    [
        Init(),
        SetMaps(G, (0,)),
        W(sub(G, 2), exits=[FAULT_W, SPP_VIOL], outcome=SPP_VIOLATION),
        W(sub(G, 2), exits=[SPP_VIOL], outcome=SPP_VIOLATION),
        W(sub(G, 31) + 120, exits=[SPP_VIOL], outcome=SPP_VIOLATION),
    ],
    summary={"pages.protected": 1, "pages.protected_left_writable": 0},
)
case(
    "4k_lazy_protect_one_writable_subpage",
    "Map 1<<5: only sub-page 5 (0x280..0x2FF) is writable.",
    [
        Init(),
        SetMaps(G, (1 << 5,)),
        W(sub(G, 5), exits=[FAULT_W]),  # fault-in, then the vector allows sub-page 5
        W(sub(G, 6), exits=[SPP_VIOL], outcome=SPP_VIOLATION),
        W(sub(G, 4) + 120, exits=[SPP_VIOL], outcome=SPP_VIOLATION),
        W(sub(G, 5) + 120),  # 0x2F8..0x2FF: still sub-page 5
        W(sub(G, 5), size=128),  # exactly the sub-page
        W(sub(G, 5)),  # allowed again: no caching of a 'writable' result changes anything
    ],
)
case(
    "4k_set_on_mapped_page_applies_at_once",
    "The page is mapped by a read first; set then clears W, sets bit 61 and writes the SPPT "
    "leaf at once: the next write takes no fault-in.",
    [
        Init(),
        R(GPA, exits=[FAULT_R]),
        SetMaps(G, (0xFFFF0000,)),  # sub-pages 16..31 writable
        W(sub(G, 0), exits=[SPP_VIOL], outcome=SPP_VIOLATION),
        W(sub(G, 15) + 124, size=4, exits=[SPP_VIOL], outcome=SPP_VIOLATION),
        W(sub(G, 16)),
        W(GPA + 0xFFC, size=4),
        R(sub(G, 0)),
    ],
)
case(
    "4k_set_full_unprotects_mapped_page",
    "set FULL on a protected mapped page clears bit 61 and sets W: writes pass with no exit.",
    [
        Init(),
        SetMaps(G, (0,)),
        W(GPA, exits=[FAULT_W, SPP_VIOL], outcome=SPP_VIOLATION),
        SetMaps(G, (FULL,)),
        W(GPA),
        W(GPA + 0x800),
    ],
)
case(
    "4k_set_full_on_unmapped_page",
    "A FULL map is no protection: the fault-in maps the page writable.",
    [Init(), SetMaps(G, (FULL,)), W(GPA, exits=[FAULT_W]), W(GPA + 0x100)],
)
case(
    "4k_reprotect_changes_vector",
    "A second set with another map rewrites the SPPT leaf: the old writable sub-page is now "
    "refused, the new one allowed.",
    [
        Init(),
        SetMaps(G, (1 << 3,)),
        W(sub(G, 3), exits=[FAULT_W]),
        SetMaps(G, (1 << 4,)),
        W(sub(G, 3), exits=[SPP_VIOL], outcome=SPP_VIOLATION),
        W(sub(G, 4)),
    ],
)
case(
    "4k_many_pages_one_set",
    "One set call with three maps protects three consecutive gfns independently.",
    [
        Init(),
        SetMaps(G, (0, FULL, 1)),
        W(sub(G, 0), exits=[FAULT_W, SPP_VIOL], outcome=SPP_VIOLATION),
        W(sub(G + 1, 0), exits=[FAULT_W]),
        W(sub(G + 2, 0), exits=[FAULT_W]),
        W(sub(G + 2, 1), exits=[SPP_VIOL], outcome=SPP_VIOLATION),
    ],
    summary={"pages.protected": 2, "pages.mapped_4k": 3},
)

# =================================================================== reads and fetches
case(
    "protected_read_faults_in_then_allowed",
    "Reads never consult the SPPT: a read of a protected page faults it in (0x181) and passes; "
    "later reads and fetches pass; a write is still refused.",
    [
        Init(),
        SetMaps(G, (0,)),
        R(GPA, exits=[FAULT_R]),
        R(GPA + 0x400),
        F(GPA + 0x800),
        R(GPA, size=4096),
        W(GPA, exits=[SPP_VIOL], outcome=SPP_VIOLATION),
    ],
)
case(
    "protected_fetch_faults_in_then_allowed",
    "A fetch of a protected page: fault-in with qualification 0x184, then allowed.",
    [
        Init(),
        SetMaps(G, (0,)),
        F(GPA + 0x10, exits=[FAULT_F]),
        F(GPA + 0x10),
        R(GPA + 0xFF0, size=16),
    ],
)

# =================================================================== eligibility
case(
    "w1_leaf_ignores_bit61",
    "A leaf with W=1 and bit 61 (poked): EPT allows the write, bit 61 is ignored, no SPPT "
    "lookup, no exit, even on sub-pages the map refuses.",
    [
        Init(),
        SetMaps(G, (0,)),
        R(GPA, exits=[FAULT_R]),
        PokeEptFlags(GPA, RWX_LEAF_FLAGS | BIT61),
        W(GPA),
        W(GPA + 0x800, size=64),
        W(GPA, size=4096),
    ],
)
case(
    "w1_leaf_ignores_broken_sppt",
    "With W=1 the SPPT is not read: even a misconfigured SPPT leaf causes no exit.",
    [
        Init(),
        SetMaps(G, (0,)),
        R(GPA, exits=[FAULT_R]),
        PokeSppt(GPA, 1, 0xAAAAAAAAAAAAAAAA),
        PokeEptFlags(GPA, RWX_LEAF_FLAGS | BIT61),
        W(GPA),
    ],
)
case(
    "spp_control_off_no_sppt_lookup",
    "With secondary control bit 23 cleared (EPT bit kept) a write to a protected page is not "
    "eligible: a plain EPT violation (0x1AA) even where the vector allows it; KVM sees bit 61 "
    "on its SPTE and exits with KVM_EXIT_SPP.",
    [
        Init(),
        SetMaps(G, (1,)),  # sub-page 0 writable
        W(sub(G, 0), exits=[FAULT_W]),  # control on (served at entry): allowed
        VmcsWrite(0, 0x401E, 0x2),
        W(sub(G, 0), exits=[SPP_VIOL], outcome=SPP_VIOLATION),
    ],
)
case(
    "execute_only_leaf_not_eligible",
    "A W=0 leaf with bit 61 but R=0 (execute-only, poked) is not eligible (cumulative R must "
    "be 1): EPT violation with cum RWX = 0b100 (0x1A2); KVM: bit 61 -> KVM_EXIT_SPP.",
    [
        Init(),
        SetMaps(G, (FULL & ~(1 << 9),)),  # sub-page 0 writable (only 9 is not)
        R(GPA, exits=[FAULT_R]),
        PokeEptFlags(GPA, X_LEAF_FLAGS | BIT61),
        # KVM's handler sees a present SPTE (X only is present; only W-without-R marks MMIO)
        # with bit 61: KVM_EXIT_SPP, whatever made the hardware refuse the write.
        W(sub(G, 0), exits=[X(EPT_VIOLATION, Q_WRITE_X, "spp_violation", KVM_EXIT_SPP)], outcome=SPP_VIOLATION),
    ],
)

# =================================================================== 2 MiB leaves (hugepages)
case(
    "huge_v4_leaves_protected_gfns_writable",
    "hugepages=True: the whole region 0x200..0x3FF lies in the 4 GiB memslot, so the fault "
    "maps a 2 MiB leaf (RWX); v4 ignores the protection of gfns 0x201 and 0x2FF under it. "
    "gfn 0x1200 is protected but never touched (unmapped: not 'left writable').",
    [
        Init(),
        SetMaps(0x201, (0,)),
        SetMaps(0x2FF, (0x12345678,)),
        SetMaps(0x1200, (0,)),
        W(0x201000, exits=[FAULT_W]),
        W(0x2FF000 + 0x80),
        W(0x201000 + 0x7F8, size=16),
        R(0x200000),
    ],
    vm={"hugepages": True},
    summary={
        "pages.protected": 3,
        "pages.protected_left_writable": 2,
        "pages.mapped_2m": 1,
        "pages.mapped_4k": 0,
        "exits.ept_fault": 1,
        "exits.spp_violation": 0,
    },
)
case(
    "huge_set_inside_huge_leaf_is_lazy",
    "set on a gfn inside an existing 2 MiB leaf changes nothing now: the write passes.",
    [
        Init(),
        R(0x400000, exits=[FAULT_R]),
        SetMaps(0x405, (0,)),
        W(0x405000),
        W(0x405000 + 0xFF8),
    ],
    vm={"hugepages": True},
    summary={"pages.protected": 1, "pages.protected_left_writable": 1, "pages.mapped_2m": 1},
)
case(
    "huge_region_not_in_one_memslot_maps_4k",
    "A 16-page memslot at gfn 0x10000 cannot hold a 2 MiB region: 4 KiB leaves, protection works.",
    [
        Init(),
        SetMaps(0x10003, (0,)),
        W(0x10003000, exits=[FAULT_W, SPP_VIOL], outcome=SPP_VIOLATION),
        W(0x10004000, exits=[FAULT_W]),
    ],
    vm={"hugepages": True, "memslots": [(0x10000, 16)]},
    summary={"pages.mapped_2m": 0, "pages.mapped_4k": 2, "pages.protected_left_writable": 0},
)
case(
    "huge_mixed_regions",
    "memslot gfn 0..0x2FF: region 0 (0..0x1FF) fits -> 2 MiB leaf, its protected gfn 0x50 is "
    "left writable; region 1 (0x200..0x3FF) does not fit -> 4 KiB, gfn 0x250 protected.",
    [
        Init(),
        SetMaps(0x50, (0,)),
        SetMaps(0x250, (0,)),
        W(0x50000, exits=[FAULT_W]),
        W(0x250000, exits=[FAULT_W, SPP_VIOL], outcome=SPP_VIOLATION),
        W(0x51000),  # same 2 MiB leaf as 0x50
    ],
    vm={"hugepages": True, "memslots": [(0, 0x300)]},
    summary={
        "pages.protected": 2,
        "pages.protected_left_writable": 1,
        "pages.mapped_2m": 1,
        "pages.mapped_4k": 1,
    },
)

# =================================================================== SPPT miss
case(
    "sppt_miss_level2_rebuilt",
    "Clear the present level-2 SPPT entry: the write misses (66, bit 11), KVM rebuilds the path "
    "with the stored map (0), the retry is refused by the vector.",
    [
        Init(),
        SetMaps(G, (0,)),
        R(GPA, exits=[FAULT_R]),
        PokeSppt(GPA, 2, 0),
        W(GPA, exits=[SPP_MISS, SPP_VIOL], outcome=SPP_VIOLATION),
        W(GPA, exits=[SPP_VIOL], outcome=SPP_VIOLATION),
    ],
)
case(
    "sppt_miss_then_allowed",
    "A miss on a writable sub-page: the retry passes; the last exit reason is 66.",
    [
        Init(),
        SetMaps(G, (FULL & ~1,)),  # all but sub-page 0
        R(GPA, exits=[FAULT_R]),
        PokeSppt(GPA, 2, 0),
        W(sub(G, 1), exits=[SPP_MISS]),
        W(sub(G, 0), exits=[SPP_VIOL], outcome=SPP_VIOLATION),
        W(sub(G, 31)),
    ],
)
case(
    "sppt_miss_level4",
    "Clearing the level-4 entry: one miss, KVM rebuilds the whole path.",
    [
        Init(),
        SetMaps(G, (1 << 1,)),
        R(GPA, exits=[FAULT_R]),
        PokeSppt(GPA, 4, 0),
        W(sub(G, 1), exits=[SPP_MISS]),
        W(sub(G, 2), exits=[SPP_VIOL], outcome=SPP_VIOLATION),
    ],
)
case(
    "sppt_miss_level3",
    "Clearing the level-3 entry: one miss, then the vector decides.",
    [
        Init(),
        SetMaps(G, (0,)),
        R(GPA, exits=[FAULT_R]),
        PokeSppt(GPA, 3, 0),
        W(GPA, exits=[SPP_MISS, SPP_VIOL], outcome=SPP_VIOLATION),
    ],
)
case(
    "sppt_not_present_entry_bits_unchecked",
    "A not-present level-2 entry with a reserved bit (value 2): bits of a not-present entry "
    "are not checked, so it is a miss (bit 11 = 1), not a misconfiguration.",
    [
        Init(),
        SetMaps(G, (0,)),
        R(GPA, exits=[FAULT_R]),
        PokeSppt(GPA, 2, 0x2),
        W(GPA, exits=[SPP_MISS, SPP_VIOL], outcome=SPP_VIOLATION),
    ],
)
case(
    "sppt_miss_rebuilds_only_the_faulting_leaf",
    "G and G+1 share one level-1 SPPT table (same 2 MiB block). Clearing the level-2 entry "
    "orphans that table. vCPU 0's write to G misses; KVM links a NEW level-1 table and writes "
    "only G's leaf (the stored map, 0). G+1's entry in the new table is 0: a zero vector means "
    "'no sub-page writable', not a miss, so G+1's writable sub-page 0 is refused without a "
    "second miss (v4's miss handler writes the faulting gfn's leaf only).",
    [
        Init(),
        SetMaps(G, (0, 1)),
        R(GPA, exits=[FAULT_R]),
        R(NEXT, exits=[FAULT_R]),
        W(sub(G + 1, 0)),  # G+1's sub-page 0 is writable before the poke
        PokeSppt(GPA, 2, 0),
        W(sub(G, 0), exits=[SPP_MISS, SPP_VIOL], outcome=SPP_VIOLATION),
        W(sub(G + 1, 0), exits=[SPP_VIOL.at(NEXT)], outcome=SPP_VIOLATION),
    ],
)

# =================================================================== SPPT misconfiguration
case(
    "sppt_misconfig_level3_reserved_bit1",
    "Bit 1 of the level-3 entry (address kept): reserved -> 66 with bit 11 = 0, KVM exits "
    "with KVM_EXIT_UNKNOWN; outcome SPP_MISCONFIG; KVM does not repair it; reads unaffected.",
    [
        Init(),
        SetMaps(G, (FULL & ~1,)),
        R(GPA, exits=[FAULT_R]),
        OrSppt(GPA, 3, 1 << 1),
        W(sub(G, 1), exits=[SPP_MISCONF], outcome=SPP_MISCONFIG),
        W(sub(G, 1), exits=[SPP_MISCONF], outcome=SPP_MISCONFIG),
        R(sub(G, 1)),
    ],
)
case(
    "sppt_misconfig_level2_bit11",
    "Bit 11 of the level-2 entry is reserved too.",
    [
        Init(),
        SetMaps(G, (0,)),
        R(GPA, exits=[FAULT_R]),
        OrSppt(GPA, 2, 1 << 11),
        W(GPA, exits=[SPP_MISCONF], outcome=SPP_MISCONFIG),
    ],
)
case(
    "sppt_misconfig_level4_high_bit",
    "Bits 63:52 of a non-leaf entry are reserved: bit 52 of the level-4 entry.",
    [
        Init(),
        SetMaps(G, (0,)),
        R(GPA, exits=[FAULT_R]),
        OrSppt(GPA, 4, 1 << 52),
        W(GPA, exits=[SPP_MISCONF], outcome=SPP_MISCONFIG),
    ],
)
case(
    "sppt_misconfig_leaf_odd_bit",
    "An odd bit in the SPP vector is a misconfiguration even where the even bit allows the "
    "write.",
    [
        Init(),
        SetMaps(G, (0,)),
        R(GPA, exits=[FAULT_R]),
        PokeSppt(GPA, 1, 0x5555555555555555 | (1 << 1)),
        W(sub(G, 5), exits=[SPP_MISCONF], outcome=SPP_MISCONFIG),
        R(sub(G, 5)),
    ],
)
case(
    "sppt_misconfig_leaf_bit63",
    "Bit 63 (odd) of the vector.",
    [
        Init(),
        SetMaps(G, (0,)),
        R(GPA, exits=[FAULT_R]),
        PokeSppt(GPA, 1, 1 << 63),
        W(GPA, exits=[SPP_MISCONF], outcome=SPP_MISCONFIG),
    ],
)
case(
    "sppt_raw_leaf_decides",
    "A raw leaf written like hvmi does (bit 6 = sub-page 3): the hardware follows the vector, "
    "not KVM's stored map.",
    [
        Init(),
        SetMaps(G, (0,)),
        R(GPA, exits=[FAULT_R]),
        PokeSppt(GPA, 1, 1 << 6),
        W(sub(G, 3)),
        W(sub(G, 2), exits=[SPP_VIOL], outcome=SPP_VIOLATION),
    ],
)

# =================================================================== writes across sub-pages
# map 0b01: only sub-page 0; map 0b10: only sub-page 1. A 16-byte write at offset 0x78 touches
# sub-pages 0 (0x78..0x7F) and 1 (0x80..0x87).
for check in ("all", "first"):
    refused_all = ([SPP_VIOL], SPP_VIOLATION)
    allowed = ([], ALLOWED)
    ex, out = refused_all if check == "all" else allowed
    case(
        f"span_subpages_second_refused_{check}",
        "Write over sub-pages 0 and 1 with only 0 writable: 'all' refuses, 'first' allows.",
        [Init(), SetMaps(G, (0b01,)), R(GPA, exits=[FAULT_R]), W(GPA + 0x78, size=16, exits=ex, outcome=out)],
        vm={"subpage_check": check},
    )
    case(
        f"span_subpages_first_refused_{check}",
        "Write over sub-pages 0 and 1 with only 1 writable: both modes refuse (the first byte's "
        "sub-page is 0).",
        [
            Init(),
            SetMaps(G, (0b10,)),
            R(GPA, exits=[FAULT_R]),
            W(GPA + 0x78, size=16, exits=[SPP_VIOL], outcome=SPP_VIOLATION),
        ],
        vm={"subpage_check": check},
    )
    ex, out = refused_all if check == "all" else allowed
    case(
        f"span_whole_page_{check}",
        "A 4096-byte write with sub-page 31 refused: 'all' refuses, 'first' (sub-page 0) allows.",
        [Init(), SetMaps(G, (0x7FFFFFFF,)), R(GPA, exits=[FAULT_R]), W(GPA, size=4096, exits=ex, outcome=out)],
        vm={"subpage_check": check},
    )
    case(
        f"span_subpage_boundaries_{check}",
        "Map 1<<7 (sub-page 7 = 0x380..0x3FF): an exact sub-page write passes in both modes; "
        "0x37F+2 starts in sub-page 6 (refused in both); 0x3FF+2 starts in 7 and ends in 8.",
        [
            Init(),
            SetMaps(G, (1 << 7,)),
            R(GPA, exits=[FAULT_R]),
            W(GPA + 0x380, size=128),
            W(GPA + 0x37F, size=2, exits=[SPP_VIOL], outcome=SPP_VIOLATION),
            W(GPA + 0x3FF, size=2, exits=ex, outcome=out),
            W(GPA + 0x3FF, size=1),
        ],
        vm={"subpage_check": check},
    )

# =================================================================== writes across pages
case(
    "cross_page_second_piece_refused",
    "8 bytes at 0xFFC of G: piece 1 (G, 4 bytes) faults in and passes; piece 2 (G+1 from its "
    "first byte) faults in and is refused: the access is aborted, outcome SPP_VIOLATION with 3 "
    "exits. The first piece's fault-in stays (a later read of G takes no exit).",
    [
        Init(),
        SetMaps(G + 1, (0,)),
        W(GPA + 0xFFC, exits=[FAULT_W, FAULT_W.at(NEXT), SPP_VIOL.at(NEXT)], outcome=SPP_VIOLATION),
        R(GPA),
        W(GPA + 0x10),
        R(NEXT),
    ],
)
case(
    "cross_page_first_piece_refused_aborts",
    "The first piece is refused: the second page is never touched (a later read of it faults).",
    [
        Init(),
        SetMaps(G, (0,)),
        W(GPA + 0xFFC, exits=[FAULT_W, SPP_VIOL], outcome=SPP_VIOLATION),
        R(NEXT, exits=[FAULT_R]),
    ],
)
case(
    "cross_page_both_allowed",
    "Sub-page 31 of G and sub-page 0 of G+1 writable: two fault-ins, allowed, last reason 48.",
    [
        Init(),
        SetMaps(G, (1 << 31, 1)),
        W(GPA + 0xFF8, size=16, exits=[FAULT_W, FAULT_W.at(NEXT)]),
        W(GPA + 0xFF8, size=16),
        W(GPA + 0xF80, size=0x100),
    ],
)
for check in ("all", "first"):
    case(
        f"cross_page_pieces_checked_separately_{check}",
        "G unprotected, G+1 refuses only sub-page 1. Piece 2 of a page-crossing write always "
        "starts at sub-page 0 of G+1 (writable). A piece 2 of 16 bytes stays in sub-page 0: "
        "allowed in both modes; one of 0x100 bytes spans sub-pages 0 and 1: 'all' refuses it "
        "(exit on piece 2, gpa = G+1's first byte), 'first' allows it.",
        [
            Init(),
            SetMaps(G, (FULL, FULL & ~(1 << 1))),
            R(GPA, exits=[FAULT_R]),
            R(NEXT, exits=[FAULT_R]),
            W(GPA + 0xFF0, size=32),
            W(
                GPA + 0xF00,
                size=0x200,
                exits=[SPP_VIOL.at(NEXT)] if check == "all" else [],
                outcome=SPP_VIOLATION if check == "all" else ALLOWED,
            ),
        ],
        vm={"subpage_check": check},
    )
case(
    "cross_page_first_mode_second_piece_first_byte_refused",
    "subpage_check='first' checks the first byte of EACH page piece: piece 2 starts in "
    "sub-page 0 of G+1, which is refused, so the access is refused even though the first "
    "byte of the access (sub-page 31 of G) is writable.",
    [
        Init(),
        SetMaps(G, (FULL, FULL & ~1)),
        R(GPA, exits=[FAULT_R]),
        R(NEXT, exits=[FAULT_R]),
        W(NEXT - 4, exits=[SPP_VIOL.at(NEXT)], outcome=SPP_VIOLATION),
        W(NEXT + 0x80),  # sub-page 1 of G+1: allowed
    ],
    vm={"subpage_check": "first"},
)
for check in ("all", "first"):
    case(
        f"cross_page_unaligned_4096_{check}",
        "4096 bytes from 0x800 of G: piece 1 = sub-pages 16..31 of G, piece 2 = sub-pages 0..15 "
        "of G+1. Maps 0xFFFF0000 / 0x0000FFFF allow exactly that (two fault-ins). With G+1's "
        "map 0x00007FFF (sub-page 15 refused) 'all' refuses piece 2, 'first' (sub-page 0) allows.",
        [
            Init(),
            SetMaps(G, (0xFFFF0000, 0x0000FFFF)),
            W(GPA + 0x800, size=4096, exits=[FAULT_W, FAULT_W.at(NEXT)]),
            W(GPA + 0x800, size=4096),
            W(GPA + 0x7FF, size=2, exits=[SPP_VIOL], outcome=SPP_VIOLATION),  # starts in sub-page 15
            SetMaps(G + 1, (0x00007FFF,)),
            W(
                GPA + 0x800,
                size=4096,
                exits=[SPP_VIOL.at(NEXT)] if check == "all" else [],
                outcome=SPP_VIOLATION if check == "all" else ALLOWED,
            ),
        ],
        vm={"subpage_check": check},
    )
case(
    "cross_page_read_into_mmio",
    "A read crossing into an MMIO gfn: piece 2 is the first access to it (48, read, 0x181).",
    [
        R(0x1000FFF8, size=16, exits=[FAULT_R, MMIO_FIRST_R.at(0x10010000)], outcome=MMIO),
        R(0x1000FFF8, size=16, exits=[MMIO_LATER.at(0x10010000)], outcome=MMIO),
        F(0x10010000 + 0x10, exits=[MMIO_LATER], outcome=MMIO),
        F(0x10020000, exits=[X(EPT_VIOLATION, Q_FETCH_NOT_PRESENT, "mmio", KVM_EXIT_MMIO)], outcome=MMIO),
    ],
    vm={"memslots": [(0x10000, 16)]},
)
case(
    "cross_page_into_mmio",
    "A write from the last RAM page of a memslot into the MMIO gap: piece 1 faults in, piece 2 "
    "is the first access to an MMIO gfn (48 -> KVM_EXIT_MMIO).",
    [W(0x1000FFFC, exits=[FAULT_W, MMIO_FIRST_W.at(0x10010000)], outcome=MMIO)],
    vm={"memslots": [(0x10000, 16)]},
)

# =================================================================== MMIO
case(
    "mmio_first_then_misconfig",
    "First access to a gfn with no memslot: EPT violation (not present, 0x182) and "
    "KVM_EXIT_MMIO; KVM installs a W|X entry, so later accesses to the gfn take an EPT "
    "misconfiguration (49, qualification 0).",
    [
        W(MMIO_GPA, exits=[MMIO_FIRST_W], outcome=MMIO),
        R(MMIO_GPA, exits=[MMIO_LATER], outcome=MMIO),
        F(MMIO_GPA + 0x800, exits=[MMIO_LATER], outcome=MMIO),
        W(MMIO_GPA + 0x10, exits=[MMIO_LATER], outcome=MMIO),
    ],
    summary={"exits.mmio": 4, "counts.mmio": 4},
)
case(
    "mmio_first_read_in_gap",
    "An MMIO gap between two memslots, with SPP active: first read 0x181, then 49.",
    [
        Init(),
        R(20 << 12, exits=[MMIO_FIRST_R], outcome=MMIO),
        R(20 << 12, exits=[MMIO_LATER], outcome=MMIO),
        W(32 << 12, exits=[FAULT_W]),
        W((16 << 12) - 8, exits=[FAULT_W]),
    ],
    vm={"memslots": [(0, 16), (32, 16)]},
)

# =================================================================== page-granular baseline
case(
    "page_first_write_to_protected",
    "granularity='page': a protected page (map != FULL, even almost full) is mapped W=0 "
    "without bit 61; its first write faults in then exits as a write-protect violation "
    "(48, 0x1AA, KVM_EXIT_MEMORY_FAULT); every later write exits; reads pass.",
    [
        Init(),
        SetMaps(G, (FULL & ~1,)),
        W(sub(G, 1), exits=[FAULT_W, WRITE_PROT], outcome=WRITE_PROTECT_VIOLATION),
        W(sub(G, 1), exits=[WRITE_PROT], outcome=WRITE_PROTECT_VIOLATION),
        R(sub(G, 0)),
    ],
    vm={"granularity": "page"},
    summary={"exits.write_protect": 2, "exits.spp_violation": 0, "counts.write_protect_violation": 2},
)
case(
    "page_unprotected_write",
    "granularity='page': an unprotected page is writable after fault-in.",
    [Init(), SetMaps(G, (0,)), W(NEXT, exits=[FAULT_W]), W(NEXT + 0x100)],
    vm={"granularity": "page"},
)
case(
    "page_set_on_mapped_page",
    "granularity='page': set write-protects a mapped page at once and FULL unprotects it.",
    [
        Init(),
        R(GPA, exits=[FAULT_R]),
        SetMaps(G, (0,)),
        W(GPA, exits=[WRITE_PROT], outcome=WRITE_PROTECT_VIOLATION),
        SetMaps(G, (FULL,)),
        W(GPA),
    ],
    vm={"granularity": "page"},
)
case(
    "page_hugepages_region_with_protected_gfn_maps_4k",
    "granularity='page', hugepages: a region holding a protected gfn is mapped at 4 KiB.",
    [
        Init(),
        SetMaps(0x205, (0,)),
        W(0x200000, exits=[FAULT_W]),
        W(0x205000, exits=[FAULT_W, WRITE_PROT], outcome=WRITE_PROTECT_VIOLATION),
    ],
    vm={"granularity": "page", "hugepages": True},
    summary={"pages.mapped_2m": 0, "pages.mapped_4k": 2, "pages.protected_left_writable": 0},
)
case(
    "page_set_zaps_huge_leaf",
    "granularity='page', hugepages: set over a 2 MiB leaf zaps it; the region re-faults at "
    "4 KiB (the level-2 entry is gone: not present, 0x182 / 0x181).",
    [
        Init(),
        R(0x400000, exits=[FAULT_R]),
        SetMaps(0x401, (0,)),
        W(0x401000, exits=[FAULT_W, WRITE_PROT], outcome=WRITE_PROTECT_VIOLATION),
        R(0x400000, exits=[FAULT_R]),
    ],
    vm={"granularity": "page", "hugepages": True},
    summary={"pages.mapped_2m": 0, "pages.mapped_4k": 2, "pages.protected_left_writable": 0},
)
case(
    "spp_same_trace_as_page_zap",
    "The same steps with SPP (v4): the 2 MiB leaf stays and the write passes.",
    [
        Init(),
        R(0x400000, exits=[FAULT_R]),
        SetMaps(0x401, (0,)),
        W(0x401000),
        R(0x400000),
    ],
    vm={"hugepages": True},
    summary={"pages.mapped_2m": 1, "pages.protected_left_writable": 1},
)

# =================================================================== v4, several vCPUs
case(
    "multi_vcpu_set_builds_every_vcpu",
    "3 vCPUs; the page is mapped by vCPU 0, then protected: set builds the SPPT of every vCPU, "
    "so vCPUs 1 and 2 (entering for the first time) are refused without a miss.",
    [
        Init(),
        R(GPA, vcpu=0, exits=[FAULT_R]),
        SetMaps(G, (0,)),
        W(GPA, vcpu=2, exits=[SPP_VIOL], outcome=SPP_VIOLATION),
        W(GPA, vcpu=1, exits=[SPP_VIOL], outcome=SPP_VIOLATION),
        W(GPA, vcpu=0, exits=[SPP_VIOL], outcome=SPP_VIOLATION),
    ],
    vm={"vcpus": 3},
)
case(
    "multi_vcpu_lazy_fault_builds_every_vcpu",
    "The fault path of vCPU 1 protects the page and builds the SPPT of every vCPU.",
    [
        Init(),
        SetMaps(G, (1 << 4,)),
        W(GPA, vcpu=1, exits=[FAULT_W, SPP_VIOL], outcome=SPP_VIOLATION),
        W(GPA, vcpu=0, exits=[SPP_VIOL], outcome=SPP_VIOLATION),
        W(sub(G, 4), vcpu=0),
    ],
    vm={"vcpus": 2},
)
case(
    "multi_vcpu_miss_handler_this_vcpu_only",
    "Both vCPUs' level-2 entries cleared: vCPU 0's miss rebuilds only vCPU 0's tree, so vCPU 1 "
    "misses too; afterwards neither misses.",
    [
        Init(),
        SetMaps(G, (0,)),
        R(GPA, vcpu=0, exits=[FAULT_R]),
        R(GPA, vcpu=1),
        PokeSppt(GPA, 2, 0, vcpu=0),
        PokeSppt(GPA, 2, 0, vcpu=1),
        W(GPA, vcpu=0, exits=[SPP_MISS, SPP_VIOL], outcome=SPP_VIOLATION),
        W(GPA, vcpu=1, exits=[SPP_MISS, SPP_VIOL], outcome=SPP_VIOLATION),
        W(GPA, vcpu=0, exits=[SPP_VIOL], outcome=SPP_VIOLATION),
        W(GPA, vcpu=1, exits=[SPP_VIOL], outcome=SPP_VIOLATION),
    ],
    vm={"vcpus": 2},
)
case(
    "multi_vcpu_miss_on_one_vcpu_only",
    "Only vCPU 1's tree is broken: vCPU 0 is refused directly, vCPU 1 misses once.",
    [
        Init(),
        SetMaps(G, (0,)),
        R(GPA, vcpu=0, exits=[FAULT_R]),
        R(GPA, vcpu=1),
        PokeSppt(GPA, 2, 0, vcpu=1),
        W(GPA, vcpu=0, exits=[SPP_VIOL], outcome=SPP_VIOLATION),
        W(GPA, vcpu=1, exits=[SPP_MISS, SPP_VIOL], outcome=SPP_VIOLATION),
    ],
    vm={"vcpus": 2},
)
case(
    "multi_vcpu_misconfig_per_vcpu",
    "A misconfiguration in vCPU 1's tree does not affect vCPU 0.",
    [
        Init(),
        SetMaps(G, (1,)),
        R(GPA, vcpu=0, exits=[FAULT_R]),
        R(GPA, vcpu=1),
        OrSppt(GPA, 3, 1 << 1, vcpu=1),
        W(GPA, vcpu=0),
        W(GPA, vcpu=1, exits=[SPP_MISCONF], outcome=SPP_MISCONFIG),
    ],
    vm={"vcpus": 2},
)

CASE_IDS = [c.id for c in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS), "case ids must be unique"


# --------------------------------------------------------------------------- running steps
def trace_of(accesses) -> dict:
    """The trace (numpy columns) of a list of Access steps."""
    import numpy as np

    return {
        "gpa": np.array([a.gpa for a in accesses], dtype=np.uint64),
        "size": np.array([a.size for a in accesses], dtype=np.uint16),
        "vcpu": np.array([a.vcpu for a in accesses], dtype=np.uint16),
        "kind": np.array([a.kind for a in accesses], dtype=np.uint8),
    }


def check(accesses, res, where):
    """Every access's exits (reason, qualification, kind, userspace exit, gpa, vCPU) and its
    result row (outcome, exits, exit_reason) as the Access steps expect them."""
    by_row: dict[int, list] = {}
    for e in res.exits.to_pylist():
        by_row.setdefault(e["row"], []).append(e)
    table = res.table.to_pylist()
    for i, a in enumerate(accesses):
        got = [(e["reason"], e["qualification"], e["kind"], e["userspace_exit"], e["gpa"], e["vcpu"])
               for e in by_row.get(i, [])]
        want = [(x.reason, x.qualification, x.kind, x.userspace_exit, a.gpa if x.gpa is None else x.gpa, a.vcpu)
                for x in a.exits]
        assert got == want, f"{where} access {i} ({a.gpa:#x}): exits\n got  {got}\n want {want}"
        row = table[i]
        want_row = (a.outcome, len(a.exits), a.exits[-1].reason if a.exits else 0)
        assert (row["outcome"], row["exits"], row["exit_reason"]) == want_row, f"{where} access {i}"


def run(vm, steps, engine, where=""):
    """Apply steps in order: Init / SetMaps, accesses (consecutive ones form one replay),
    or a callable(vm) for operations and checks. Returns the last replay's result."""
    last, batch = None, []

    def flush():
        nonlocal last, batch
        if batch:
            last = vm.replay(trace_of(batch), engine=engine)
            check(batch, last, f"[{engine}{where}]")
            batch = []

    for s in steps:
        if isinstance(s, Access):
            batch.append(s)
            continue
        flush()
        if isinstance(s, Init):
            assert vm.init_spp() == 0
        elif isinstance(s, SetMaps):
            assert vm.set_subpages(s.gfn, list(s.maps)) == len(s.maps)
        else:
            s(vm)
    flush()
    return last
