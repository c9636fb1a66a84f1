"""fast_check, the replay's cached check, against hardware_check, the full walk it stands for.

The replay's fast loop acts on fast_check's answer without walking: an ALLOWED row goes on,
and the two exits it takes in place run the effect of KVM's handler directly. So, on any state
a replay can leave behind (random VMs, protections, pokes, traces), every answer fast_check
gives must be the one hardware_check gives, and its two in-place codes must mean what the loop
assumes: FAST_SPP_VIOLATION is an exit KVM's handler turns into a sub-page violation (in SPP
granularity), FAST_NOT_PRESENT an access to a gfn KVM has not mapped.
"""

from __future__ import annotations

import numpy as np
from hypothesis import event, given, settings

import sppjit
from sppjit import bits as B
from sppjit.kernels import layout as L
from sppjit.kernels.exits import kvm_handle_exit
from sppjit.kernels.hardware import (
    FAST_ALLOWED,
    FAST_NOT_PRESENT,
    FAST_SPP_VIOLATION,
    FAST_UNKNOWN,
    FAST_VIOLATION,
    fast_check,
    hardware_check,
    subpage_mask,
)
from sppjit.kernels.mmu import ept_leaf
from sppjit.replay import replay

import strategies as S  # noqa: E402  (tests/ on sys.path: conftest.py)

CODE_NAMES = {FAST_UNKNOWN: "UNKNOWN", FAST_ALLOWED: "ALLOWED", FAST_VIOLATION: "VIOLATION",
              FAST_SPP_VIOLATION: "SPP_VIOLATION", FAST_NOT_PRESENT: "NOT_PRESENT"}


def _copy(st):
    return st._replace(**{name: np.copy(getattr(st, name)) for name in st._fields})


def check_access(vm, gpa: int, size: int, vcpu: int, kind: int) -> int:
    """fast_check on the first page piece of one access, held against the full walk (and, for
    the in-place codes, against KVM's handler). Returns fast_check's code."""
    st = vm.state
    first = np.uint64(gpa)
    last = np.uint64(min(gpa + size - 1, gpa | (B.PAGE_SIZE - 1)))
    v = np.int64(vcpu)
    code, qual = fast_check(st, v, first, last, np.uint64(kind))
    if code == FAST_UNKNOWN:
        return code
    reason, walk_qual = hardware_check(_copy(st), v, first, last, np.int64(kind))
    where = f"{kind=} at {gpa:#x}+{size} on vCPU {vcpu}"
    if code == FAST_ALLOWED:
        assert reason == 0, f"fast_check allowed {where}; the walk says exit {reason}"
        return code
    assert (reason, walk_qual) == (B.EXIT_REASON_EPT_VIOLATION, qual), f"{where}: {code=} {qual=:#x}"
    gfn = np.uint64(gpa >> B.PAGE_SHIFT)
    if code == FAST_NOT_PRESENT:
        assert ept_leaf(st, gfn)[2] == 0, f"{where}: KVM has a leaf for it"
    if code == FAST_SPP_VIOLATION and st.cfg[L.CF_GRANULARITY] != L.GRAN_PAGE:
        handled = _copy(st)
        exit_kind, user, outcome = kvm_handle_exit(handled, v, np.int64(reason), np.uint64(qual), first,
                                                   np.int64(kind))
        assert (exit_kind, outcome) == (B.EXIT_KIND_SPP_VIOLATION, B.OUTCOME_SPP_VIOLATION), where
        assert user in (B.KVM_EXIT_SPP_V4, B.KVM_EXIT_SPP_V12)
        for name in st._fields:
            assert np.array_equal(getattr(handled, name), getattr(st, name)), f"{where}: the handler changed {name}"
    return code


@settings(max_examples=S.EXAMPLES, **S.SETTINGS)
@given(S.scenarios())
def test_fast_check_answers_only_what_the_walk_answers(scn):
    """Every access of every phase, checked before the phase's replay (caches from the phases
    before, pages not yet mapped) and after it."""
    runner = S.Runner(scn.vm, "jit")
    seen = set()
    for phase in scn.phases:
        runner.apply_ops(phase)
        for row in phase.trace:
            seen.add(check_access(runner.vm, *row[:4]))
        runner.replay(phase)
        for row in phase.trace:
            seen.add(check_access(runner.vm, *row[:4]))
    for code in sorted(seen):  # --hypothesis-show-statistics: how often each code was checked
        event(f"fast_check answered {CODE_NAMES[code]}")


def test_each_code_on_a_guarded_page():
    """The three answers the fast loop acts on, on one region whose walk the caches hold."""
    vm = sppjit.VM(memory="16MiB", vcpus=1)
    base = 0x400000  # region 2
    # Page 1 locks sub-page 3 (bytes 0x180..0x1ff); pages 0 and 1 are touched, page 2 is not.
    vm.protect(np.array([(base >> 12) + 1], dtype=np.uint64),
               np.array([B.FULL_SPP_ACCESS & ~(1 << 3)], dtype=np.uint32))
    replay(vm, S.trace_arrays([(base, 8, 0, B.ACCESS_WRITE), (base + 0x1000, 8, 0, B.ACCESS_WRITE)]))
    page1 = base + 0x1000
    assert check_access(vm, base + 8, 8, 0, B.ACCESS_WRITE) == FAST_ALLOWED
    assert check_access(vm, page1 + 0x100, 8, 0, B.ACCESS_WRITE) == FAST_ALLOWED  # sub-page 2
    assert check_access(vm, page1 + 0x180, 8, 0, B.ACCESS_WRITE) == FAST_SPP_VIOLATION
    assert check_access(vm, page1 + 0x180, 8, 0, B.ACCESS_READ) == FAST_ALLOWED
    assert check_access(vm, base + 0x2000, 8, 0, B.ACCESS_WRITE) == FAST_NOT_PRESENT


def test_subpage_mask_is_the_sub_pages_the_write_spans():
    """subpage_mask (the SPP-vector bits a write needs)
    against the reference engine's rule, bit 2i for each sub-page i the check covers: every
    pair of first and last sub-page of a page, in both check modes."""
    page = 0x7_3000
    for lo in range(B.SUBPAGES_PER_PAGE):
        for hi in range(lo, B.SUBPAGES_PER_PAGE):
            first = np.uint64(page + (lo << B.SUBPAGE_SHIFT) + 5)
            last = np.uint64(page + (hi << B.SUBPAGE_SHIFT) + 3)
            for check, top in ((L.CHECK_ALL, hi), (L.CHECK_FIRST, lo)):
                want = sum(1 << (2 * i) for i in range(lo, top + 1))
                assert int(subpage_mask(first, last, check)) == want, (lo, hi, check)
