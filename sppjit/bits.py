"""Every bit-level constant of the model, named as the SDM, KVM and Bochs sources name them.

This module is the one place for encodings. Kernels import the plain integers from here (numba
freezes module-level ints as compile-time constants); the control plane and the reference engine
import them too. All entry and address values are 64-bit unsigned.

Sources (docs/semantics.md §0, §8.3): SDM Vol. 3C 28.2 (EPT entries, exits),
KVM SPP series v4 (RESEND, Aug 2019) and v12 (May 2020), Bochs bochs/cpu/paging.cc.
"""

import errno

import numpy as np

# --------------------------------------------------------------------------------------------
# Paging geometry
# --------------------------------------------------------------------------------------------
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT  # 4 KiB
PAGE_MASK = ~(PAGE_SIZE - 1) & 0xFFFFFFFFFFFFFFFF
PT_ENTRIES = 512  # entries in one 4 KiB table
PT_INDEX_BITS = 9
PT64_ROOT_LEVEL = 4  # 4-level EPT and SPPT
PT_PAGE_TABLE_LEVEL = 1  # KVM's name for the 4 KiB level
PT_DIRECTORY_LEVEL = 2  # 2 MiB leaves
PT_PDPE_LEVEL = 3  # 1 GiB leaves
PAGES_PER_2M = 512
GPA_BITS = 48  # a 4-level walk translates bits 47:0
MAXPHYADDR = 46  # simulated host physical-address width; bits 51:46 of an address are reserved

SUBPAGE_SHIFT = 7  # 128-byte sub-pages
SUBPAGE_SIZE = 1 << SUBPAGE_SHIFT
SUBPAGES_PER_PAGE = PAGE_SIZE // SUBPAGE_SIZE  # 32


def level_index(gpa: int, level: int) -> int:
    """Index of ``gpa`` in a table of ``level`` (4..1): bits 47:39, 38:30, 29:21, 20:12."""
    return (gpa >> (PAGE_SHIFT + PT_INDEX_BITS * (level - 1))) & (PT_ENTRIES - 1)


def level_size(level: int) -> int:
    """Bytes mapped by one entry of ``level`` (1 -> 4 KiB, 2 -> 2 MiB, 3 -> 1 GiB)."""
    return 1 << (PAGE_SHIFT + PT_INDEX_BITS * (level - 1))


# --------------------------------------------------------------------------------------------
# EPT paging-structure entries (SDM Table 28-6; KVM arch/x86/include/asm/vmx.h)
# --------------------------------------------------------------------------------------------
VMX_EPT_READABLE_MASK = 0x1
VMX_EPT_WRITABLE_MASK = 0x2
VMX_EPT_EXECUTABLE_MASK = 0x4
VMX_EPT_RWX_MASK = 0x7
VMX_EPT_MT_EPTE_SHIFT = 3  # bits 5:3, memory type (leaf)
VMX_EPT_MT_MASK = 0x7 << VMX_EPT_MT_EPTE_SHIFT
VMX_EPT_IPAT_BIT = 1 << 6  # ignore PAT (leaf)
PT_PAGE_SIZE_MASK = 1 << 7  # "large page" in a level-3/level-2 entry
VMX_EPT_ACCESS_BIT = 1 << 8
VMX_EPT_DIRTY_BIT = 1 << 9
PT64_SPP_MASK = 1 << 61  # "sub-page write permissions apply" (KVM v4 name; Bochs BX_SUB_PAGE_PROTECTED)
VMX_EPT_SUPPRESS_VE_BIT = 1 << 63
PT64_BASE_ADDR_MASK = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)  # bits 51:12
EPT_ADDR_RESERVED_MASK = ((1 << 52) - 1) & ~((1 << MAXPHYADDR) - 1)  # bits 51:MAXPHYADDR
MEMTYPE_UC = 0
MEMTYPE_WB = 6
EPT_RESERVED_MEMTYPES = (2, 3, 7)  # leaf memory types that are misconfigurations
# KVM marks MMIO gfns with a present-looking, misconfigured entry (W|X without R): every later
# access takes an EPT misconfiguration, which KVM recognises as MMIO (VMX_EPT_MISCONFIG_WX_VALUE).
VMX_EPT_MISCONFIG_WX_VALUE = VMX_EPT_WRITABLE_MASK | VMX_EPT_EXECUTABLE_MASK

# A non-leaf EPT entry as KVM links it: the next table, fully permissive.
EPT_NONLEAF_FLAGS = VMX_EPT_RWX_MASK
# A leaf as KVM's lazy fault path installs it for RAM: R|W|X, WB, ignore-PAT.
EPT_LEAF_FLAGS = VMX_EPT_RWX_MASK | (MEMTYPE_WB << VMX_EPT_MT_EPTE_SHIFT) | VMX_EPT_IPAT_BIT

# EPTP (VMCS EPT_POINTER): memory type in 2:0, walk length - 1 in 5:3, root in 51:12.
VMX_EPTP_MT_WB = MEMTYPE_WB
VMX_EPTP_PWL_4 = (PT64_ROOT_LEVEL - 1) << 3
VMX_EPTP_AD_ENABLE_BIT = 1 << 6  # sppjit does not model EPT A/D flags: left 0


def construct_eptp(root_hpa: int) -> int:
    return (root_hpa & PT64_BASE_ADDR_MASK) | VMX_EPTP_PWL_4 | VMX_EPTP_MT_WB


# --------------------------------------------------------------------------------------------
# SPP tables (KVM spp_kvm.txt v3/v4 tables; Bochs spp_walk)
# --------------------------------------------------------------------------------------------
SPPT_PRESENT_MASK = 0x1  # bit 0 of a level-4/3/2 entry; the leaf has no present bit
# Bits 11:1 and 63:52 of a non-leaf entry are reserved, plus address bits 51:MAXPHYADDR.
SPPT_NONLEAF_RESERVED_MASK = 0xFFF0000000000FFE | EPT_ADDR_RESERVED_MASK
SPPT_LEAF_RESERVED_MASK = 0xAAAAAAAAAAAAAAAA  # odd bits of the SPP vector
FULL_SPP_ACCESS = 0xFFFFFFFF  # KVM's u32 access map with every sub-page writable
FULL_SPP_VECTOR = 0x5555555555555555  # the same as an SPP vector (bit 2i per sub-page i)

# --------------------------------------------------------------------------------------------
# VMCS (SDM Appendix B; KVM vmx.h; SPPT_POINTER from the SPP series)
# --------------------------------------------------------------------------------------------
CPU_BASED_VM_EXEC_CONTROL = 0x4002
SECONDARY_VM_EXEC_CONTROL = 0x401E
EPT_POINTER = 0x201A
SPPT_POINTER = 0x2030
SPPT_POINTER_HIGH = 0x2031
VM_EXIT_REASON = 0x4402
VM_EXIT_INSTRUCTION_LEN = 0x440C
EXIT_QUALIFICATION = 0x6400
GUEST_PHYSICAL_ADDRESS = 0x2400

CPU_BASED_ACTIVATE_SECONDARY_CONTROLS = 0x80000000
SECONDARY_EXEC_ENABLE_EPT = 0x00000002
SECONDARY_EXEC_ENABLE_SPP = 0x00800000  # bit 23 (v12 calls it SECONDARY_EXEC_SPP)
MSR_IA32_VMX_PROCBASED_CTLS2 = 0x48B

# The VMCS fields sppjit models, in the column order of the per-vCPU VMCS array.
VMCS_FIELDS = (
    CPU_BASED_VM_EXEC_CONTROL,
    SECONDARY_VM_EXEC_CONTROL,
    EPT_POINTER,
    SPPT_POINTER,
    VM_EXIT_REASON,
    EXIT_QUALIFICATION,
    GUEST_PHYSICAL_ADDRESS,
    VM_EXIT_INSTRUCTION_LEN,
)
VMCS_COL_PROC = 0
VMCS_COL_SECONDARY = 1
VMCS_COL_EPTP = 2
VMCS_COL_SPPTP = 3
VMCS_COL_EXIT_REASON = 4
VMCS_COL_EXIT_QUAL = 5
VMCS_COL_GPA = 6
VMCS_COL_INSN_LEN = 7
VMCS_NFIELDS = len(VMCS_FIELDS)
VMCS_FIELD_NAMES = {
    CPU_BASED_VM_EXEC_CONTROL: "CPU_BASED_VM_EXEC_CONTROL",
    SECONDARY_VM_EXEC_CONTROL: "SECONDARY_VM_EXEC_CONTROL",
    EPT_POINTER: "EPT_POINTER",
    SPPT_POINTER: "SPPT_POINTER",
    VM_EXIT_REASON: "VM_EXIT_REASON",
    EXIT_QUALIFICATION: "EXIT_QUALIFICATION",
    GUEST_PHYSICAL_ADDRESS: "GUEST_PHYSICAL_ADDRESS",
    VM_EXIT_INSTRUCTION_LEN: "VM_EXIT_INSTRUCTION_LEN",
}

# --------------------------------------------------------------------------------------------
# VM exits
# --------------------------------------------------------------------------------------------
EXIT_REASON_EPT_VIOLATION = 48
EXIT_REASON_EPT_MISCONFIG = 49
EXIT_REASON_SPP = 66  # "SPP-related event": SPPT miss or misconfiguration

# EPT-violation exit qualification as sppjit fills it (docs/semantics.md §2.6).
EPT_VIOLATION_ACC_READ = 1 << 0
EPT_VIOLATION_ACC_WRITE = 1 << 1
EPT_VIOLATION_ACC_INSTR = 1 << 2
EPT_VIOLATION_RWX_SHIFT = 3  # bits 5:3: cumulative R/W/X of the walk
EPT_VIOLATION_GLA_VALID = 1 << 7
EPT_VIOLATION_GLA_TRANSLATED = 1 << 8
# Reason-66 qualification: bit 11 SPPT-induced exit type (1 miss, 0 misconfiguration), bit 12
# NMI unblocking due to IRET (always 0 here).
SPPT_INDUCED_EXIT_TYPE = 1 << 11
SPPT_NMI_UNBLOCKING = 1 << 12

# Access kinds of the trace (docs/contract.md §1).
ACCESS_READ = 0
ACCESS_WRITE = 1
ACCESS_FETCH = 2
ACCESS_KIND_NAMES = ("read", "write", "fetch")
ACCESS_TO_QUAL = (EPT_VIOLATION_ACC_READ, EPT_VIOLATION_ACC_WRITE, EPT_VIOLATION_ACC_INSTR)

# --------------------------------------------------------------------------------------------
# KVM userspace exits (include/uapi/linux/kvm.h of each series)
# --------------------------------------------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_MMIO = 6
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_SPP_V4 = 28
KVM_EXIT_SPP_V12 = 29
# The page-granular baseline's write-tracking exit has no KVM_EXIT_* of its own (KVMI delivers
# such events over its socket). sppjit reports it as KVM_EXIT_MEMORY_FAULT, the code mainline
# KVM uses for "a memory fault userspace must resolve".
KVM_EXIT_MEMORY_FAULT = 39

# --------------------------------------------------------------------------------------------
# Outcomes and exit kinds (docs/contract.md §5.2, §5.4)
# --------------------------------------------------------------------------------------------
OUTCOME_ALLOWED = 0
OUTCOME_SPP_VIOLATION = 1
OUTCOME_WRITE_PROTECT_VIOLATION = 2
OUTCOME_MMIO = 3
OUTCOME_SPP_MISCONFIG = 4
OUTCOME_NAMES = ("ALLOWED", "SPP_VIOLATION", "WRITE_PROTECT_VIOLATION", "MMIO", "SPP_MISCONFIG")

EXIT_KIND_EPT_FAULT = 0
EXIT_KIND_MMIO = 1
EXIT_KIND_SPP_MISS = 2
EXIT_KIND_SPP_MISCONFIG = 3
EXIT_KIND_SPP_VIOLATION = 4
EXIT_KIND_WRITE_PROTECT = 5
EXIT_KIND_WP_FAULT = 6
EXIT_KIND_NAMES = (
    "ept_fault",
    "mmio",
    "spp_miss",
    "spp_misconfig",
    "spp_violation",
    "write_protect",
    "wp_fault",
)

# --------------------------------------------------------------------------------------------
# ioctls (include/uapi/linux/kvm.h; asm-generic/ioctl.h encoding)
# --------------------------------------------------------------------------------------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ, type_, nr, size)


def _IOW(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_WRITE, type_, nr, size)


_U64 = 8
# The series declares the ioctls with a __u64 size argument although they pass a
# struct kvm_subpage pointer: the numbers are what the uapi header builds.
KVM_SUBPAGES_GET_ACCESS = _IOR(KVMIO, 0x49, _U64)
KVM_SUBPAGES_SET_ACCESS = _IOW(KVMIO, 0x4A, _U64)
KVM_INIT_SPP = _IOW(KVMIO, 0x4B, _U64)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, 104)  # struct kvm_enable_cap is 104 bytes
KVM_CAP_X86_SPP = 182

SUBPAGE_MAX_BITMAP = 64  # v4: access_map[64], npages <= 64
KVM_SUBPAGE_MAX_PAGES = 512  # v12

# errno values the kernel returns (negated)
EPERM = errno.EPERM
ENOMEM = errno.ENOMEM
EFAULT = errno.EFAULT
ENODEV = errno.ENODEV
EINVAL = errno.EINVAL

# --------------------------------------------------------------------------------------------
# Simulated host-physical address space
# --------------------------------------------------------------------------------------------
# Page-table pages (EPT and SPPT share one pool, as KVM allocates both from its MMU caches) live
# at TABLE_POOL_HPA + index * 4 KiB; guest RAM backing pages at GUEST_RAM_HPA + gpa modulo
# GUEST_RAM_SIZE (2 MiB-aligned for every 2 MiB-aligned gfn, so huge leaves are well formed; a
# model holds no data, so a guest above 16 TiB shares backing pages and every backing address
# stays a valid one, up to the whole 48-bit guest space); pages given by a host remap come
# from REMAP_HPA upwards. All below 2**MAXPHYADDR.
TABLE_POOL_HPA = 0x0000_0010_0000_0000  # 64 GiB
GUEST_RAM_HPA = 0x0000_1000_0000_0000  # 16 TiB
GUEST_RAM_SIZE = 0x0000_1000_0000_0000  # 16 TiB of backing pages (a power of two)
REMAP_HPA = 0x0000_2000_0000_0000  # 32 TiB
assert GUEST_RAM_HPA + GUEST_RAM_SIZE <= REMAP_HPA < (1 << MAXPHYADDR)

# --------------------------------------------------------------------------------------------
# SPP vector <-> KVM 32-bit access map
# --------------------------------------------------------------------------------------------
_U64_1 = np.uint64(1)


def access_map_to_vector(access_map):
    """KVM's u32 map (bit i = sub-page i writable) -> SPP vector (bit 2i), vectorised.

    Accepts an int or an integer array; returns the same shape as uint64 (an int for an int).
    This is KVM's ``format_spp_spte``: ``(bitmap & BIT(i)) << i`` for i in 0..31.
    """
    scalar = np.isscalar(access_map)
    x = np.asarray(access_map).astype(np.uint64) & np.uint64(0xFFFFFFFF)
    # Spread the 32 bits to even positions with the classic interleave (Morton) masks.
    x = (x | (x << np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    x = (x | (x << np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    x = (x | (x << np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    x = (x | (x << np.uint64(2))) & np.uint64(0x3333333333333333)
    x = (x | (x << np.uint64(1))) & np.uint64(0x5555555555555555)
    return int(x) if scalar else x


def vector_to_access_map(vector):
    """SPP vector -> KVM's u32 map (even bits gathered; odd bits, being reserved, dropped)."""
    scalar = np.isscalar(vector)
    x = np.asarray(vector).astype(np.uint64) & np.uint64(0x5555555555555555)
    x = (x | (x >> np.uint64(1))) & np.uint64(0x3333333333333333)
    x = (x | (x >> np.uint64(2))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    x = (x | (x >> np.uint64(4))) & np.uint64(0x00FF00FF00FF00FF)
    x = (x | (x >> np.uint64(8))) & np.uint64(0x0000FFFF0000FFFF)
    x = (x | (x >> np.uint64(16))) & np.uint64(0x00000000FFFFFFFF)
    out = x.astype(np.uint32)
    return int(out) if scalar else out


def subpage_index(gpa: int) -> int:
    """Sub-page of a byte: gpa[11:7]."""
    return (gpa >> SUBPAGE_SHIFT) & (SUBPAGES_PER_PAGE - 1)
