"""KVM's VM-exit handlers for the exits an access can cause (docs/semantics.md §3, §5).

``kvm_handle_exit`` is what happens between a VM exit and the guest's retry: it classifies the
exit the way KVM's handlers do (handle_ept_violation -> tdp_page_fault / fast_page_fault,
handle_ept_misconfig, handle_spp), changes the state, and says whether the guest resumes.
"""

import numpy as np

from sppjit import bits as B

from ._jit import FULL_ACCESS_U32, U0, U_PAGE_SHIFT, U_R, U_SPP, U_W, U_X, inline, kernel
from .layout import CF_GRANULARITY, GRAN_PAGE
from .mmu import (  # noqa: F401  (kvm_exit_spp_code: re-exported, it lives in the v4/v12 seam)
    RESUME,
    access_map_of,
    ept_leaf,
    handle_spp_miss,
    kvm_exit_spp_code,
    kvm_install_mmio,
    kvm_map_gfn,
    kvm_map_gfn_common,
    memslot_of,
)

_U_MISS = np.uint64(B.SPPT_INDUCED_EXIT_TYPE)


# The rare handlers, as functions of their own: kvm_handle_exit is inlined into the replay
# kernel, and these would double its size (and its compile time) for exits taken about once
# per page (an SPPT miss, an MMIO gfn, mapping a protected gfn) or per region (a region's
# first mapping, 2 MiB leaves).
@kernel
def handle_spp_miss_rare(st, v, gfn):
    handle_spp_miss(st, v, gfn)


@kernel
def kvm_install_mmio_rare(st, gfn):
    kvm_install_mmio(st, gfn)


@kernel
def kvm_map_gfn_rare(st, gfn, slot):
    kvm_map_gfn(st, gfn, slot)


@inline
def kvm_handle_exit(st, v, reason, qual, gpa, kind):
    """Handle one exit of vCPU ``v`` at ``gpa``.

    Returns (exit kind, KVM_EXIT_* code or 0, outcome): the outcome is RESUME when KVM resolved
    the exit and the guest retries, else the terminal outcome of the access.
    """
    gfn = gpa >> U_PAGE_SHIFT
    if reason == B.EXIT_REASON_EPT_MISCONFIG:
        # KVM's only misconfigured entries are its MMIO entries: handle_ept_misconfig emulates
        # the access as MMIO in userspace.
        return B.EXIT_KIND_MMIO, B.KVM_EXIT_MMIO, B.OUTCOME_MMIO
    if reason == B.EXIT_REASON_SPP:
        if (qual & _U_MISS) != U0:
            # handle_spp: v4 builds this vCPU's path, v12 fills the 2 MiB block (kernels.mmu).
            handle_spp_miss_rare(st, v, gfn)
            return B.EXIT_KIND_SPP_MISS, 0, RESUME
        # WARN_ON and KVM_EXIT_UNKNOWN with hardware_exit_reason = 66.
        return B.EXIT_KIND_SPP_MISCONFIG, B.KVM_EXIT_UNKNOWN, B.OUTCOME_SPP_MISCONFIG

    # EPT violation (48)
    t, i, level = ept_leaf(st, gfn)
    if level == 0:
        s = memslot_of(st, gfn)
        if s < 0:
            kvm_install_mmio_rare(st, gfn)
            return B.EXIT_KIND_MMIO, B.KVM_EXIT_MMIO, B.OUTCOME_MMIO
        if not kvm_map_gfn_common(st, gfn, s):
            kvm_map_gfn_rare(st, gfn, s)
        return B.EXIT_KIND_EPT_FAULT, 0, RESUME
    e = st.tables[t, i]
    if kind == B.ACCESS_WRITE and (e & U_W) == U0:
        if st.cfg[CF_GRANULARITY] == GRAN_PAGE:
            if access_map_of(st, gfn) != FULL_ACCESS_U32:
                # Taken in the replay's fast loop too (kernels.replay.is_write_protect_exit).
                return B.EXIT_KIND_WRITE_PROTECT, B.KVM_EXIT_MEMORY_FAULT, B.OUTCOME_WRITE_PROTECT_VIOLATION
        elif (e & U_SPP) != U0:
            # fast_page_fault: a write fault on an SPTE with the SPP bit is a sub-page
            # violation: KVM_EXIT_SPP (28 in v4, 29 in v12). v4 skips the instruction; v12
            # reports its length and lets userspace decide, and sppjit's userspace skips it:
            # in both profiles the write is dropped.
            # The replay's fast loop takes this exit without calling here
            # (kernels.replay.take_refused_write): a change to this rule changes it there too,
            # and the engine-equivalence tests compare the two.
            return B.EXIT_KIND_SPP_VIOLATION, kvm_exit_spp_code(st), B.OUTCOME_SPP_VIOLATION
        # A page KVM itself left write-protected: make it writable and retry.
        st.tables[t, i] = e | U_W
        return B.EXIT_KIND_WP_FAULT, 0, RESUME
    # A read or fetch refused by a present leaf (only a hand-poked entry does that): KVM's
    # fault path re-installs the leaf's R and X.
    st.tables[t, i] = e | U_R | U_X
    return B.EXIT_KIND_EPT_FAULT, 0, RESUME
