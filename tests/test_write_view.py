"""The write view (kernels.layout), a derived per-page view of write rights, held against the
real tables after every state change.

The replay's fast loop allows a write on a hit of the view without reading the EPT leaf or the
SPP vector, so every non-zero entry must be exactly what the tables say
(sppjit.statecheck.check_write_view, which asks the reference engine's hardware check), after
every replay batch, every timeline operation and every control-plane call. The scenarios are
the property tests' (both profiles, both granularities, huge pages, several vCPUs, requests,
pokes, zaps, remaps, deleted memslots, set_subpages in the middle of a trace); on top, the
same scenario replayed with the view switched off must leave identical results and states.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import event, given, settings
from test_equivalence import assert_results_equal, assert_states_equal

import sppjit.replay as R
from sppjit import bits as B
from sppjit.kernels import layout as L
from sppjit.kernels.mmu import map_to_vector, vector_to_map
from sppjit.statecheck import check_state, check_write_view, write_rights

import strategies as S  # noqa: E402  (tests/ on sys.path: conftest.py)


def _without_view(vm) -> None:
    """Switch the view off, as a VM over the budget has it (the kernels skip an empty view)."""
    vm._state = vm.state._replace(write_view=vm.state.write_view[:, :0])


def _entries(vm) -> int:
    return int(np.count_nonzero(vm.state.write_view))


@contextlib.contextmanager
def _checking(seen: list):
    """Run check_write_view after every batch a Replay runs and every timeline operation it
    applies, appending the entries in use to ``seen``."""
    run, apply_ops = R.Replay.run, R.Replay._apply_due_ops

    def check(vm, where):
        problem = check_write_view(vm.state)
        assert problem == "", f"{where}: {problem}"
        seen.append(_entries(vm))

    def run_checked(self, batch, *args, **kwargs):
        out = run(self, batch, *args, **kwargs)
        check(self.vm, "after a batch")
        return out

    def apply_checked(self, row):
        apply_ops(self, row)
        check(self.vm, f"after the operations due at row {row}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(R.Replay, "run", run_checked)
        mp.setattr(R.Replay, "_apply_due_ops", apply_checked)
        yield check


@pytest.fixture
def checked():
    seen = []
    with _checking(seen):
        yield seen


def _drive(runner, scn, after) -> list:
    """The scenario's phases on ``runner``: each operation, then the replay; ``after(where)``
    after each of them. Returns what each replay gave."""
    results = []
    for p, phase in enumerate(scn.phases):
        for op in phase.ops:
            call = S.op_call(runner.vm, op)
            if call is not None:
                S.run_call(runner.vm, call)
                after(f"phase {p}, after {call}")
        res = runner.replay(phase)
        after(f"phase {p}, after its replay")
        results.append(res)
        if res.error is not None:
            break
    return results


@settings(max_examples=S.EXAMPLES, **S.SETTINGS)
@given(scn=S.scenarios())
def test_view_matches_the_tables_after_every_change(scn):
    seen = []
    with _checking(seen) as check:
        with_view = S.Runner(scn.vm, "jit")
        ra = _drive(with_view, scn, lambda where: check(with_view.vm, where))
    event("view entries in use" if any(seen) else "view empty throughout")
    # The same scenario with no view: the same results and the same state.
    without = S.Runner(scn.vm, "jit")
    _without_view(without.vm)
    rb = _drive(without, scn, lambda where: None)
    assert len(ra) == len(rb)
    for p, (a, b) in enumerate(zip(ra, rb)):
        assert_results_equal(a, b, f"phase {p}, view on / off")
    assert_states_equal(with_view.vm, without.vm, "view on / off")


def _guarded_vm(vcpus=2, profile="v4", subpage_check="all", protect=True):
    """A small guarded-style VM: 4 MiB, every third page protected with a mixed map."""
    from sppjit.vm import VM

    vm = VM(memory=4 << 20, vcpus=vcpus, profile=profile, subpage_check=subpage_check)
    if protect:
        gfns = np.arange(0, 1024, 3, dtype=np.uint64)
        maps = np.where(gfns % 2 == 0, 0xFFFF00FF, 0x0F0F0F0F).astype(np.uint32)
        vm.protect(gfns, maps)
    return vm


def _writes(rng, n, vcpus, pages=1024):
    gpa = (rng.integers(0, pages, n).astype(np.uint64) << np.uint64(12)) | (
        rng.integers(0, 512, n).astype(np.uint64) << np.uint64(3))
    return dict(gpa=gpa, size=np.full(n, 8, np.uint16), vcpu=rng.integers(0, vcpus, n).astype(np.uint16),
                kind=np.full(n, B.ACCESS_WRITE, np.uint8))


@pytest.mark.parametrize("profile", ["v4", "v12"])
@pytest.mark.parametrize("subpage_check", ["all", "first"])
def test_view_fills_and_stays_exact_across_batches_and_operations(checked, profile, subpage_check):
    """Random writes in batches, with set_subpages between them, and set_subpages, a zap and a
    remap in the middle of a trace: the view fills (it is used), and every check holds (the
    property test above adds pokes, memslot deletions, huge pages, requests and more vCPUs)."""
    rng = np.random.default_rng(7)
    vm = _guarded_vm(profile=profile, subpage_check=subpage_check)
    R.replay(vm, _writes(rng, 3000, 2), batch_size=512)
    assert _entries(vm) > 100  # writes to written pages: the view is in use
    ops = [dict(at=500, op="set_subpages", gfn=9, npages=4, access=0x00FFFF00),
           dict(at=900, op="zap", gfn=30, npages=40), dict(at=1500, op="remap", gfn=100, npages=8)]
    R.replay(vm, _writes(rng, 3000, 2), batch_size=700, ops=ops)
    vm.set_subpages(12, [0] * 3)
    assert check_write_view(vm.state) == ""
    R.replay(vm, _writes(rng, 2000, 2), batch_size=2000)
    assert _entries(vm) > 100
    assert len(checked) >= 3 + 6 + 3 + 1 and max(checked) > 100  # each batch and operation was checked
    assert check_state(vm.state, vm.config) == ""  # a consistent view passes the state check


def test_a_stale_entry_is_refused(checked):
    """The checker is not vacuous: change a leaf behind the caches' back (no invalidation)
    and it names the entry; so does check_state."""
    rng = np.random.default_rng(3)
    vm = _guarded_vm()
    R.replay(vm, _writes(rng, 3000, 2), batch_size=4096)
    st = vm.state
    v, slot, i = (int(x) for x in np.argwhere(st.write_view == np.uint32(B.FULL_SPP_ACCESS))[0])
    gfn = (((int(st.ept_cache[slot]) >> L.CACHE_TAG_SHIFT) - 1) << 9) | i
    t = (int(st.ept_cache[slot]) & L.CACHE_PAYLOAD_MASK) >> 4
    st.tables[t, gfn & 511] &= ~np.uint64(B.VMX_EPT_WRITABLE_MASK)  # W off, nothing told
    problem = check_write_view(st)
    assert f"write_view[{v}, {slot}, {i}]" in problem and f"gfn {gfn:#x}" in problem
    assert check_state(st, vm.config) == problem
    # A view row under an empty cache entry breaks rule 1, whatever it says.
    vm.invalidate_caches()
    assert check_write_view(vm.state) == ""
    vm.state.write_view[0, slot, 5] = 1
    assert "under an empty ept_cache entry" in check_write_view(vm.state)


def test_refused_writes_are_recorded_beside_the_rights(checked):
    """A write the SPP vector refuses on a 4 KiB leaf with W clear records, in the high half of
    its page's word, the qualification of its sub-page violation, so that the next refused
    write to the page is decided by the same load as an allowed one (the property test above
    holds such replays against the view switched off); a wrong qualification is named."""
    rng = np.random.default_rng(11)
    vm = _guarded_vm()
    result = R.replay(vm, _writes(rng, 4000, 2))
    assert result.summary["exits"]["spp_violation"] > 200
    st = vm.state
    refusals = st.write_view >> np.uint64(L.WRITE_VIEW_REFUSAL_SHIFT)
    assert np.count_nonzero(refusals) > 100
    v, slot, i = (int(x) for x in np.argwhere(refusals != 0)[0])
    q = int(refusals[v, slot, i])
    # a write (bit 1), the walk's R and X (bits 3 and 5: the leaf has W clear), the GLA bits
    assert q == (2 | ((B.VMX_EPT_READABLE_MASK | B.VMX_EPT_EXECUTABLE_MASK) << B.EPT_VIOLATION_RWX_SHIFT)
                 | B.EPT_VIOLATION_GLA_VALID | B.EPT_VIOLATION_GLA_TRANSLATED)
    assert check_write_view(st) == ""
    st.write_view[v, slot, i] ^= np.uint64(1 << (L.WRITE_VIEW_REFUSAL_SHIFT + 4))  # the qualification's W bit
    assert "records refusals" in check_write_view(st)
    st.write_view[v, slot, i] = np.uint64(int(st.write_view[v, slot, i]) & 0xFFFFFFFF)  # no refusal: still true
    assert check_write_view(st) == ""


def test_write_rights_are_the_map_or_the_whole_page():
    """write_rights, the checker's oracle, on pages whose answer is known: a protected page's
    rights are its map, an unprotected page's all sub-pages, an unmapped page's none."""
    rng = np.random.default_rng(1)
    vm = _guarded_vm(vcpus=1)
    trace = _writes(rng, 64, 1)
    trace["gpa"][:3] = [0x0000, 0x1000, 0x3000]  # gfns 0 and 3 protected, 1 not
    R.replay(vm, trace)
    assert write_rights(vm.state, 0, 0) == 0xFFFF00FF  # gfn 0: even, its map
    assert write_rights(vm.state, 0, 3) == 0x0F0F0F0F
    assert write_rights(vm.state, 0, 1) == B.FULL_SPP_ACCESS  # faulted in, writable
    assert write_rights(vm.state, 0, 2000) == 0  # in the memslot, never faulted in
    assert write_rights(vm.state, 0, 1 << 20) == 0  # no memslot


def test_view_is_skipped_when_empty_and_results_are_the_same():
    """A VM whose view is empty (over the budget, or switched off as the shards run) replays
    the same as one with a view."""
    rng = np.random.default_rng(5)
    trace = _writes(rng, 5000, 2)
    a, b = _guarded_vm(), _guarded_vm()
    _without_view(b)
    ra, rb = R.replay(a, trace), R.replay(b, trace)
    assert _entries(a) > 0 and b.state.write_view.size == 0
    assert ra.table.equals(rb.table) and ra.summary["exits"] == rb.summary["exits"]
    for name in ("tables", "vmcs", "scal"):
        np.testing.assert_array_equal(getattr(a.state, name), getattr(b.state, name), err_msg=name)


def test_budget_leaves_a_big_vm_without_view():
    assert L.write_view_entries(1, 1 << 10) == 1 << 10
    most = L.WRITE_VIEW_BUDGET // L.WRITE_VIEW_ROW_BYTES // 2  # two vCPUs' rows
    assert L.write_view_entries(2, most) == most
    assert L.write_view_entries(2, most + 1) == 0
    st = L.empty_state(4, [(0, 1 << 27)], 4, np.zeros(L.CF_LEN, np.int64))  # 512 GiB, 4 vCPUs
    assert st.write_view.shape == (4, 0, 512)


@pytest.mark.parametrize("m", [0, 1, 0xFFFFFFFF, 0x80000001, 0x0F0F0F0F, 0xDEADBEEF])
def test_vector_to_map_inverts_map_to_vector(m):
    assert int(vector_to_map(map_to_vector(np.uint32(m)))) == m
    # odd bits (reserved in a leaf) are dropped, not folded in
    assert int(vector_to_map(map_to_vector(np.uint32(m)) | np.uint64(0xAAAAAAAAAAAAAAAA))) == m


def test_a_sharded_segment_leaves_no_stale_view():
    """The shards run without a view, so what they change cannot forget its rows: the VM's is
    zeroed before each sharded segment. Here a shard re-tags the cache entry of a written RAM
    region (region 0: its gfns' entries FULL) with an MMIO region that shares it (region 2 of
    a 4 MiB guest, whose caches have 2 entries); without the reset, a later write to the MMIO
    gfns would hit region 0's entries and be allowed."""
    from test_shards import shard_everything

    from sppjit.io.trace import open_trace
    from sppjit.replay import Replay
    from sppjit.vm import VM

    def rows(gfns):
        gfns = np.asarray(gfns, dtype=np.uint64)
        n = gfns.shape[0]
        return dict(gpa=gfns << np.uint64(12), size=np.full(n, 8, np.uint16), vcpu=np.zeros(n, np.uint16),
                    kind=np.full(n, B.ACCESS_WRITE, np.uint8))

    ram = rows(np.tile(np.arange(64), 2))  # written twice: the second write hits the view
    mixed = rows(np.ravel(np.column_stack([512 + np.arange(1000) % 64, 1024 + np.arange(1000) % 64])))
    probe = rows(1024 + np.arange(40))
    results, sharded = [], []
    for threads in (1, 2):
        vm = VM(memory=4 << 20, vcpus=1)
        vm.protect(np.array([7], np.uint64), np.array([0xFFFF0000], np.uint32))  # SPP active: the view is used
        assert vm.state.ept_cache.shape[0] == 2
        R.replay(vm, ram)
        assert _entries(vm) >= 60
        with shard_everything():
            session = Replay(vm, "jit", threads=threads)
            for batch in open_trace(mixed, batch_size=len(mixed["gpa"])):
                session.run(batch)
            sharded.append(session._shards.parallel_pieces if session._shards is not None else 0)
        assert check_write_view(vm.state) == ""
        results.append(R.replay(vm, probe))
    assert sharded[1] > 0  # the second run did shard
    assert results[0].summary["exits"] == results[1].summary["exits"]
    assert results[0].table.equals(results[1].table)
    assert results[1].summary["exits"].get("mmio", 0) == 40
