"""The v4 control plane: init/set/get, their errors (Python API and ioctl), the ABI, lazy and
immediate protection as vm.walk shows it, and a thread-safety smoke test.

Expected values are derived by hand from docs/semantics.md §3 and docs/contract.md §7;
ioctl numbers from the asm-generic _IOC encoding: dir << 30 | size << 16 | type << 8 | nr.
"""

from __future__ import annotations

import errno
import struct
import threading

import numpy as np
import pytest

import sppjit
from sppjit import abi
from sppjit import bits as B
from sppjit import vm as vm_module
from sppjit.errors import InputError

ENGINES = ("reference", "jit")
ENODEV, EINVAL, EFAULT, ENOTTY = 19, 22, 14, 25
FULL = 0xFFFFFFFF
BIT61 = 1 << 61
ADDR_MASK = 0x000F_FFFF_FFFF_F000  # bits 51:12
RX_LEAF = 0x1 | 0x4 | (6 << 3) | 0x40  # R | X | WB << 3 | ignore-PAT = 0x75
RWX_LEAF = 0x7 | (6 << 3) | 0x40  # 0x77
G = 0x1234
GPA = G << 12

# struct kvm_subpage (v4): __u64 base_gfn; __u64 npages; __u32 access_map[64];  little-endian
SUBPAGE_FMT = "<QQ64I"


def subpage_buf(base_gfn: int, npages: int, maps=()) -> bytearray:
    maps = list(maps) + [0] * (64 - len(maps))
    return bytearray(struct.pack(SUBPAGE_FMT, base_gfn, npages, *maps))


def unpack(buf) -> tuple[int, int, list[int]]:
    v = struct.unpack_from(SUBPAGE_FMT, buf)
    return v[0], v[1], list(v[2:])


def spread(m: int) -> int:
    """Hand reference of KVM's format_spp_spte: map bit i -> vector bit 2i."""
    return sum(1 << (2 * i) for i in range(32) if m >> i & 1)


def trace(*rows) -> dict:
    """rows of (gpa, kind[, vcpu[, size]])."""
    rows = [tuple(r) + (0, 8)[len(r) - 2:] for r in rows]
    return {
        "gpa": np.array([r[0] for r in rows], dtype=np.uint64),
        "kind": np.array([r[1] for r in rows], dtype=np.uint8),
        "vcpu": np.array([r[2] for r in rows], dtype=np.uint16),
        "size": np.array([r[3] for r in rows], dtype=np.uint16),
    }


def exits_of(res) -> list[tuple]:
    return [(e["reason"], e["qualification"], e["kind"], e["userspace_exit"]) for e in res.exits.to_pylist()]


def ept_leaf_entry(vm, gpa, vcpu=0) -> dict | None:
    """The present EPT leaf of gpa from vm.walk, None when the walk ends without one."""
    ept = vm.walk(gpa, vcpu=vcpu)["ept"]
    last = ept[-1]
    return last if last["present"] and last["leaf"] else None


def sppt_leaf_value(vm, gpa, vcpu=0) -> int | None:
    sppt = vm.walk(gpa, vcpu=vcpu)["sppt"]
    return int(sppt[-1]["value"]) if sppt and sppt[-1]["level"] == 1 else None


def init_vm(**kw):
    vm = sppjit.VM(**kw)
    assert vm.init_spp() == 0
    return vm


# ====================================================================== ABI
def test_ioctl_numbers_are_the_uapi_encodings():
    # _IOR(KVMIO=0xAE, 0x49, __u64): dir 2 (read) << 30 | 8 << 16 | 0xAE << 8 | 0x49
    assert B.KVM_SUBPAGES_GET_ACCESS == (2 << 30) | (8 << 16) | (0xAE << 8) | 0x49 == 0x8008AE49
    # _IOW: dir 1 (write)
    assert B.KVM_SUBPAGES_SET_ACCESS == (1 << 30) | (8 << 16) | (0xAE << 8) | 0x4A == 0x4008AE4A
    assert B.KVM_INIT_SPP == (1 << 30) | (8 << 16) | (0xAE << 8) | 0x4B == 0x4008AE4B


def test_struct_kvm_subpage_layout():
    assert struct.calcsize(SUBPAGE_FMT) == 8 + 8 + 64 * 4 == 272
    assert abi.KVM_SUBPAGE_V4.itemsize == 272
    assert abi.KVM_SUBPAGE_V4.fields["base_gfn"][1] == 0
    assert abi.KVM_SUBPAGE_V4.fields["npages"][1] == 8
    assert abi.KVM_SUBPAGE_V4.fields["access_map"][1] == 16
    maps = [0, 0xFFFFFFFF, 0x12345678]
    buf = abi.kvm_subpage(0x10000, maps)
    assert isinstance(buf, bytearray) and len(buf) == 272
    assert bytes(buf) == struct.pack(SUBPAGE_FMT, 0x10000, 3, *(maps + [0] * 61))
    assert bytes(abi.kvm_subpage(7, [1], npages=65))[8:16] == (65).to_bytes(8, "little")


def test_spp_error_is_an_oserror():
    assert issubclass(sppjit.SppError, OSError)
    vm = sppjit.VM()
    with pytest.raises(OSError) as ei:
        vm.set_subpages(0, [0])
    assert isinstance(ei.value, sppjit.SppError)
    assert ei.value.errno == errno.ENODEV == ENODEV


# ====================================================================== errors
def test_enodev_before_init():
    vm = sppjit.VM()
    with pytest.raises(sppjit.SppError) as ei:
        vm.set_subpages(0x10, [0])
    assert ei.value.errno == ENODEV
    with pytest.raises(sppjit.SppError) as ei:
        vm.get_subpages(0x10, 1)
    assert ei.value.errno == ENODEV
    buf = subpage_buf(0x10, 1, [0])
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, buf) == -ENODEV
    buf = subpage_buf(0x10, 1, [0xABCD])
    assert vm.ioctl(B.KVM_SUBPAGES_GET_ACCESS, buf) == -ENODEV
    assert unpack(buf)[2][0] == 0xABCD  # nothing copied back
    # ENODEV comes before the copy and argument checks (v4 wrapper order)
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, bytearray(8)) == -ENODEV
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, subpage_buf(0x10, 0)) == -ENODEV
    with pytest.raises(sppjit.SppError) as ei:
        vm.set_subpages(0x10, [0] * 65)
    assert ei.value.errno == ENODEV


def test_without_spp_support():
    vm = sppjit.VM(spp_supported=False)
    with pytest.raises(sppjit.SppError) as ei:
        vm.init_spp()
    assert ei.value.errno == ENODEV
    # v4 NULLs the x86_ops and its ioctl wrapper answers -EINVAL.
    assert vm.ioctl(B.KVM_INIT_SPP, 0) == -EINVAL
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, subpage_buf(0x10, 1, [0])) == -ENODEV
    with pytest.raises(sppjit.SppError) as ei:
        vm.set_subpages(0x10, [0])
    assert ei.value.errno == ENODEV
    assert vm.vcpu(0).sppt_root is None


def test_einval_for_0_or_65_pages():
    vm = init_vm()
    for call in (lambda: vm.set_subpages(0x10, []), lambda: vm.set_subpages(0x10, [0] * 65),
                 lambda: vm.get_subpages(0x10, 0), lambda: vm.get_subpages(0x10, 65)):
        with pytest.raises(sppjit.SppError) as ei:
            call()
        assert ei.value.errno == EINVAL
    for req in (B.KVM_SUBPAGES_SET_ACCESS, B.KVM_SUBPAGES_GET_ACCESS):
        assert vm.ioctl(req, subpage_buf(0x10, 0)) == -EINVAL
        assert vm.ioctl(req, subpage_buf(0x10, 65)) == -EINVAL
    # nothing was applied by the refused calls
    assert list(vm.get_subpages(0x10, 1)) == [FULL]
    # the limit itself is fine
    assert vm.set_subpages(0x10, list(range(64))) == 64
    assert list(vm.get_subpages(0x10, 64)) == list(range(64))
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, subpage_buf(0x100, 64, [5] * 64)) == 64


def test_efault_keeps_the_earlier_pages():
    vm = init_vm(memslots=[(0x100, 2)])
    with pytest.raises(sppjit.SppError) as ei:
        vm.set_subpages(0x100, [0x11, 0x22, 0x33])  # gfn 0x102 has no memslot
    assert ei.value.errno == EFAULT
    assert list(vm.get_subpages(0x100, 2)) == [0x11, 0x22]  # no rollback
    with pytest.raises(sppjit.SppError) as ei:
        vm.get_subpages(0x100, 3)
    assert ei.value.errno == EFAULT
    with pytest.raises(sppjit.SppError) as ei:
        vm.set_subpages(0x200, [0])
    assert ei.value.errno == EFAULT


def test_efault_through_ioctl():
    vm = sppjit.VM(memslots=[(0x100, 2)])
    assert vm.ioctl(B.KVM_INIT_SPP, 0) == 0
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, subpage_buf(0x101, 2, [0x44, 0x55])) == -EFAULT
    buf = subpage_buf(0x100, 2, [7, 7])
    assert vm.ioctl(B.KVM_SUBPAGES_GET_ACCESS, buf) == 2
    assert unpack(buf)[2][:2] == [FULL, 0x44]
    assert vm.ioctl(B.KVM_SUBPAGES_GET_ACCESS, subpage_buf(0x101, 2)) == -EFAULT


@pytest.mark.parametrize("profile", ("v4", "v12"))
def test_get_subpages_refuses_bad_npages_with_einval_before_allocating(profile):
    """KVM answers EINVAL to an npages its limit refuses, whatever the value: 2**40 must not
    try to allocate the answer (it raised MemoryError), -1 (2**64-1 in the u64 field, and
    beyond 512 in v12's u32) must not reach numpy (ValueError)."""
    vm = init_vm(profile=profile)
    for npages in (2**40, -1, 2**64, 513):
        with pytest.raises(sppjit.SppError) as ei:
            vm.get_subpages(0, npages)
        assert ei.value.errno == EINVAL, npages


@pytest.mark.parametrize("profile", ("v4", "v12"))
def test_non_integral_arguments_are_refused_not_truncated(profile):
    """1.5 pages is no integer a C caller could pass: EINVAL (it gave a false EFAULT after
    reading one page). Float gfns and maps with a fraction are refused (they were truncated
    silently: gfn 16.9 read gfn 16); integral floats are taken at their value."""
    vm = init_vm(profile=profile)
    vm.set_subpages(0x10, [0x1234])
    for call in (lambda: vm.get_subpages(0x10, 1.5), lambda: vm.get_subpages(16.9, 1),
                 lambda: vm.set_subpages(16.5, [0]), lambda: vm.get_subpages(float("nan"), 1),
                 lambda: vm.get_subpages("16", 1), lambda: vm.get_subpages(-1, 1)):
        with pytest.raises(sppjit.SppError) as ei:
            call()
        assert ei.value.errno == EINVAL
    for maps in ([0.5], [1.0, 2.5], [float("inf")], np.array([3.25]), [-1], [2**32], ["7"], [None]):
        with pytest.raises(InputError):
            vm.set_subpages(0x11, maps)
    assert vm.get_subpages(0x10, 2).tolist() == [0x1234, FULL]  # nothing of that was applied
    assert vm.get_subpages(16.0, 1.0).tolist() == [0x1234]
    assert vm.set_subpages(np.uint64(0x11), np.array([7.0])) == 1
    assert vm.get_subpages(np.int32(0x11), np.int64(1)).tolist() == [7]
    for gfns, maps in (([32.5], [0]), ([-1], [0]), ([0x20], [1.5]), (["x"], [0])):
        with pytest.raises(InputError):
            vm.protect(gfns, maps)
    assert vm.get_subpages(0x20, 1).tolist() == [FULL]
    assert vm.protect(np.array([32.0]), [3]) == 1 and vm.get_subpages(0x20, 1).tolist() == [3]


@pytest.mark.parametrize("profile", ("v4", "v12"))
def test_ioctl_with_a_non_contiguous_buffer_is_efault(profile):
    """A strided buffer is not one piece of user memory: copy_from_user fails, -EFAULT (it
    raised TypeError)."""
    vm = init_vm(profile=profile)
    if profile == "v4":
        good = np.frombuffer(subpage_buf(0x10, 1, [0x55]), dtype=np.uint8)
    else:
        good = np.frombuffer(abi.kvm_subpage(0x10, [0x55], profile="v12"), dtype=np.uint8)
    strided = np.zeros(2 * good.size, dtype=np.uint8)
    strided[::2] = good
    for req in (B.KVM_SUBPAGES_SET_ACCESS, B.KVM_SUBPAGES_GET_ACCESS):
        assert vm.ioctl(req, strided[::2]) == -EFAULT
        assert vm.ioctl(req, memoryview(strided)[::2]) == -EFAULT
    cap = np.zeros(2 * abi.KVM_ENABLE_CAP_STRUCT.itemsize, dtype=np.uint8)
    assert vm.ioctl(B.KVM_ENABLE_CAP, cap[::2]) == -EFAULT
    assert vm.get_subpages(0x10, 1).tolist() == [FULL]
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, good.copy()) == 1  # the same bytes, contiguous


def test_init_twice_returns_0():
    vm = sppjit.VM()
    assert vm.init_spp() == 0
    vm.set_subpages(0x10, [0x1])
    assert vm.init_spp() == 0
    assert vm.ioctl(B.KVM_INIT_SPP, 0) == 0
    assert list(vm.get_subpages(0x10, 1)) == [0x1]  # "0 if already active": nothing re-created
    vm2 = sppjit.VM()
    assert vm2.ioctl(B.KVM_INIT_SPP, 0) == 0
    assert vm2.ioctl(B.KVM_INIT_SPP, 0) == 0
    assert list(vm2.get_subpages(0, 3)) == [FULL] * 3  # maps are created filled with FULL


def test_ioctl_set_get_roundtrip():
    vm = init_vm(memslots=[(0x10000, 16)])
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, subpage_buf(0x10002, 3, [0, 0xF0F0F0F0, FULL])) == 3
    buf = subpage_buf(0x10001, 5, [9] * 64)
    assert vm.ioctl(B.KVM_SUBPAGES_GET_ACCESS, buf) == 5
    base, n, maps = unpack(buf)
    assert (base, n) == (0x10001, 5)
    assert maps[:5] == [FULL, 0, 0xF0F0F0F0, FULL, FULL]
    assert maps[5:] == [9] * 59  # only npages entries are copied back
    assert list(vm.get_subpages(0x10002, 2)) == [0, 0xF0F0F0F0]


def test_ioctl_short_buffer_and_unknown_request():
    vm = init_vm()
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, bytearray(271)) == -EFAULT
    assert vm.ioctl(B.KVM_SUBPAGES_GET_ACCESS, bytearray(16)) == -EFAULT
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, None) == -EFAULT
    # GET cannot copy the result into a read-only buffer
    assert vm.ioctl(B.KVM_SUBPAGES_GET_ACCESS, bytes(subpage_buf(0x10, 1))) == -EFAULT
    assert vm.ioctl(0xDEADBEEF, subpage_buf(0x10, 1)) == -ENOTTY
    assert vm.ioctl((2 << 30) | (8 << 16) | (0xAE << 8) | 0x4C, subpage_buf(0x10, 1)) == -ENOTTY


def test_eptp_format():
    vm = sppjit.VM()
    eptp = vm.vcpu(0).vmcs.read(0x201A)
    assert eptp & 0x7 == 6  # WB
    assert (eptp >> 3) & 0x7 == 3  # 4-level walk
    assert eptp & 0xFC0 == 0
    assert eptp & ADDR_MASK != 0


# ====================================================================== lazy and immediate protection
def test_walk_with_spp_active():
    """Regression: vm.walk of a gfn inside a memslot while SPP is active used to raise IndexError
    (sppjit/walk.py indexed the maps with int64 + uint64 arithmetic, i.e. a float64)."""
    vm = init_vm(memslots=[(0x100, 4), (0x1000, 0x2000)])
    vm.set_subpages(0x1234, [0x00FF00FF])
    w = vm.walk(0x1234 << 12)
    assert w["gfn"] == 0x1234 and w["memslot"] == 1
    assert int(w["access_map"], 16) == 0x00FF00FF
    assert int(vm.walk(0x102 << 12)["access_map"], 16) == FULL


@pytest.mark.parametrize("engine", ENGINES)
def test_set_on_unmapped_gfn_is_lazy(engine):
    vm = init_vm()
    vm.replay(trace((0x5000, 0)), engine=engine)  # vCPU 0 enters (SPPTP loaded)
    assert vm.set_subpages(G, [0x0000FFFF]) == 1
    assert ept_leaf_entry(vm, GPA) is None  # EPT untouched
    assert sppt_leaf_value(vm, GPA) is None  # and no SPPT path yet
    # The first write (sub-page 0, writable) faults the page in with W=0 and bit 61.
    res = vm.replay(trace((GPA, 1)), engine=engine)
    assert exits_of(res) == [(48, 0x182, "ept_fault", 0)]
    assert res.table["outcome"].to_pylist() == [0]
    leaf = ept_leaf_entry(vm, GPA)
    assert leaf is not None and leaf["level"] == 1
    assert (leaf["r"], leaf["w"], leaf["x"], leaf["spp"]) == (True, False, True, True)
    assert leaf["value"] & ~ADDR_MASK == RX_LEAF | BIT61
    assert sppt_leaf_value(vm, GPA) == 0x55555555  # sub-pages 0..15 -> even bits 0..30


@pytest.mark.parametrize("engine", ENGINES)
def test_set_on_mapped_page_applies_at_once_for_every_vcpu(engine):
    vm = init_vm(vcpus=3)
    vm.replay(trace((GPA, 0, 0)), engine=engine)  # vCPU 0 enters and maps G (unprotected)
    before = ept_leaf_entry(vm, GPA)
    assert before["w"] and not before["spp"]
    assert before["value"] & ~ADDR_MASK == RWX_LEAF
    m = 0b1010_0101  # sub-pages 0, 2, 5, 7
    assert vm.set_subpages(G, [m]) == 1
    after = ept_leaf_entry(vm, GPA)
    assert (after["w"], after["spp"], after["r"], after["x"]) == (False, True, True, True)
    assert after["value"] == (before["value"] & ~0x2) | BIT61  # same page, W cleared, bit 61 set
    # vCPUs 1 and 2 enter afterwards (a read elsewhere): their own trees hold the same vector.
    vm.replay(trace((0x9000, 0, 1), (0x9000, 0, 2)), engine=engine)
    want = (1 << 0) | (1 << 4) | (1 << 10) | (1 << 14)
    assert want == 0x4411 == spread(m)
    roots = set()
    for v in range(3):
        assert sppt_leaf_value(vm, GPA, vcpu=v) == 0x4411
        roots.add(vm.walk(GPA, vcpu=v)["sppt"][0]["address"])
    assert len(roots) == 3  # three separate level-3 tables: one tree per vCPU


@pytest.mark.parametrize("engine", ENGINES)
def test_set_full_on_protected_mapped_page(engine):
    vm = init_vm()
    vm.set_subpages(G, [0x80000001])
    vm.replay(trace((GPA, 0)), engine=engine)
    leaf = ept_leaf_entry(vm, GPA)
    assert (leaf["w"], leaf["spp"]) == (False, True)
    assert sppt_leaf_value(vm, GPA) == 0x4000000000000001  # bit 31 -> 62, bit 0 -> 0
    vm.set_subpages(G, [FULL])
    leaf2 = ept_leaf_entry(vm, GPA)
    assert (leaf2["w"], leaf2["spp"]) == (True, False)
    assert leaf2["value"] == (leaf["value"] & ~BIT61) | 0x2
    assert leaf2["value"] & ~ADDR_MASK == RWX_LEAF
    res = vm.replay(trace((GPA + 0x100, 1)), engine=engine)
    assert exits_of(res) == []


def test_set_inside_a_huge_leaf_changes_nothing():
    vm = init_vm(hugepages=True)
    vm.replay(trace((0x400000, 0)))
    vm.set_subpages(0x405, [0])
    leaf = ept_leaf_entry(vm, 0x405000)
    assert leaf["level"] == 2 and leaf["w"] and not leaf["spp"]
    assert list(vm.get_subpages(0x405, 1)) == [0]  # the map is stored all the same


def test_page_granularity_set_clears_w_without_bit61():
    vm = init_vm(granularity="page")
    vm.replay(trace((GPA, 0)))
    vm.set_subpages(G, [0xFFFFFFFE])
    leaf = ept_leaf_entry(vm, GPA)
    assert (leaf["w"], leaf["spp"]) == (False, False)
    vm.set_subpages(G, [FULL])
    assert ept_leaf_entry(vm, GPA)["w"]


# ====================================================================== thread safety
POOL_HPA = 0x10_0000_0000


def raw_state(vm, gfns):
    """(EPT leaf, SPPT vector of vCPU 0 or None) per gfn, read from the table pool directly."""
    from sppjit.stats import ept_leaves

    leaves, levels, _ = ept_leaves(vm.state, np.asarray(gfns, dtype=np.uint64))
    out = []
    for gfn, leaf, level in zip(gfns, leaves, levels):
        hpa, vec = vm.vcpu(0).sppt_root, None
        for lvl in (4, 3, 2):
            e = int(vm.state.tables[(hpa - POOL_HPA) >> 12][(gfn >> (9 * (lvl - 1))) & 511])
            if not e & 1:
                break
            hpa = e & ADDR_MASK
        else:
            vec = int(vm.state.tables[(hpa - POOL_HPA) >> 12][gfn & 511])
        out.append((int(leaf), int(level), vec))
    return out


def test_set_subpages_from_threads_matches_sequential():
    calls = []  # (thread, base_gfn, maps)
    for t in range(4):
        for c in range(8):
            base = 0x10000 * (t + 1) + 16 * c
            maps = [((base + k) * 2654435761) & 0xFFFFFFFF if (base + k) % 5 else FULL for k in range(16)]
            calls.append((t, base, maps))
    mapped = [base + k for _, base, _ in calls for k in range(0, 16, 2)]  # half the pages pre-mapped

    def make():
        vm = init_vm()
        rows = [(g << 12, 0) for g in mapped]
        vm.replay(trace(*rows))
        return vm

    seq = make()
    for _, base, maps in calls:
        assert seq.set_subpages(base, maps) == 16

    par = make()
    barrier = threading.Barrier(4)
    errors = []

    def worker(t):
        try:
            barrier.wait()
            for tt, base, maps in calls:
                if tt == t:
                    assert par.set_subpages(base, maps) == 16
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors

    gfns = [base + k for _, base, _ in calls for k in range(16)]
    want_maps = [m for _, _, maps in calls for m in maps]
    for vm in (seq, par):
        got = np.concatenate([vm.get_subpages(base, 16) for _, base, _ in calls])
        assert got.tolist() == want_maps
    s, p = raw_state(seq, gfns), raw_state(par, gfns)
    assert s == p
    # and both are right: mapped + protected pages are W=0 + bit 61 with the spread vector
    for gfn, m, (leaf, level, vec) in zip(gfns, want_maps, p):
        if gfn in set(mapped):
            assert level == 1
            if m == FULL:
                assert leaf & 0x2 and not leaf & BIT61
            else:
                assert not leaf & 0x2 and leaf & BIT61 and vec == spread(m)
        else:
            assert level == 0


def test_table_pool_starts_with_room_for_the_whole_ept(monkeypatch):
    # 3 GiB in two slots: 1536 level-1 tables and a few above; a guest touching all of it at
    # 4 KiB never has its pool copied. The reservation is capped, and can be chosen.
    vm = sppjit.VM(memslots=[(0, 1 << 18), (1 << 20, 1 << 19)])
    assert vm.state.tables.shape[0] >= 1536 + 4
    monkeypatch.setattr(vm_module, "MAX_INITIAL_TABLES", 1500)
    assert sppjit.VM(memory="4GiB").state.tables.shape[0] == 1500
    assert sppjit.VM(memory="16MiB", table_capacity=3).state.tables.shape[0] == 3
    with pytest.raises(InputError, match="table_capacity"):
        sppjit.VM(table_capacity=0)
