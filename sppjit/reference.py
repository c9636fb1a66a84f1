"""The reference engine: docs/semantics.md §6, one access at a time, in plain Python.

This is the oracle every test compares the JIT engine with, and ``--engine reference`` for
users. It is written to be obviously right, not fast: the hardware side (EPT walk, SPP
eligibility, SPPT walk) reads the table pool entry by entry with Python integers and shares
no code with the kernels. KVM's side (what a handler changes) is the control plane's, the
single compiled source of those rules in kernels.mmu / kernels.exits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import bits as B
from .kernels import layout as L
from .kernels.exits import kvm_handle_exit
from .kernels.mmu import RESUME, serve_requests


@dataclass
class Exit:
    reason: int
    qualification: int


def _read(st, table_hpa: int, index: int) -> int:
    """One 64-bit entry of the table at ``table_hpa``; memory outside the pool reads as 0."""
    idx = ((table_hpa & B.PT64_BASE_ADDR_MASK) - B.TABLE_POOL_HPA) >> B.PAGE_SHIFT
    if table_hpa & B.PT64_BASE_ADDR_MASK < B.TABLE_POOL_HPA or idx >= int(st.scal[L.SC_NTABLES]):
        return 0
    return int(st.tables[idx, index])


def _ept_misconfigured(entry: int, level: int, is_leaf: bool) -> bool:
    r, w = entry & B.VMX_EPT_READABLE_MASK, entry & B.VMX_EPT_WRITABLE_MASK
    if w and not r:
        return True
    if entry & B.EPT_ADDR_RESERVED_MASK:
        return True
    if is_leaf:
        return (entry >> B.VMX_EPT_MT_EPTE_SHIFT) & 7 in B.EPT_RESERVED_MEMTYPES
    reserved = 0xF8 if level == 4 else 0x78  # bits 7:3 of a PML4E, 6:3 of other non-leaves
    return bool(entry & reserved)


def _violation(kind: int, cumulative_rwx: int) -> Exit:
    qual = (
        B.ACCESS_TO_QUAL[kind]
        | (cumulative_rwx << B.EPT_VIOLATION_RWX_SHIFT)
        | B.EPT_VIOLATION_GLA_VALID
        | B.EPT_VIOLATION_GLA_TRANSLATED
    )
    return Exit(B.EXIT_REASON_EPT_VIOLATION, qual)


def hardware_check(st, vcpu: int, first: int, last: int, kind: int) -> Exit | None:
    """What the processor does for bytes first..last (one 4 KiB page) of vCPU ``vcpu``.

    A pure function of the state: None if the access completes, else the VM exit.
    """
    vmcs = st.vmcs[vcpu]
    table = int(vmcs[B.VMCS_COL_EPTP]) & B.PT64_BASE_ADDR_MASK
    cumulative = B.VMX_EPT_RWX_MASK
    leaf, leaf_level = 0, 0
    for level in (4, 3, 2, 1):
        entry = _read(st, table, B.level_index(first, level))
        if entry & B.VMX_EPT_RWX_MASK == 0:
            return _violation(kind, 0)  # not present: the cumulative rights are reported as 0
        is_leaf = level == 1 or (level in (2, 3) and bool(entry & B.PT_PAGE_SIZE_MASK))
        if _ept_misconfigured(entry, level, is_leaf):
            return Exit(B.EXIT_REASON_EPT_MISCONFIG, 0)
        cumulative &= entry & B.VMX_EPT_RWX_MASK
        if is_leaf:
            leaf, leaf_level = entry, level
            break
        table = entry & B.PT64_BASE_ADDR_MASK

    needed = (B.VMX_EPT_READABLE_MASK, B.VMX_EPT_WRITABLE_MASK, B.VMX_EPT_EXECUTABLE_MASK)[kind]
    if cumulative & needed:
        return None

    controls = int(vmcs[B.VMCS_COL_SECONDARY])
    if not int(vmcs[B.VMCS_COL_PROC]) & B.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS:
        controls = 0
    eligible = (
        kind == B.ACCESS_WRITE
        and controls & B.SECONDARY_EXEC_ENABLE_SPP
        and leaf_level == 1
        and leaf & B.PT64_SPP_MASK
        and cumulative & B.VMX_EPT_READABLE_MASK
    )
    if not eligible:
        return _violation(kind, cumulative)

    table = int(vmcs[B.VMCS_COL_SPPTP])
    for level in (4, 3, 2):
        entry = _read(st, table, B.level_index(first, level))
        if not entry & B.SPPT_PRESENT_MASK:
            return Exit(B.EXIT_REASON_SPP, B.SPPT_INDUCED_EXIT_TYPE)  # SPPT miss
        if entry & B.SPPT_NONLEAF_RESERVED_MASK:
            return Exit(B.EXIT_REASON_SPP, 0)  # SPPT misconfiguration
        table = entry & B.PT64_BASE_ADDR_MASK
    vector = _read(st, table, B.level_index(first, 1))
    if vector & B.SPPT_LEAF_RESERVED_MASK:
        return Exit(B.EXIT_REASON_SPP, 0)

    lo = B.subpage_index(first)
    hi = lo if int(st.cfg[L.CF_SUBPAGE_CHECK]) == L.CHECK_FIRST else B.subpage_index(last)
    if all(vector >> (2 * i) & 1 for i in range(lo, hi + 1)):
        return None
    return _violation(kind, cumulative)


@dataclass
class ExitRecord:
    row: int
    vcpu: int
    gpa: int
    reason: int
    qualification: int
    kind: int
    userspace_exit: int
    insn_len: int


class ModelLivelock(RuntimeError):
    pass


def replay_access(vm, row: int, gpa: int, size: int, vcpu: int, kind: int, log: list, touched: set,
                  insn_len: int = 0):
    """Replay one access (docs/semantics.md §6.1). Returns (outcome, exits, last exit reason)."""
    st = vm.state
    if st.requests[vcpu]:
        failed = serve_requests(st, np.int64(vcpu))
        if failed:
            from .errors import VmEntryError
            from .kernels.mmu import ENTRY_FAILURE_MESSAGES

            raise VmEntryError(f"vCPU {vcpu}: VM entry failed: {ENTRY_FAILURE_MESSAGES[failed]}")
    last = gpa + size - 1
    pieces = []
    start = gpa
    while start <= last:
        end = min(last, start | (B.PAGE_SIZE - 1))
        pieces.append((start, end))
        start = end + 1

    exits, last_reason, outcome = 0, 0, B.OUTCOME_ALLOWED
    for first, end in pieces:
        touched.add(first >> B.PAGE_SHIFT)
        for _attempt in range(9):
            st = vm.state  # the pool may have grown
            e = hardware_check(st, vcpu, first, end, kind)
            if e is None:
                break
            st.vmcs[vcpu, B.VMCS_COL_EXIT_REASON] = e.reason
            st.vmcs[vcpu, B.VMCS_COL_EXIT_QUAL] = e.qualification
            st.vmcs[vcpu, B.VMCS_COL_GPA] = first
            st.vmcs[vcpu, B.VMCS_COL_INSN_LEN] = insn_len  # what the trace says, 0 if unknown
            # The same argument types as the replay kernel's call, so both use one compilation.
            exit_kind, user, result = kvm_handle_exit(
                st, np.int64(vcpu), np.int64(e.reason), np.uint64(e.qualification), np.uint64(first), np.int64(kind)
            )
            exit_kind, user, result = int(exit_kind), int(user), int(result)
            log.append(ExitRecord(row, vcpu, first, e.reason, e.qualification, exit_kind, user, insn_len))
            exits += 1
            last_reason = e.reason
            if result != RESUME:
                return result, exits, last_reason
        else:
            raise ModelLivelock(f"row {row}: the guest keeps faulting on {first:#x}")
    return outcome, exits, last_reason
