"""Profile v12 against profile v4: one conformance case per row of the version table.

Every expected value is derived by hand from docs/semantics.md §4 (and §3 for the v4
side of each contrast) and docs/semantics.md §8.1; never copied from a run. Each replay runs on
both engines. The rows of docs/semantics.md §8.1 and where they are checked:

| row (version)                                   | tests here                                     |
|-------------------------------------------------|------------------------------------------------|
| init: KVM_ENABLE_CAP(KVM_CAP_X86_SPP = 182) (v8, v12) | test_check_extension, test_enable_cap_*  |
| uAPI struct {gfn_base; npages; flags; map[]}, 512 (v8) | test_struct_*, test_ioctl_v12_*        |
| SPPT built only by the miss handler (v5), whole block (v7) | case miss_fills_block / set_flushes_l2e |
| write violation: KVM_EXIT_SPP 29, insn not skipped by KVM (v8, v12) | case exit_spp_29 (selftest)  |
| huge pages zapped / capped to 4 KiB (v5)        | case huge_*                                    |
| shared kvm->arch.sppt_root (v11)                | case shared_root*, test_shared_root_vmcs       |
| memslot free clears spp_active (v12 code)       | test_memslot_free_quirk*                       |
| set FULL leaves W off (v12 kvm_spp_mark_protection) | case full_leaves_w_off                     |

Not modelled (no test): the v5 move of bit 61 to bit 53 across KVM's dirty/access tracking
(sppjit has no dirty logging) and the v6 emulator check (traces hold no emulated instructions).
"""

from __future__ import annotations

import errno
import struct
import warnings

import numpy as np
import pytest

import sppjit
from sppjit import abi
from sppjit import bits as B
from sppjit.vm import SppQuirkWarning

import conformance_cases as C  # noqa: E402  (tests/ on sys.path: conftest.py)

ENGINES = ("reference", "jit")
EPERM, EFAULT, ENODEV, EINVAL, ENOTTY = 1, 14, 19, 22, 25
FULL = 0xFFFFFFFF
BIT61 = 1 << 61
W_BIT = 0x2
POOL_HPA = 0x10_0000_0000  # table-pool index i lives at POOL_HPA + 4096 i
SPPTP, SECONDARY = 0x2030, 0x401E

# KVM_ENABLE_CAP = _IOW(KVMIO 0xAE, 0xA3, struct kvm_enable_cap = 104 bytes)
#                = 1 << 30 | 104 << 16 | 0xAE << 8 | 0xA3
KVM_ENABLE_CAP = (1 << 30) | (104 << 16) | (0xAE << 8) | 0xA3
KVM_CHECK_EXTENSION = (0xAE << 8) | 0x03  # _IO(KVMIO, 0x03)
KVM_CAP_X86_SPP = 182

# Exits of the v12 model (docs/semantics.md §4.6): a sub-page violation reports KVM_EXIT_SPP 29.
SPP_VIOL_V12 = C.X(48, 0x1AA, "spp_violation", 29)
# A write on a leaf KVM left write-protected without bit 61 (R|X, cum 0b101): wp_fault.
WP_FAULT = C.X(48, 0x1AA, "wp_fault", 0)
FAULT_W, FAULT_R, SPP_MISS = C.FAULT_W, C.FAULT_R, C.SPP_MISS
SPP_VIOL_V4 = C.SPP_VIOL  # userspace_exit 28
W, R, sub = C.W, C.R, C.sub
G = 0x1234  # block 0x1200..0x13FF (2 MiB region 9)
GPA = G << 12


def spread(m: int) -> int:
    return sum(1 << (2 * i) for i in range(32) if m >> i & 1)








def ept_leaf(vm, gpa):
    last = vm.walk(gpa)["ept"][-1]
    assert last["present"] and last["leaf"], f"{gpa:#x} has no EPT leaf"
    return last


def sppt_path(vm, gpa, vcpu=0):
    return vm.walk(gpa, vcpu=vcpu)["sppt"]


# ====================================================================== enable, capability
def test_check_extension():
    assert sppjit.VM(profile="v12").ioctl(KVM_CHECK_EXTENSION, KVM_CAP_X86_SPP) == 512
    assert sppjit.VM(profile="v4").ioctl(KVM_CHECK_EXTENSION, KVM_CAP_X86_SPP) == 0
    assert sppjit.VM(profile="v12", spp_supported=False).ioctl(KVM_CHECK_EXTENSION, KVM_CAP_X86_SPP) == 0
    assert sppjit.VM(profile="v12").ioctl(KVM_CHECK_EXTENSION, 181) == 0
    assert B.KVM_ENABLE_CAP == KVM_ENABLE_CAP == 0x4068AEA3
    assert B.KVM_CHECK_EXTENSION == KVM_CHECK_EXTENSION == 0xAE03


def enable_cap_buf(cap=KVM_CAP_X86_SPP, flags=0) -> bytearray:
    # struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; __u8 pad[64]; }
    return bytearray(struct.pack("<II4Q64x", cap, flags, 0, 0, 0, 0))


def test_enable_cap_struct():
    assert len(enable_cap_buf()) == 104
    assert abi.KVM_ENABLE_CAP_STRUCT.itemsize == 104
    assert bytes(abi.kvm_enable_cap(KVM_CAP_X86_SPP)) == bytes(enable_cap_buf())


def test_enable_cap_return_values():
    vm = sppjit.VM(profile="v12")
    assert vm.ioctl(KVM_ENABLE_CAP, enable_cap_buf()) == 0
    assert vm.spp_active
    assert vm.ioctl(KVM_ENABLE_CAP, enable_cap_buf()) == 0  # already active
    assert vm.init_spp() == 0
    # nested virtualisation on: -EPERM (checked first), also without SPP support
    for kw in ({}, {"spp_supported": False}):
        vm = sppjit.VM(profile="v12", nested=True, **kw)
        assert vm.ioctl(KVM_ENABLE_CAP, enable_cap_buf()) == -EPERM
        with pytest.raises(sppjit.SppError) as ei:
            vm.init_spp()
        assert ei.value.errno == EPERM
        assert not vm.spp_active and vm.vcpu(0).sppt_root is None
    vm = sppjit.VM(profile="v12", spp_supported=False)
    assert vm.ioctl(KVM_ENABLE_CAP, enable_cap_buf()) == -ENODEV
    with pytest.raises(sppjit.SppError) as ei:
        vm.init_spp()
    assert ei.value.errno == ENODEV
    vm = sppjit.VM(profile="v12")
    assert vm.ioctl(KVM_ENABLE_CAP, enable_cap_buf(flags=1)) == -EINVAL
    assert vm.ioctl(KVM_ENABLE_CAP, enable_cap_buf(cap=181)) == -EINVAL
    assert vm.ioctl(KVM_ENABLE_CAP, bytearray(100)) == -EFAULT
    assert not vm.spp_active
    # v12 has no KVM_INIT_SPP
    assert vm.ioctl(B.KVM_INIT_SPP, 0) == -ENOTTY
    assert not vm.spp_active


def test_v4_has_init_spp_and_no_capability():
    vm = sppjit.VM(profile="v4", nested=True)  # v4 has no nested check
    assert vm.ioctl(KVM_ENABLE_CAP, enable_cap_buf()) == -EINVAL  # unknown capability
    assert not vm.spp_active
    assert vm.ioctl(B.KVM_INIT_SPP, 0) == 0
    assert vm.spp_active


# ====================================================================== the v12 struct kvm_subpage
def v12_buf(gfn, npages, flags=0, maps=()) -> bytearray:
    # struct kvm_subpage { __u64 gfn_base; __u32 npages; __u32 flags; __u32 access_map[]; }
    return bytearray(struct.pack(f"<QII{len(maps)}I", gfn, npages, flags, *maps))


def test_struct_v12_layout():
    dt = abi.kvm_subpage_v12_dtype(3)
    assert dt.itemsize == 16 + 12
    assert [dt.fields[f][1] for f in ("gfn_base", "npages", "flags", "access_map")] == [0, 8, 12, 16]
    assert abi.kvm_subpage_v12_dtype(0).itemsize == 16
    assert bytes(abi.kvm_subpage(0x10, [1, 2, 3], profile="v12")) == bytes(v12_buf(0x10, 3, 0, (1, 2, 3)))
    assert bytes(abi.kvm_subpage(0x10, [], npages=513, flags=2, profile="v12")) == bytes(v12_buf(0x10, 513, 2))


def test_ioctl_v12_errors():
    vm = sppjit.VM(profile="v12", memslots=[(0, 0x1000)])
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, v12_buf(0x10, 1, 0, (0,))) == -ENODEV
    assert vm.ioctl(B.KVM_SUBPAGES_GET_ACCESS, v12_buf(0x10, 1, 0, (0,))) == -ENODEV
    assert vm.init_spp() == 0
    assert vm.page_limit == 512
    for req in (B.KVM_SUBPAGES_SET_ACCESS, B.KVM_SUBPAGES_GET_ACCESS):
        assert vm.ioctl(req, v12_buf(0x10, 1, flags=1, maps=(0,))) == -EINVAL
        assert vm.ioctl(req, v12_buf(0x10, 513, maps=[0] * 513)) == -EINVAL
        assert vm.ioctl(req, v12_buf(0x10, 0)) == 0
        assert vm.ioctl(req, bytearray(15)) == -EFAULT  # header cannot be copied
        assert vm.ioctl(req, v12_buf(0x10, 2, maps=(0,))) == -EFAULT  # access_map[2] cannot
    assert vm.get_subpages(0x10, 1).tolist() == [FULL]  # none of that applied anything
    # set/get round trip; the count is npages
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, v12_buf(0x10, 2, maps=(0x1234, 0))) == 2
    buf = v12_buf(0x10, 3, maps=(7, 7, 7))
    assert vm.ioctl(B.KVM_SUBPAGES_GET_ACCESS, buf) == 3
    assert struct.unpack("<QII3I", buf)[3:] == (0x1234, 0, FULL)
    assert vm.ioctl(B.KVM_SUBPAGES_GET_ACCESS, bytes(v12_buf(0x10, 1, maps=(7,)))) == -EFAULT  # read-only
    # 512 pages in one call; EFAULT at the first gfn without a memslot, no rollback
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, v12_buf(0x200, 512, maps=[5] * 512)) == 512
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, v12_buf(0xFFE, 4, maps=(1, 2, 3, 4))) == -EFAULT
    assert vm.get_subpages(0xFFE, 2).tolist() == [1, 2]
    assert vm.ioctl(B.KVM_INIT_SPP, 0) == -ENOTTY


def test_python_api_v12_limits():
    vm = sppjit.VM(profile="v12")
    vm.init_spp()
    assert vm.set_subpages(0x10, []) == 0  # npages == 0 returns 0 in v12
    assert vm.get_subpages(0x10, 0).tolist() == []
    assert vm.set_subpages(0x10, [0] * 512) == 512
    for call in (lambda: vm.set_subpages(0x10, [0] * 513), lambda: vm.get_subpages(0x10, 513)):
        with pytest.raises(sppjit.SppError) as ei:
            call()
        assert ei.value.errno == EINVAL
    assert sppjit.VM(profile="v4").page_limit == 64


# ====================================================================== the shared SPPT root
@pytest.mark.parametrize("engine", ENGINES)
def test_shared_root_vmcs(engine):
    """v12: one root for all vCPUs. The EPT root is pool table 0, the shared SPPT root (allocated
    at enable) table 1: SPPTP = 0x10_0000_0000 + 0x1000 on every vCPU after its entry, each
    through its own KVM_REQ_LOAD_MMU_PGD (one TLB flush each). v4: three roots, tables 1..3."""
    for profile, want in (("v12", [0x10_0000_1000] * 3), ("v4", [0x10_0000_1000, 0x10_0000_2000, 0x10_0000_3000])):
        vm = sppjit.VM(profile=profile, vcpus=3)
        vm.init_spp()
        assert [vm.vcpu(i).sppt_root for i in range(3)] == want
        assert [vm.vcpu(i).vmcs.read(SPPTP) for i in range(3)] == [0, 0, 0]
        C.run(vm, [R(0x5000, vcpu=v, exits=[FAULT_R] if v == 0 else []) for v in range(3)], engine)
        assert [vm.vcpu(i).vmcs.read(SPPTP) for i in range(3)] == want
        assert [vm.vcpu(i).vmcs.read(SECONDARY) for i in range(3)] == [0x800002] * 3
        assert int(vm.state.scal[6]) == 3  # SC_TLB_FLUSHES: one per served request
    vm = sppjit.VM(profile="v12", vcpus=3, granularity="page")
    vm.init_spp()
    assert [vm.vcpu(i).sppt_root for i in range(3)] == [None] * 3  # the baseline has no SPPT


@pytest.mark.parametrize("engine", ENGINES)
def test_shared_root_one_tree_for_every_vcpu(engine):
    """Clearing the level-2 entry through vCPU 1's view breaks the tree of every vCPU: vCPU 0
    and vCPU 2 both miss once and the refill serves them all (v4: only vCPU 1 misses, case
    multi_vcpu_miss_on_one_vcpu_only of the conformance table)."""
    vm = sppjit.VM(profile="v12", vcpus=3)
    C.run(vm, [
        C.Init(),
        C.SetMaps(G, (0,)),
        W(GPA, vcpu=0, exits=[FAULT_W, SPP_MISS, SPP_VIOL_V12], outcome=C.SPP_VIOLATION),
        W(GPA, vcpu=1, exits=[SPP_VIOL_V12], outcome=C.SPP_VIOLATION),  # the miss served vCPU 1 too
        R(GPA, vcpu=2),
        lambda vm: vm.poke_sppt(GPA, 2, 0, vcpu=1),
        W(GPA, vcpu=0, exits=[SPP_MISS, SPP_VIOL_V12], outcome=C.SPP_VIOLATION),
        W(GPA, vcpu=2, exits=[SPP_VIOL_V12], outcome=C.SPP_VIOLATION),
    ], engine)


# ====================================================================== SPPT construction
@pytest.mark.parametrize("engine", ENGINES)
def test_miss_fills_block(engine):
    """v12: set builds nothing and the fault path builds nothing; the first eligible write in
    the 2 MiB block takes an SPPT miss (66, 0x800) whose handler fills the leaves of every
    protected gfn of the block, so a write to ANOTHER protected gfn of the block takes no miss.
    gfn G+2 is FULL: its leaf is left as it is (a fresh table: 0), it is never consulted."""
    vm = sppjit.VM(profile="v12")
    res = C.run(vm, [
        C.Init(),
        C.SetMaps(G, (0x0000FFFF,)),
        C.SetMaps(G + 1, (0,)),
        C.SetMaps(G + 0x10, (0xFFFF0000,)),
        lambda vm: assert_no_sppt(vm),
        W(sub(G, 0), exits=[FAULT_W, SPP_MISS]),  # sub-page 0 writable after the fill
        W(sub(G + 1, 5), exits=[FAULT_W, SPP_VIOL_V12], outcome=C.SPP_VIOLATION),
        W(sub(G + 0x10, 31), exits=[FAULT_W]),
        W(sub(G + 0x10, 0), exits=[SPP_VIOL_V12], outcome=C.SPP_VIOLATION),
        W(sub(G + 2, 0), exits=[FAULT_W]),  # FULL: W=1, no SPP
        W(sub(G, 15)),
    ], engine)
    assert [sppt_path(vm, (G + k) << 12)[-1]["value"] for k in (0, 1, 0x10, 2)] == [
        0x55555555, 0, 0x5555555500000000, 0]
    assert res.summary["exits"]["spp_miss"] == 1
    assert res.summary["pages"]["sppt_tables"] == 4  # root, level 3, level 2, level 1


def assert_no_sppt(vm):
    """set built nothing: the shared root (table 1) is still all zeros."""
    assert not vm.state.tables[1].any()


@pytest.mark.parametrize("engine", ENGINES)
def test_v4_builds_at_fault_time(engine):
    """The same steps under v4: the fault path builds every vCPU's SPPT: never a miss."""
    vm = sppjit.VM(profile="v4")
    C.run(vm, [
        C.Init(),
        C.SetMaps(G, (0x0000FFFF,)),
        C.SetMaps(G + 1, (0,)),
        W(sub(G, 0), exits=[FAULT_W]),
        W(sub(G + 1, 5), exits=[FAULT_W, SPP_VIOL_V4], outcome=C.SPP_VIOLATION),
    ], engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_set_flushes_l2e(engine):
    """v12 set on a mapped page (or any gfn of the block) clears bit 0 of the level-2 SPPT entry
    covering it, so the next eligible write misses again; the refill re-sets that entry's bit 0
    and re-uses its level-1 table (still 4 SPPT tables)."""
    vm = sppjit.VM(profile="v12")
    seen = {}

    def l2e(vm):
        path = sppt_path(vm, GPA)
        assert [e["level"] for e in path] == [4, 3, 2]  # the walk stops at the cleared L2E
        assert not path[2]["present"]
        assert path[2]["address"] == seen["l1"]  # only bit 0 was cleared

    def remember(vm):
        path = sppt_path(vm, GPA)
        assert path[2]["present"]
        seen["l1"] = path[2]["address"]

    res = C.run(vm, [
        C.Init(),
        C.SetMaps(G, (0x0000FFFF,)),
        W(sub(G, 0), exits=[FAULT_W, SPP_MISS]),
        W(sub(G, 1)),
        remember,
        C.SetMaps(G + 1, (0,)),  # an unmapped neighbour in the same block: same L2E
        l2e,
        W(sub(G, 0), exits=[SPP_MISS]),
        C.SetMaps(G, (0xFFFF0000,)),  # the mapped page itself: still W=0 + bit 61
        l2e,
        lambda vm: check_leaf(vm, GPA, w=False, spp=True),
        W(sub(G, 0), exits=[SPP_MISS, SPP_VIOL_V12], outcome=C.SPP_VIOLATION),
        W(sub(G, 16)),
    ], engine)
    assert res.summary["pages"]["sppt_tables"] == 4
    assert sppt_path(vm, GPA)[2]["address"] == seen["l1"]


def check_leaf(vm, gpa, w, spp):
    e = ept_leaf(vm, gpa)
    assert (e["w"], e["spp"]) == (w, spp), e


# ====================================================================== FULL leaves W off
@pytest.mark.parametrize("engine", ENGINES)
def test_full_leaves_w_off(engine):
    """v12 set FULL on a protected mapped page: bit 61 off and W off; the next write takes one
    wp_fault (48, 0x1AA: cum R|X) that sets W; later writes pass. v4: W on at once."""
    vm = sppjit.VM(profile="v12")
    C.run(vm, [
        C.Init(),
        C.SetMaps(G, (0,)),
        W(sub(G, 3), exits=[FAULT_W, SPP_MISS, SPP_VIOL_V12], outcome=C.SPP_VIOLATION),
        C.SetMaps(G, (FULL,)),
        lambda vm: check_leaf(vm, GPA, w=False, spp=False),
        W(sub(G, 3), exits=[WP_FAULT]),
        lambda vm: check_leaf(vm, GPA, w=True, spp=False),
        W(sub(G, 3)),
    ], engine)
    vm = sppjit.VM(profile="v4")
    C.run(vm, [
        C.Init(),
        C.SetMaps(G, (0,)),
        W(sub(G, 3), exits=[FAULT_W, SPP_VIOL_V4], outcome=C.SPP_VIOLATION),
        C.SetMaps(G, (FULL,)),
        lambda vm: check_leaf(vm, GPA, w=True, spp=False),
        W(sub(G, 3)),
    ], engine)


# ====================================================================== KVM_EXIT_SPP = 29
@pytest.mark.parametrize("engine", ENGINES)
def test_exit_spp_29_selftest(engine):
    """The v12 selftest (docs/semantics.md §8.2): memslot at gpa 0x10000000, map 0, 32 stores of
    4 bytes one per sub-page: each is KVM_EXIT_SPP (29), the first after the fault-in and the
    SPPT miss; userspace skips the instruction (write dropped). Then map FULL: the first store
    takes the wp_fault (v12 left W off), the rest pass with no exit."""
    vm = sppjit.VM(profile="v12", memslots=[(0x10000, 16)])
    page = 0x10000000
    stores = [W(page + 128 * i, size=4, exits=[SPP_VIOL_V12], outcome=C.SPP_VIOLATION) for i in range(32)]
    stores[0] = W(page, size=4, exits=[FAULT_W, SPP_MISS, SPP_VIOL_V12], outcome=C.SPP_VIOLATION)
    again = [W(page + 128 * i, size=4) for i in range(32)]
    again[0] = W(page, size=4, exits=[WP_FAULT])
    assert vm.ioctl(KVM_ENABLE_CAP, enable_cap_buf()) == 0
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, v12_buf(page >> 12, 1, maps=(0,))) == 1
    buf = v12_buf(page >> 12, 1, maps=(0xAB,))
    assert vm.ioctl(B.KVM_SUBPAGES_GET_ACCESS, buf) == 1 and struct.unpack("<QIII", buf)[3] == 0
    res = C.run(vm, stores, engine)
    assert res.summary["counts"]["spp_violation"] == 32
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, v12_buf(page >> 12, 1, maps=(FULL,))) == 1
    res = C.run(vm, again, engine)
    assert res.summary["exits"]["spp_violation"] == 0


# ====================================================================== huge pages
@pytest.mark.parametrize("engine", ENGINES)
def test_huge_pages_v4_leave_protected_gfns_writable_v12_does_not(engine):
    """The same replay under both profiles, hugepages=True: gfn 0x201 protected (map 0); region
    0x200..0x3FF fits the 4 GiB slot. v4 maps it with one 2 MiB RWX leaf: the write passes and
    the summary counts 1 protected gfn left writable. v12 caps the region to 4 KiB: the write
    faults in a W=0 + bit 61 leaf, misses, and is a violation; nothing left writable. Region
    0x400..0x5FF has no protected gfn: a 2 MiB leaf under both profiles."""
    steps = lambda w201: [  # noqa: E731
        C.Init(),
        C.SetMaps(0x201, (0,)),
        w201,
        R(0x400000, exits=[FAULT_R]),
        R(0x5FF000),
    ]
    res = C.run(sppjit.VM(profile="v4", hugepages=True), steps(W(0x201000, exits=[FAULT_W])), engine)
    p = res.summary["pages"]
    assert (p["protected"], p["protected_left_writable"], p["mapped_2m"], p["mapped_4k"]) == (1, 1, 2, 0)
    vm = sppjit.VM(profile="v12", hugepages=True)
    res = C.run(vm, steps(W(0x201000, exits=[FAULT_W, SPP_MISS, SPP_VIOL_V12], outcome=C.SPP_VIOLATION)), engine)
    p = res.summary["pages"]
    assert (p["protected"], p["protected_left_writable"], p["mapped_2m"], p["mapped_4k"]) == (1, 0, 1, 1)
    assert res.summary["counts"]["spp_violation"] == 1
    assert ept_leaf(vm, 0x201000)["level"] == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_huge_leaf_zapped_by_v12_set(engine):
    """v12 set of a protected map on a gfn under a 2 MiB leaf zaps the leaf; the region re-faults
    at 4 KiB (it holds a protected gfn now). A FULL set under a huge leaf changes nothing.
    v4 keeps the leaf (conformance case huge_set_inside_huge_leaf_is_lazy)."""
    vm = sppjit.VM(profile="v12", hugepages=True)
    res = C.run(vm, [
        C.Init(),
        R(0x600000, exits=[FAULT_R]),
        C.SetMaps(0x610, (FULL,)),
        lambda vm: (ept_leaf(vm, 0x600000)["level"] == 2) or pytest.fail("FULL set zapped the leaf"),
        R(0x6FF000),
        C.SetMaps(0x605, (0,)),
        R(0x600000, exits=[FAULT_R]),
        W(0x605000, exits=[FAULT_W, SPP_MISS, SPP_VIOL_V12], outcome=C.SPP_VIOLATION),
        W(0x606000, exits=[FAULT_W]),
    ], engine)
    p = res.summary["pages"]
    assert (p["mapped_2m"], p["mapped_4k"], p["protected_left_writable"]) == (0, 3, 0)


# ====================================================================== memslot free quirk
@pytest.mark.parametrize("engine", ENGINES)
def test_memslot_free_quirk(engine):
    """v12: deleting ANY memslot clears spp_active for the whole VM (warned about). Set/get then
    fail with ENODEV. Leaves already marked keep bit 61 and the loaded SPPT, so the protected
    page of the surviving slot is still refused (nothing walks the EPT to undo the marks).
    The deleted slot's gfns are MMIO (48, then 49). Enabling again gives fresh FULL maps."""
    vm = sppjit.VM(profile="v12", memslots=[(0, 0x400), (0x1000, 0x400)])
    C.run(vm, [
        C.Init(),
        C.SetMaps(0x10, (0,)),
        W(0x10000, exits=[FAULT_W, SPP_MISS, SPP_VIOL_V12], outcome=C.SPP_VIOLATION),
        R(0x1000000, exits=[FAULT_R]),
    ], engine)
    with pytest.warns(SppQuirkWarning, match="spp_active"):
        assert vm.delete_memslot(0x1234) == 1
    assert not vm.spp_active
    for call in (lambda: vm.set_subpages(0x10, [FULL]), lambda: vm.get_subpages(0x10, 1)):
        with pytest.raises(sppjit.SppError) as ei:
            call()
        assert ei.value.errno == ENODEV
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, v12_buf(0x10, 1, maps=(FULL,))) == -ENODEV
    C.run(vm, [
        W(0x10000, exits=[SPP_VIOL_V12], outcome=C.SPP_VIOLATION),
        R(0x1000000, exits=[C.MMIO_FIRST_R], outcome=C.MMIO),
        R(0x1000000, exits=[C.MMIO_LATER], outcome=C.MMIO),
    ], engine)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SPP is already off: no second warning
        assert vm.delete_memslot(0x10) == 0
    assert vm.init_spp() == 0 and vm.spp_active


def test_memslot_free_v4_keeps_spp():
    vm = sppjit.VM(profile="v4", memslots=[(0, 0x400), (0x1000, 0x400)])
    vm.init_spp()
    vm.set_subpages(0x10, [0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vm.delete_memslot(0x1000) == 1
    assert vm.spp_active
    assert vm.get_subpages(0x10, 1).tolist() == [0]
    with pytest.raises(sppjit.SppError) as ei:
        vm.get_subpages(0x1000, 1)
    assert ei.value.errno == EFAULT


def test_page_granularity_v12_has_no_quirk():
    vm = sppjit.VM(profile="v12", granularity="page", memslots=[(0, 0x400), (0x1000, 0x400)])
    vm.init_spp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vm.delete_memslot(0x1000)
    assert vm.spp_active


def test_v12_profile_in_config():
    vm = sppjit.VM(profile="v12")
    assert vm.config.profile == "v12"
    with pytest.raises(sppjit.InputError):
        sppjit.VM(profile="v13")
    assert errno.ENOTTY == ENOTTY


@pytest.mark.parametrize("engine", ENGINES)
def test_kvm_exit_spp_carries_the_instruction_length(engine):
    """v12: KVM_EXIT_SPP (29) reports VM_EXIT_INSTRUCTION_LEN; traces give it per access in the
    optional insn_len column (0 = unknown), and the exit log carries it."""
    vm = sppjit.VM(memory="64MiB", profile="v12")
    vm.init_spp()
    vm.set_subpages(G, [0])
    trace = {"gpa": np.array([GPA, GPA + 0x80, GPA + 8], dtype=np.uint64),
             "insn_len": np.array([3, 7, 0], dtype=np.uint8)}
    res = vm.replay(trace, engine=engine)
    rows = [(e["row"], e["kind"], e["userspace_exit"], e["insn_len"]) for e in res.exits.to_pylist()]
    assert rows == [(0, "ept_fault", 0, 3), (0, "spp_miss", 0, 3), (0, "spp_violation", 29, 3),
                    (1, "spp_violation", 29, 7), (2, "spp_violation", 29, 0)]
    assert vm.vcpu(0).vmcs.read(B.VM_EXIT_INSTRUCTION_LEN) == 0  # the last exit's


def test_instruction_length_is_checked():
    vm = sppjit.VM(memory="64MiB", profile="v12")
    with pytest.raises(sppjit.InputError, match=r"column 'insn_len' has value 16 at row 1"):
        vm.replay({"gpa": np.array([0, 8], dtype=np.uint64), "insn_len": np.array([1, 16], dtype=np.uint8)})
