"""sppjit.bits: the map <-> SPP vector conversions and the numbers the model is built on.

Every expected value is written out from docs/semantics.md §1-§3 and docs/contract.md or
computed by the naive loop below, never taken from the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from sppjit import bits as B

FULL_MAP = 0xFFFFFFFF
FULL_VEC = 0x5555555555555555


def naive_vector(m: int) -> int:
    """map bit i -> vector bit 2i (KVM format_spp_spte, written as a plain loop)."""
    v = 0
    for i in range(32):
        if (m >> i) & 1:
            v |= 1 << (2 * i)
    return v


def naive_map(v: int) -> int:
    """vector even bit 2i -> map bit i; odd bits ignored."""
    m = 0
    for i in range(32):
        if (v >> (2 * i)) & 1:
            m |= 1 << i
    return m


# ---------------------------------------------------------------- conversions, scalars
@pytest.mark.parametrize("i", range(32))
def test_single_bit_maps(i):
    assert B.access_map_to_vector(1 << i) == 1 << (2 * i)
    assert B.vector_to_access_map(1 << (2 * i)) == 1 << i
    assert B.vector_to_access_map(1 << (2 * i + 1)) == 0  # odd (reserved) bits are dropped


def test_zero_and_full():
    assert B.access_map_to_vector(0) == 0
    assert B.vector_to_access_map(0) == 0
    assert B.access_map_to_vector(FULL_MAP) == FULL_VEC
    assert B.vector_to_access_map(FULL_VEC) == FULL_MAP
    assert B.FULL_SPP_ACCESS == FULL_MAP
    assert B.FULL_SPP_VECTOR == FULL_VEC


def test_known_values():
    assert B.access_map_to_vector(0x0000FFFF) == 0x55555555
    assert B.access_map_to_vector(0xFFFF0000) == 0x5555555500000000
    assert B.access_map_to_vector(0x80000001) == 0x4000000000000001
    assert B.access_map_to_vector(0b1010_0101) == 0x4411
    assert B.access_map_to_vector(0xAAAAAAAA) == 0x4444444444444444
    assert B.vector_to_access_map(0x4444444444444444) == 0xAAAAAAAA


def test_vector_to_map_drops_odd_bits():
    assert B.vector_to_access_map(0xAAAAAAAAAAAAAAAA) == 0
    assert B.vector_to_access_map(0xFFFFFFFFFFFFFFFF) == FULL_MAP
    assert B.vector_to_access_map(FULL_VEC | 0xAAAAAAAAAAAAAAAA) == FULL_MAP
    assert B.vector_to_access_map(0x3) == 1  # bits 0 and 1 -> sub-page 0 only
    assert B.vector_to_access_map(0xC000000000000000) == 1 << 31


def test_scalar_results_are_ints():
    assert type(B.access_map_to_vector(5)) is int
    assert type(B.vector_to_access_map(5)) is int
    assert B.access_map_to_vector(np.uint32(3)) == 0b101
    assert B.vector_to_access_map(np.uint64(FULL_VEC)) == FULL_MAP


def test_random_scalars_roundtrip():
    rng = np.random.default_rng(2024)
    for m in rng.integers(0, 1 << 32, 200, dtype=np.uint64).tolist():
        v = B.access_map_to_vector(m)
        assert v == naive_vector(m)
        assert B.vector_to_access_map(v) == m
        noisy = v | (int(rng.integers(0, 1 << 63)) & 0xAAAAAAAAAAAAAAAA)
        assert B.vector_to_access_map(noisy) == m == naive_map(noisy)


# ---------------------------------------------------------------- conversions, arrays
def test_arrays_vectorised():
    rng = np.random.default_rng(7)
    maps = rng.integers(0, 1 << 32, 1000, dtype=np.uint64).astype(np.uint32)
    maps[:3] = [0, FULL_MAP, 1 << 31]
    vecs = B.access_map_to_vector(maps)
    assert isinstance(vecs, np.ndarray) and vecs.dtype == np.uint64 and vecs.shape == maps.shape
    assert vecs.tolist() == [naive_vector(int(m)) for m in maps]
    back = B.vector_to_access_map(vecs)
    assert isinstance(back, np.ndarray) and back.dtype == np.uint32
    assert np.array_equal(back, maps)
    noisy = vecs | np.uint64(0xAAAAAAAAAAAAAAAA)
    assert np.array_equal(B.vector_to_access_map(noisy), maps)


def test_array_shape_kept():
    maps = np.arange(12, dtype=np.uint32).reshape(3, 4) << np.uint32(20)
    vecs = B.access_map_to_vector(maps)
    assert vecs.shape == (3, 4)
    assert vecs[2, 3] == naive_vector(11 << 20)
    assert B.vector_to_access_map(vecs).shape == (3, 4)


def test_all_single_bits_as_one_array():
    maps = np.uint32(1) << np.arange(32, dtype=np.uint32)
    vecs = B.access_map_to_vector(maps)
    assert vecs.tolist() == [1 << (2 * i) for i in range(32)]
    assert B.vector_to_access_map(vecs).tolist() == [1 << i for i in range(32)]


# ---------------------------------------------------------------- indexing
def test_level_index():
    gpa = (1 << 39) | (2 << 30) | (3 << 21) | (4 << 12) | 0xABC
    assert gpa == 0x8080604ABC
    assert [B.level_index(gpa, lvl) for lvl in (4, 3, 2, 1)] == [1, 2, 3, 4]
    assert [B.level_index(0x10000000, lvl) for lvl in (4, 3, 2, 1)] == [0, 0, 128, 0]
    assert [B.level_index(0x1234000, lvl) for lvl in (4, 3, 2, 1)] == [0, 0, 9, 0x34]
    assert [B.level_index(0xFFFFFFFFFFFF, lvl) for lvl in (4, 3, 2, 1)] == [511] * 4
    assert B.level_index(1 << 48, 4) == 0  # bits above 47 are not part of the walk
    assert B.level_index(0xFFF, 1) == 0


def test_subpage_index():
    assert [B.subpage_index(x) for x in (0, 0x7F, 0x80, 0xFFF, 0x1000, 0x1380)] == [0, 0, 1, 31, 0, 7]


# ---------------------------------------------------------------- the numbers of the model
def test_vmcs_and_controls():
    assert B.EPT_POINTER == 0x201A
    assert B.SPPT_POINTER == 0x2030
    assert B.SPPT_POINTER_HIGH == 0x2031
    assert B.SECONDARY_VM_EXEC_CONTROL == 0x401E
    assert B.SECONDARY_EXEC_ENABLE_SPP == 0x800000 == 1 << 23
    assert B.SECONDARY_EXEC_ENABLE_EPT == 0x2
    assert B.MSR_IA32_VMX_PROCBASED_CTLS2 == 0x48B
    # EPTP: WB (6) in 2:0, walk length - 1 (3) in 5:3
    assert B.construct_eptp(0x5000) == 0x5000 | 6 | (3 << 3) == 0x501E


def test_exit_reasons_and_codes():
    assert (B.EXIT_REASON_EPT_VIOLATION, B.EXIT_REASON_EPT_MISCONFIG, B.EXIT_REASON_SPP) == (48, 49, 66)
    assert B.KVM_EXIT_SPP_V4 == 28
    assert B.KVM_EXIT_SPP_V12 == 29
    assert B.KVM_EXIT_MMIO == 6
    assert B.KVM_EXIT_UNKNOWN == 0
    assert B.SPPT_INDUCED_EXIT_TYPE == 1 << 11
    assert B.SPPT_NMI_UNBLOCKING == 1 << 12
    assert (B.EPT_VIOLATION_ACC_READ, B.EPT_VIOLATION_ACC_WRITE, B.EPT_VIOLATION_ACC_INSTR) == (1, 2, 4)
    assert B.EPT_VIOLATION_GLA_VALID | B.EPT_VIOLATION_GLA_TRANSLATED == 0x180
    assert B.EPT_VIOLATION_RWX_SHIFT == 3


def test_ept_and_sppt_bits():
    assert B.PT64_SPP_MASK == 1 << 61
    assert (B.VMX_EPT_READABLE_MASK, B.VMX_EPT_WRITABLE_MASK, B.VMX_EPT_EXECUTABLE_MASK) == (1, 2, 4)
    assert B.PT_PAGE_SIZE_MASK == 1 << 7
    assert B.VMX_EPT_IPAT_BIT == 1 << 6
    assert B.MEMTYPE_WB == 6
    assert B.VMX_EPT_SUPPRESS_VE_BIT == 1 << 63
    assert B.PT64_BASE_ADDR_MASK == 0x000FFFFFFFFFF000
    assert B.EPT_LEAF_FLAGS == 0x77  # R|W|X | WB << 3 | ignore-PAT
    assert B.VMX_EPT_MISCONFIG_WX_VALUE == 0b110
    assert B.SPPT_PRESENT_MASK == 1
    assert B.SPPT_LEAF_RESERVED_MASK == 0xAAAAAAAAAAAAAAAA
    rsvd = B.SPPT_NONLEAF_RESERVED_MASK
    assert rsvd & 0xFFF == 0xFFE  # bits 11:1 reserved, bit 0 is present
    assert rsvd >> 52 == 0xFFF  # bits 63:52 reserved
    assert rsvd & ((1 << B.MAXPHYADDR) - 1) & ~0xFFF == 0  # address bits below MAXPHYADDR usable


def test_outcomes_and_exit_kinds():
    assert (B.OUTCOME_ALLOWED, B.OUTCOME_SPP_VIOLATION, B.OUTCOME_WRITE_PROTECT_VIOLATION,
            B.OUTCOME_MMIO, B.OUTCOME_SPP_MISCONFIG) == (0, 1, 2, 3, 4)
    assert B.OUTCOME_NAMES == ("ALLOWED", "SPP_VIOLATION", "WRITE_PROTECT_VIOLATION", "MMIO", "SPP_MISCONFIG")
    assert set(B.EXIT_KIND_NAMES) == {
        "ept_fault", "mmio", "spp_miss", "spp_misconfig", "spp_violation", "write_protect", "wp_fault"
    }
    assert B.EXIT_KIND_NAMES[B.EXIT_KIND_SPP_VIOLATION] == "spp_violation"
    assert B.EXIT_KIND_NAMES[B.EXIT_KIND_SPP_MISS] == "spp_miss"
    assert B.EXIT_KIND_NAMES[B.EXIT_KIND_WRITE_PROTECT] == "write_protect"
    assert (B.ACCESS_READ, B.ACCESS_WRITE, B.ACCESS_FETCH) == (0, 1, 2)


def test_ioctls_and_errno():
    assert B.KVM_SUBPAGES_GET_ACCESS == 0x8008AE49
    assert B.KVM_SUBPAGES_SET_ACCESS == 0x4008AE4A
    assert B.KVM_INIT_SPP == 0x4008AE4B
    assert B.KVM_CAP_X86_SPP == 182
    assert B.SUBPAGE_MAX_BITMAP == 64
    assert (B.EPERM, B.ENOMEM, B.EFAULT, B.ENODEV, B.EINVAL) == (1, 12, 14, 19, 22)


def test_geometry():
    assert (B.PAGE_SIZE, B.SUBPAGE_SIZE, B.SUBPAGES_PER_PAGE, B.PT_ENTRIES) == (4096, 128, 32, 512)
    assert [B.level_size(lvl) for lvl in (1, 2, 3)] == [4096, 2 << 20, 1 << 30]
