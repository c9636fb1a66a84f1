"""The KVM series' own selftest (tools/testing/selftests/kvm/x86_64/spp_test.c,
docs/semantics.md §8.2), replayed on the v4 model with both engines.

One vCPU; memslot of 16 pages at GPA 0x10000000; SET_ACCESS of one page with map 0 must return 1,
GET must return 1 with access_map[0] == 0; 32 four-byte stores at offsets 0, 128, ..., 3968 (one
per sub-page) must each end in KVM_EXIT_SPP (28 in v4); after SET_ACCESS 0xFFFFFFFF the same 32
stores cause no exit. Expected values are by hand: the protected page is unmapped when the guest
first writes it, so the first store is preceded by one EPT fault-in (48, 0x182) that KVM
resolves (docs/semantics.md §3.5, the lazy path); every store is then an EPT violation (48) with
qualification write (2) | cumulative R-X (0b101 << 3) | 0x180 = 0x1AA.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

import sppjit
from sppjit import abi
from sppjit import bits as B

ENGINES = ("reference", "jit")
GPA = 0x10000000
GFN = GPA >> 12  # 0x10000
KVM_EXIT_SPP_V4 = 28


def stores(gpa: int = GPA) -> dict:
    offsets = np.arange(32, dtype=np.uint64) * np.uint64(128)
    assert int(offsets[-1]) == 3968
    return {
        "gpa": np.uint64(gpa) + offsets,
        "size": np.full(32, 4, dtype=np.uint16),  # uint32_t stores
        "vcpu": np.zeros(32, dtype=np.uint16),
        "kind": np.ones(32, dtype=np.uint8),  # writes
    }


def make_vm():
    vm = sppjit.VM(memslots=[(0x10000, 16)])
    assert vm.ioctl(B.KVM_INIT_SPP, 0) == 0
    # SET_ACCESS {gfn_base, npages = 1, access_map[0] = 0} -> 1
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, abi.kvm_subpage(GFN, [0])) == 1
    # GET_ACCESS on the same gfn -> 1 and access_map[0] == 0 (buffer pre-filled with junk)
    buf = bytearray(struct.pack("<QQ64I", GFN, 1, *([0xDEADBEEF] * 64)))
    assert vm.ioctl(B.KVM_SUBPAGES_GET_ACCESS, buf) == 1
    assert struct.unpack_from("<I", buf, 16)[0] == 0
    return vm


@pytest.mark.parametrize("engine", ENGINES)
def test_selftest_scenario(engine):
    vm = make_vm()
    res = vm.replay(stores(), engine=engine)
    ex = res.exits.to_pylist()
    spp = [e for e in ex if e["kind"] == "spp_violation" and e["userspace_exit"] == KVM_EXIT_SPP_V4]
    assert len(spp) == 32
    assert [e["row"] for e in spp] == list(range(32))  # one per store, in order
    assert [e["gpa"] for e in spp] == [GPA + 128 * i for i in range(32)]
    assert all((e["reason"], e["qualification"]) == (48, 0x1AA) for e in spp)
    # the only other exit: the first store's fault-in of the (unmapped) page
    others = [(e["row"], e["reason"], e["qualification"], e["kind"]) for e in ex if e not in spp]
    assert others == [(0, 48, 0x182, "ept_fault")]
    assert res.table["outcome"].to_pylist() == [1] * 32  # SPP_VIOLATION
    assert res.table["exits"].to_pylist() == [2] + [1] * 31
    assert res.table["exit_reason"].to_pylist() == [48] * 32
    assert res.summary["exits"]["spp_violation"] == 32
    assert res.summary["counts"]["spp_violation"] == 32

    # SET_ACCESS access_map[0] = 0xFFFFFFFF; the guest repeats the stores: no VM exit at all.
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, abi.kvm_subpage(GFN, [0xFFFFFFFF])) == 1
    res2 = vm.replay(stores(), engine=engine)
    assert res2.exits.num_rows == 0
    assert res2.table["outcome"].to_pylist() == [0] * 32
    assert res2.table["exits"].to_pylist() == [0] * 32
    assert res2.summary["exits"]["total"] == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_selftest_scenario_page_already_mapped(engine):
    """As in the selftest, the guest has run (GUEST_SYNC) before: with the page already mapped
    when SET_ACCESS arrives, protection applies at once and the exits are exactly the 32 SPP ones."""
    vm = sppjit.VM(memslots=[(0x10000, 16)])
    warm = vm.replay({"gpa": np.array([GPA], dtype=np.uint64), "kind": np.array([0], dtype=np.uint8)}, engine=engine)
    assert [(e["reason"], e["qualification"]) for e in warm.exits.to_pylist()] == [(48, 0x181)]
    assert vm.ioctl(B.KVM_INIT_SPP, 0) == 0
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, abi.kvm_subpage(GFN, [0])) == 1
    res = vm.replay(stores(), engine=engine)
    ex = res.exits.to_pylist()
    assert len(ex) == 32
    assert all((e["kind"], e["userspace_exit"], e["reason"], e["qualification"]) ==
               ("spp_violation", 28, 48, 0x1AA) for e in ex)
    assert res.table["outcome"].to_pylist() == [1] * 32
    assert vm.ioctl(B.KVM_SUBPAGES_SET_ACCESS, abi.kvm_subpage(GFN, [0xFFFFFFFF])) == 1
    assert vm.replay(stores(), engine=engine).exits.num_rows == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_selftest_other_pages_of_the_slot_unaffected(engine):
    vm = make_vm()
    res = vm.replay(stores(GPA + 0x1000), engine=engine)  # gfn 0x10001: not protected
    assert [(e["row"], e["kind"]) for e in res.exits.to_pylist()] == [(0, "ept_fault")]
    assert res.table["outcome"].to_pylist() == [0] * 32
